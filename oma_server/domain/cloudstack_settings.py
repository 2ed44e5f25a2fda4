"""CloudStack settings checks: test a connection (to CloudStack, or to a configuration's zone), find
the OMA's own VM, validate settings, discover the resources (zones, templates, offerings, networks) an
operator chooses from, and save the one-form ("streamlined") configuration.

Both RPC families that talk about CloudStack settings (OSSEAConfigService and
CloudStackSettingsService) call this module; their servicers only convert (one mapping to protos in
``services/cloudstack_messages.py``).

Checks report business failures as answers (``success=False`` with a sanitised reason); they never
echo keys. Only the optional ``persist`` of DetectOMAVM and :func:`save_streamlined` write.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from oma_server.db.models import OsseaConfig, utcnow
from oma_server.domain import cloudstack_config, text_rules
from oma_server.domain.crypto import SecretBox
from oma_server.domain.text_rules import quote
from oma_server.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound, Unavailable, require
from oma_server.integrations.cloudstack import (
    CloudStack,
    CloudStackError,
    DiskOffering,
    Endpoint,
    Network,
    ServiceOffering,
    Template,
    Zone,
    normalise_api_url,
)
from oma_server.integrations.host import local_mac_addresses

TEMPLATE_MAX_BYTES = 2 << 30  # larger templates would force a root disk bigger than the source
STREAMLINED_NAME = "production-ossea"  # the configuration SaveStreamlinedConfig creates, then updates
TEST_TIMEOUT_SECONDS = 15  # an operator waits on a connection test or a discovery
T = TypeVar("T")


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


def settings_client(url: str, api_key: str, secret_key: str, *, poll_interval: float) -> CloudStack:
    """A client for settings given in a request (not saved yet); bad settings are bad input."""
    return CloudStack(endpoint(url, api_key, secret_key), poll_interval=poll_interval, timeout=TEST_TIMEOUT_SECONDS)


def active_client(box: SecretBox) -> CloudStack:
    return cloudstack_config.client(cloudstack_config.require_active(), box)


def active_networks(box: SecretBox, zone_id: str = "") -> list[Network]:
    """The networks of the active configuration's CloudStack (of one zone when ``zone_id``)."""
    return active_client(box).list_networks(zone_id)


def active_service_offerings(box: SecretBox) -> list[ServiceOffering]:
    return active_client(box).list_service_offerings()


def resolve_network(box: SecretBox, name: str, zone_id: str = "") -> Network:
    require(name, "network_name is required")
    for network in active_networks(box, zone_id):
        if network.name == name:
            return network
    raise NotFound(f"no CloudStack network named {quote(name)}")


def test_connection(cs: CloudStack) -> tuple[bool, str, int]:
    try:
        zones = cs.list_zones()
    except DomainError as exc:
        return False, friendly_error(exc), 0
    return True, f"Connected to CloudStack. Found {len(zones)} zone(s).", len(zones)


@dataclass(frozen=True)
class ZoneTest:
    """The answer of testing a configuration: CloudStack reachable and its zone there."""

    success: bool
    message: str
    zone: str
    error: str = ""
    zone_id: str = ""
    zone_name: str = ""
    available_zones: list[str] = field(default_factory=list)
    tested_at: Any = None


def test_client(box: SecretBox, config_id: int, url: str = "", api_key: str = "", secret_key: str = "",
                zone: str = "", *, given: bool = False) -> tuple[CloudStack, str]:
    """The client and zone to test: the ``given`` settings, else the configuration ``config_id``
    (0: the active one)."""
    if given:
        return CloudStack(endpoint(url, api_key, secret_key), timeout=TEST_TIMEOUT_SECONDS), zone
    config = cloudstack_config.get(config_id) if config_id else cloudstack_config.require_active()
    return cloudstack_config.client(config, box, timeout=TEST_TIMEOUT_SECONDS), config.zone


def test_zone(cs: CloudStack, zone: str) -> ZoneTest:
    try:
        zones = cs.list_zones()
    except DomainError as exc:
        return ZoneTest(False, "connection failed", zone, error=friendly_error(exc), tested_at=utcnow())
    names = [z.name or z.id for z in zones]
    match = next((z for z in zones if z.matches(zone)), None)
    if match is None:
        return ZoneTest(False, f"zone {quote(zone)} not found", zone, error=f"zone {quote(zone)} not found",
                        available_zones=names, tested_at=utcnow())
    return ZoneTest(True, f"connected; zone {match.name} found", zone, zone_id=match.id, zone_name=match.name,
                    available_zones=names, tested_at=utcnow())


