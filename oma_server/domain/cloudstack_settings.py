"""CloudStack settings checks: test a connection, find the OMA's own VM, validate settings, and
discover the resources (zones, templates, offerings, networks) an operator chooses from.

Checks report business failures as answers (``success=False`` with a sanitised reason); they never
echo keys. Only the optional ``persist`` of DetectOMAVM writes (the active config's ``oma_vm_id``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from oma_server.db.models import OsseaConfig
from oma_server.domain import cloudstack_config, text_rules
from oma_server.domain.crypto import SecretBox
from oma_server.domain.text_rules import quote
from oma_server.errors import DomainError, FailedPrecondition, InvalidArgument, Unavailable, require
from oma_server.integrations.cloudstack import CloudStack, CloudStackError, Endpoint, normalise_api_url

TEMPLATE_MAX_BYTES = 2 << 30  # larger templates would force a root disk bigger than the source


def api_url(value: str, label: str = "api_url") -> str:
    """A CloudStack API URL as given (typos fixed, see ``normalise_api_url``), parsed completely."""
    value = (value or "").strip()
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", value)
    if scheme and scheme.group(1).lower() not in ("http", "https"):
        raise InvalidArgument(f"{label} must start with http:// or https://")
    text_rules.check(value, label, max_chars=text_rules.URL_MAX_CHARS)
    return text_rules.http_url(normalise_api_url(value), label,
                               max_chars=text_rules.URL_MAX_CHARS)


def endpoint(url: str, api_key: str, secret_key: str, label: str = "api_url") -> Endpoint:
    require(url and api_key and secret_key, f"{label}, api_key and secret_key are required")
    return Endpoint(api_url(url, label), api_key, secret_key)


def friendly_error(exc: DomainError) -> str:
    """An operator-facing reason for a failed CloudStack call (keys never appear in it)."""
    if isinstance(exc, CloudStackError) and exc.cs_code == 401:
        return "Authentication failed: check the API key and the secret key"
    if isinstance(exc, Unavailable):
        return f"Cannot reach CloudStack: {exc.message}"
    return exc.message


def test_connection(cs: CloudStack) -> tuple[bool, str, int]:
    try:
        zones = cs.list_zones()
    except DomainError as exc:
        return False, friendly_error(exc), 0
    return True, f"Connected to CloudStack. Found {len(zones)} zone(s).", len(zones)


def find_oma_vm(cs: CloudStack, macs: list[str]) -> dict[str, Any] | None:
    """The VM one of whose NICs has one of this machine's MAC addresses."""
    wanted = {m.lower() for m in macs}
    for vm in cs.list_virtual_machines():
        for nic in vm.get("nic", []):
            if str(nic.get("macaddress", "")).lower() in wanted:
                return {"vm_id": vm["id"], "vm_name": vm.get("displayname") or vm.get("name", ""),
                        "mac_address": nic["macaddress"].lower(), "ip_address": nic.get("ipaddress", ""),
                        "account": vm.get("account", "")}
    return None


def persist_oma_vm_id(vm_id: str) -> OsseaConfig:
    config = cloudstack_config.require_active()
    OsseaConfig.update(oma_vm_id=vm_id).where(OsseaConfig.id == config.id).execute()
    return OsseaConfig.get_by_id(config.id)


@dataclass
class Check:
    status: str  # pass | warning | fail | skipped
    message: str
    details: dict[str, Any] = field(default_factory=dict)


def validate(cs: CloudStack, macs: list[str], *, oma_vm_id: str = "", service_offering_id: str = "",
             network_id: str = "") -> dict[str, Any]:
    checks: dict[str, Check] = {}
    if oma_vm_id:
        checks["oma_vm"] = Check("pass", f"OMA VM {oma_vm_id} given")
    else:
        found = find_oma_vm(cs, macs)
        oma_vm_id = found["vm_id"] if found else ""
        checks["oma_vm"] = (Check("pass", f"OMA VM detected: {found['vm_name']}", {"vm_id": oma_vm_id})
                            if found else Check("warning", "the OMA VM was not found by MAC address; set oma_vm_id"))
    if service_offering_id:
        offering = next((o for o in cs.list_service_offerings() if o["id"] == service_offering_id), None)
        if offering is None:
            checks["compute_offering"] = Check("fail", f"service offering {service_offering_id} does not exist")
        elif not offering.get("iscustomized"):
            checks["compute_offering"] = Check("fail", f"service offering {offering.get('name')} is not customizable "
                                               "(CPU and memory must follow the source VM)")
        else:
            checks["compute_offering"] = Check("pass", f"service offering {offering.get('name')} is customizable")
    else:
        checks["compute_offering"] = Check("warning", "no service offering chosen")
    if oma_vm_id:
        vm = cs.get_virtual_machine(oma_vm_id)
        accounts = {a.get("name") for a in cs.list_accounts()}
        if vm is None:
            checks["account_match"] = Check("fail", f"the OMA VM {oma_vm_id} does not exist")
        elif vm.get("account") not in accounts:
            checks["account_match"] = Check("fail", f"the API key's account does not own the OMA VM "
                                            f"(VM account {quote(vm.get('account'))})")
        else:
            checks["account_match"] = Check("pass", f"the API key's account owns the OMA VM ({vm.get('account')})")
    else:
        checks["account_match"] = Check("skipped", "no OMA VM to compare with")
    if network_id:
        known = {n["id"] for n in cs.list_networks()}
        checks["network"] = (Check("pass", f"network {network_id} exists") if network_id in known
                             else Check("fail", f"network {network_id} does not exist"))
    else:
        checks["network"] = Check("warning", "no network chosen")
    statuses = {c.status for c in checks.values()}
    overall = "fail" if "fail" in statuses else "warning" if "warning" in statuses else "pass"
    return {"overall_status": overall, "checks": checks, "oma_vm_id": oma_vm_id}


def discover_all(cs: CloudStack, macs: list[str]) -> dict[str, Any]:
    """Everything an operator picks from, in one call. Zones are required; the rest is best effort."""
    zones = cs.list_zones()
    if not zones:
        raise FailedPrecondition("CloudStack has no zones")
    warnings: list[str] = []

    def attempt(name: str, call: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        try:
            return call()
        except DomainError as exc:
            warnings.append(f"{name}: {friendly_error(exc)}")
            return []

    oma = None
    try:
        oma = find_oma_vm(cs, macs)
    except DomainError as exc:
        warnings.append(f"OMA VM detection: {friendly_error(exc)}")
    if oma is None:
        warnings.append("the OMA VM was not found by MAC address")
    templates = [t for t in attempt("templates", cs.list_templates)
                 if t.get("isready") and int(t.get("size") or 0) < TEMPLATE_MAX_BYTES]
    return {
        "oma_vm_id": oma["vm_id"] if oma else "", "oma_vm_name": oma["vm_name"] if oma else "",
        "zones": zones, "templates": templates,
        "service_offerings": attempt("service offerings", cs.list_service_offerings),
        "disk_offerings": attempt("disk offerings", cs.list_disk_offerings),
        "networks": attempt("networks", cs.list_networks), "warnings": warnings,
    }


def network_lookup(box: SecretBox) -> Callable[[str], str | None] | None:
    """Validates a CloudStack network id against the active config; None when none is active."""
    config = cloudstack_config.active_config()
    if config is None:
        return None
    cs = cloudstack_config.client(config, box)
    return cs.network_name


def resolve_zone(cs: CloudStack, zone: str) -> tuple[str, str] | None:
    for z in cs.list_zones():
        if zone in (z["id"], z.get("name")):
            return z["id"], z.get("name", "")
    return None