@dataclass(frozen=True)
class OmaVm:
    """The CloudStack VM the OMA runs in (found by one of this machine's MAC addresses)."""

    vm_id: str
    vm_name: str
    mac_address: str
    ip_address: str
    account: str


def find_oma_vm(cs: CloudStack, macs: list[str] | None = None) -> OmaVm | None:
    """The VM one of whose NICs has one of this machine's MAC addresses (``macs``: this host's)."""
    wanted = {m.lower() for m in (local_mac_addresses() if macs is None else macs)}
    for vm in cs.list_virtual_machines():
        for nic in vm.nics:
            if nic.mac_address.lower() in wanted:
                return OmaVm(vm_id=vm.id, vm_name=vm.display_name or vm.name, mac_address=nic.mac_address.lower(),
                             ip_address=nic.ip_address, account=vm.account)
    return None


def persist_oma_vm_id(vm_id: str) -> OsseaConfig:
    config = cloudstack_config.require_active()
    OsseaConfig.update(oma_vm_id=vm_id).where(OsseaConfig.id == config.id).execute()
    return OsseaConfig.get_by_id(config.id)


@dataclass(frozen=True)
class Detection:
    """The answer of DetectOMAVM: a failed detection is an answer, not an error."""

    success: bool
    message: str
    error: str = ""
    oma_info: OmaVm | None = None
    persisted: bool = False
    ossea_config_id: int = 0


def detect_oma_vm(cs: CloudStack, *, persist: bool) -> Detection:
    """Find the OMA's VM; with ``persist``, save its id in the active configuration."""
    try:
        found = find_oma_vm(cs)
    except DomainError as exc:
        return Detection(False, "detection failed", error=friendly_error(exc))
    if found is None:
        return Detection(False, "no CloudStack VM has a MAC address of this host", error="OMA VM not found")
    if not persist:
        return Detection(True, f"OMA VM detected: {found.vm_name}", oma_info=found)
    config = persist_oma_vm_id(found.vm_id)
    return Detection(True, f"OMA VM detected: {found.vm_name}", oma_info=found, persisted=True,
                     ossea_config_id=config.id)


@dataclass
class Check:
    status: str  # pass | warning | fail | skipped
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Validation:
    overall_status: str  # pass | warning | fail
    checks: dict[str, Check]  # oma_vm, compute_offering, account_match, network
    oma_vm_id: str


def validate(cs: CloudStack, macs: list[str] | None = None, *, oma_vm_id: str = "", service_offering_id: str = "",
             network_id: str = "") -> Validation:
    checks: dict[str, Check] = {}
    if oma_vm_id:
        checks["oma_vm"] = Check("pass", f"OMA VM {oma_vm_id} given")
    else:
        found = find_oma_vm(cs, macs)
        oma_vm_id = found.vm_id if found else ""
        checks["oma_vm"] = (Check("pass", f"OMA VM detected: {found.vm_name}", {"vm_id": oma_vm_id})
                            if found else Check("warning", "the OMA VM was not found by MAC address; set oma_vm_id"))
    if service_offering_id:
        offering = cs.find_service_offering(service_offering_id)
        if offering is None:
            checks["compute_offering"] = Check("fail", f"service offering {service_offering_id} does not exist")
        elif not offering.is_customized:
            checks["compute_offering"] = Check("fail", f"service offering {offering.name} is not customizable "
                                               "(CPU and memory must follow the source VM)")
        else:
            checks["compute_offering"] = Check("pass", f"service offering {offering.name} is customizable")
    else:
        checks["compute_offering"] = Check("warning", "no service offering chosen")
    if oma_vm_id:
        vm = cs.get_virtual_machine(oma_vm_id)
        accounts = {a.name for a in cs.list_accounts()}
        if vm is None:
            checks["account_match"] = Check("fail", f"the OMA VM {oma_vm_id} does not exist")
        elif vm.account not in accounts:
            checks["account_match"] = Check("fail", f"the API key's account does not own the OMA VM "
                                            f"(VM account {quote(vm.account)})")
        else:
            checks["account_match"] = Check("pass", f"the API key's account owns the OMA VM ({vm.account})")
    else:
        checks["account_match"] = Check("skipped", "no OMA VM to compare with")
    if network_id:
        known = {n.id for n in cs.list_networks()}
        checks["network"] = (Check("pass", f"network {network_id} exists") if network_id in known
                             else Check("fail", f"network {network_id} does not exist"))
    else:
        checks["network"] = Check("warning", "no network chosen")
    statuses = {c.status for c in checks.values()}
    overall = "fail" if "fail" in statuses else "warning" if "warning" in statuses else "pass"
    return Validation(overall, checks, oma_vm_id)


@dataclass(frozen=True)
class Discovery:
    """Everything an operator picks from when configuring CloudStack."""

    oma_vm_id: str
    oma_vm_name: str
    zones: list[Zone]
    templates: list[Template]
    service_offerings: list[ServiceOffering]
    disk_offerings: list[DiskOffering]
    networks: list[Network]
    warnings: list[str]


def discover_all(cs: CloudStack, macs: list[str] | None = None) -> Discovery:
    """Everything an operator picks from, in one call. Zones are required; the rest is best effort."""
    zones = cs.list_zones()
    if not zones:
        raise FailedPrecondition("CloudStack has no zones")
    warnings: list[str] = []

    def attempt(name: str, call: Callable[[], list[T]]) -> list[T]:
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
                 if t.is_ready and t.size_bytes < TEMPLATE_MAX_BYTES]
    return Discovery(
        oma_vm_id=oma.vm_id if oma else "", oma_vm_name=oma.vm_name if oma else "", zones=zones, templates=templates,
        service_offerings=attempt("service offerings", cs.list_service_offerings),
        disk_offerings=attempt("disk offerings", cs.list_disk_offerings),
        networks=attempt("networks", cs.list_networks), warnings=warnings,
    )


def discover_with_credentials(base_url: str, api_key: str, secret_key: str) -> Discovery:
    """Discovery for OSSEAConfigService.DiscoverResources: a failed connection is bad input there."""
    require(base_url and api_key and secret_key, "base_url, api_key and secret_key are required")
    cs = CloudStack(endpoint(base_url, api_key, secret_key, "base_url"), timeout=TEST_TIMEOUT_SECONDS)
    try:
        return discover_all(cs)
    except DomainError as exc:
        raise InvalidArgument(f"failed to connect to CloudStack: {friendly_error(exc)}") from None


def network_lookup(box: SecretBox) -> Callable[[str], str | None] | None:
    """Validates a CloudStack network id against the active config; None when none is active."""
    config = cloudstack_config.active_config()
    if config is None:
        return None
    cs = cloudstack_config.client(config, box)
    return cs.network_name


def resolve_zone(cs: CloudStack, zone: str) -> tuple[str, str] | None:
    found = cs.find_zone(zone)
    return (found.id, found.name) if found else None


#: SaveStreamlinedConfig's request fields that must not be empty
STREAMLINED_REQUIRED = ("base_url", "api_key", "secret_key", "zone_id", "disk_offering_id")


def save_streamlined(box: SecretBox, values: dict[str, str]) -> tuple[OsseaConfig, bool]:
    """Test the connection and the zone, then create or update (and activate) the configuration named
    ``production-ossea``. ``values`` holds the request's fields by name; returns (config, created)."""
    missing = [name for name in STREAMLINED_REQUIRED if not values.get(name)]
    if missing:
        raise InvalidArgument(f"missing required fields: {', '.join(missing)}")
    url = api_url(values["base_url"], "base_url")
    cs = CloudStack(Endpoint(url, values["api_key"], values["secret_key"]), timeout=TEST_TIMEOUT_SECONDS)
    try:
        zone = resolve_zone(cs, values["zone_id"])
    except DomainError as exc:
        raise InvalidArgument(f"CloudStack connection test failed: {friendly_error(exc)}") from None
    if zone is None:
        raise InvalidArgument(f"zone {quote(values['zone_id'])} does not exist in CloudStack")
    row = {"name": STREAMLINED_NAME, "api_url": url, "api_key": values["api_key"],
           "secret_key": values["secret_key"], "zone": zone[0],
           "domain": values.get("domain") or values.get("domain_name") or "",
           **{name: values.get(name) or "" for name in ("template_id", "service_offering_id", "disk_offering_id",
                                                        "network_id", "oma_vm_id")}}
    existing = OsseaConfig.get_or_none(OsseaConfig.name == STREAMLINED_NAME)
    if existing is None:
        return cloudstack_config.create(box, row), True
    cloudstack_config.update(box, existing.id, row)
    return cloudstack_config.activate(existing.id), False
