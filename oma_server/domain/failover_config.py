"""What a failover request resolves to (docs/design/failover.md#request-and-configuration), in one place for StartFailover, StartLiveFailover,
StartTestFailover and ValidatePreflightConfig — so a request that passes pre-flight never fails
resolution and the other way round — plus the pre-flight descriptors and the rollback
confirmation question (same section).

Resolution rules (Required wins over Original):

* ``context_id``, ``vmware_vm_id``, ``vm_name`` and ``failover_type`` are required, and the VMware id and
  name must be the context's (one identity, resolved once).
* Defaults — live: exact name, production networks, power off the source, final sync; test: name
  ``<vm>-test-<unix>``, isolated networks, source untouched, ``test_duration`` 2h. Volume snapshots
  (``cloudstack``) always.
* A live failover must power the source off (two running copies of one machine is never what a live
  failover means); a test failover must neither power it off nor final-sync.
* ``network_strategy`` given: ``live``→production, ``test``→isolated, ``production``, ``isolated``,
  ``custom``; not given: derived from the VM's mappings (test and production kinds → custom, only
  test → isolated, only production → production) when that suits the type, else the type default.
  Live allows production/custom, test isolated/custom; custom needs at least one mapping.
* The resolved network map (source network → CloudStack network id): the request's ``network_mappings``
  win per source network; otherwise the VM's mapping of the strategy's kind (custom: the type's kind
  first, then the other).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from oma_server.db.models import FailoverJobType, NetworkMapping, VmReplicationContext, utcnow
from oma_server.domain import network_mappings as mappings_domain
from oma_server.domain.text_rules import quote
from oma_server.errors import InvalidArgument, NotFound

VERSION = "1.0"
TEST_DURATION_PATTERN = r"^[0-9]+[hm]$"
_TEST_DURATION = re.compile(TEST_DURATION_PATTERN)
DEFAULT_TEST_DURATION = "2h"
HOSTNAME_MAX = 63
_TEST_WORDS = ("test", "lab", "dev", "staging", "isolated")
_STRATEGY_ALIASES = {"live": "production", "test": "isolated", "production": "production",
                     "isolated": "isolated", "custom": "custom"}
_ALLOWED_STRATEGIES = {"live": ("production", "custom"), "test": ("isolated", "custom")}
_NAMING = ("exact", "suffixed")
_REQUIRED_NAMING = {"live": "exact", "test": "suffixed"}
_DEFAULT_STRATEGY = {"live": "production", "test": "isolated"}


@dataclass
class FailoverRequest:
    """A StartFailover request as the domain sees it (absent optional booleans are None)."""

    context_id: str = ""
    vmware_vm_id: str = ""
    vm_name: str = ""
    failover_type: str = ""
    power_off_source: bool | None = None
    perform_final_sync: bool | None = None
    skip_validation: bool | None = None
    skip_virtio: bool | None = None
    network_strategy: str = ""
    vm_naming: str = ""
    test_duration: str = ""
    auto_cleanup: bool | None = None
    custom_config: dict[str, Any] = field(default_factory=dict)
    network_mappings: dict[str, str] = field(default_factory=dict)
    notification_config: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""


@dataclass
class FailoverConfig:
    """The resolved configuration (fields of the FailoverConfiguration message)."""

    failover_type: str
    vm_name: str
    destination_name: str
    destination_hostname: str
    vm_naming: str
    network_strategy: str
    snapshot_type: str
    power_off_source: bool
    perform_final_sync: bool
    cleanup_enabled: bool
    skip_validation: bool
    skip_virtio: bool
    snapshot_name: str
    test_duration: str
    auto_cleanup: bool
    network_mappings: dict[str, str]
    # Not part of the message, carried with the job.
    context_id: str = ""
    vmware_vm_id: str = ""
    unmapped_networks: list[str] = field(default_factory=list)

    def message_fields(self) -> dict[str, Any]:
        values = asdict(self)
        for key in ("context_id", "vmware_vm_id", "unmapped_networks"):
            values.pop(key)
        return values

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Checked:
    errors: list[str]
    config: FailoverConfig | None
    context: VmReplicationContext | None


def sanitize_hostname(name: str, limit: int = HOSTNAME_MAX) -> str:
    """CloudStack host name: lower case, ``[a-z0-9-]`` (others → ``-``), no repeated/edge ``-``,
    ``vm-`` before a leading digit, at most ``limit`` characters; ``test-vm`` when nothing is left."""
    text = re.sub(r"[^a-z0-9-]", "-", name.lower())
    text = re.sub(r"-+", "-", text).strip("-")
    if text and text[0].isdigit():
        text = "vm-" + text
    text = text[:limit].rstrip("-")
    return text or "test-vm"


def destination_names(vm_name: str, naming: str, now: datetime) -> tuple[str, str]:
    """(display name, CloudStack host name). Suffixed names keep their ``-test-<unix>`` suffix whole."""
    if naming == "exact":
        return vm_name, sanitize_hostname(vm_name)
    suffix = f"-test-{int(now.timestamp())}"
    base = sanitize_hostname(vm_name, HOSTNAME_MAX - len(suffix))
    return f"{vm_name}{suffix}", f"{base}{suffix}"


def is_test_mapping(mapping: NetworkMapping) -> bool:
    if mapping.is_test_network:
        return True
    text = f"{mapping.destination_network_id} {mapping.destination_network_name}".lower()
    return any(word in text for word in _TEST_WORDS)


def _derived_strategy(failover_type: str, rows: list[NetworkMapping]) -> str:
    kinds = {is_test_mapping(m) for m in rows}
    if kinds == {True, False}:
        derived = "custom"
    elif kinds == {True}:
        derived = "isolated"
    elif kinds == {False}:
        derived = "production"
    else:
        derived = _DEFAULT_STRATEGY[failover_type]
    return derived if derived in _ALLOWED_STRATEGIES[failover_type] else _DEFAULT_STRATEGY[failover_type]


def resolve_networks(failover_type: str, strategy: str, sources: list[str], rows: list[NetworkMapping],
                     overrides: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Source network → destination network id, and the source networks left without one."""
    by_kind: dict[tuple[str, bool], NetworkMapping] = {}
    for m in rows:
        by_kind.setdefault((m.source_network_name, bool(m.is_test_network)), m)
    if strategy == "production":
        order = (False,)
    elif strategy == "isolated":
        order = (True,)
    else:
        order = (failover_type == "test", failover_type != "test")
    resolved: dict[str, str] = {}
    names = list(dict.fromkeys([*sources, *overrides]))
    for name in names:
        if overrides.get(name):
            resolved[name] = overrides[name]
            continue
        for test_kind in order:
            m = by_kind.get((name, test_kind))
            if m is not None:
                resolved[name] = m.destination_network_id
                break
    return resolved, [n for n in sources if n not in resolved]


def check(request: FailoverRequest, *, now: datetime | None = None) -> Checked:
    """Every problem of the request (empty list = valid) and, when valid, the configuration."""
    now = now or utcnow()
    errors: list[str] = []
    for name in ("context_id", "vmware_vm_id", "vm_name"):
        if not getattr(request, name).strip():
            errors.append(f"{name} is required")
    kind = request.failover_type
    if kind not in set(FailoverJobType):
        errors.append(f"failover_type must be 'live' or 'test' (got {quote(kind)})")
        kind = ""
    ctx = None
    if request.context_id.strip():
        ctx = VmReplicationContext.get_or_none(VmReplicationContext.context_id == request.context_id)
        if ctx is None:
            errors.append(f"no VM context {quote(request.context_id)}")
        else:
            if request.vmware_vm_id and request.vmware_vm_id != ctx.vmware_vm_id:
                errors.append(f"vmware_vm_id {quote(request.vmware_vm_id)} is not the VMware id of context "
                              f"{ctx.context_id} ({ctx.vmware_vm_id})")
            if request.vm_name and request.vm_name != ctx.vm_name:
                errors.append(f"vm_name {quote(request.vm_name)} is not the name of context {ctx.context_id} "
                              f"({quote(ctx.vm_name)})")
    strategy_in = request.network_strategy
    if strategy_in and strategy_in not in _STRATEGY_ALIASES:
        errors.append(f"network_strategy must be one of {', '.join(_STRATEGY_ALIASES)} (got {quote(strategy_in)})")
    if request.vm_naming and request.vm_naming not in _NAMING:
        errors.append(f"vm_naming must be 'exact' or 'suffixed' (got {quote(request.vm_naming)})")
    if request.test_duration and not _TEST_DURATION.match(request.test_duration):
        errors.append(f"test_duration must match {TEST_DURATION_PATTERN} (e.g. '2h', '90m'; got "
                      f"{quote(request.test_duration)})")
    for source, target in request.network_mappings.items():
        if not source.strip() or not target.strip():
            errors.append("network_mappings needs a source network name and a destination network id per entry")
            break
    if kind == "live":
        if request.power_off_source is False:
            errors.append("a live failover powers the source VM off (power_off_source cannot be false)")
        if request.test_duration:
            errors.append("test_duration applies to test failovers only")
        if request.auto_cleanup:
            errors.append("auto_cleanup applies to test failovers only")
    elif kind == "test":
        if request.power_off_source:
            errors.append("a test failover leaves the source VM running (power_off_source must be false)")
        if request.perform_final_sync:
            errors.append("a test failover does not final-sync (perform_final_sync must be false)")

    rows: list[NetworkMapping] = []
    sources: list[str] = []
    if ctx is not None:
        rows = list(NetworkMapping.select().where(NetworkMapping.vm_context == ctx.context_id)
                    .order_by(NetworkMapping.source_network_name, NetworkMapping.is_test_network))
        sources = mappings_domain.source_networks(ctx.context_id)
    config = None
    if kind:
        naming = request.vm_naming or _REQUIRED_NAMING[kind]
        if naming != _REQUIRED_NAMING[kind]:
            errors.append(f"a {kind} failover names the destination VM {quote(_REQUIRED_NAMING[kind])} (got {quote(naming)})")
        if strategy_in in _STRATEGY_ALIASES:
            strategy = _STRATEGY_ALIASES[strategy_in]
        else:
            strategy = _derived_strategy(kind, rows)
        if strategy_in in _STRATEGY_ALIASES and strategy not in _ALLOWED_STRATEGIES[kind]:
            errors.append(f"a {kind} failover uses network strategy "
                          f"{' or '.join(_ALLOWED_STRATEGIES[kind])} (got {quote(strategy_in)})")
        if strategy == "custom" and not rows and not request.network_mappings and ctx is not None:
            errors.append("network_strategy 'custom' needs at least one network mapping for the VM")
        if not errors:
            vm_name = ctx.vm_name if ctx is not None else request.vm_name
            display, hostname = destination_names(vm_name, naming, now)
            resolved, unmapped = resolve_networks(kind, strategy, sources, rows, dict(request.network_mappings))
            config = FailoverConfig(
                failover_type=kind, vm_name=vm_name, destination_name=display, destination_hostname=hostname,
                vm_naming=naming, network_strategy=strategy, snapshot_type="cloudstack",
                power_off_source=kind == "live",
                perform_final_sync=(request.perform_final_sync if request.perform_final_sync is not None
                                    else True) if kind == "live" else False,
                cleanup_enabled=True, skip_validation=bool(request.skip_validation),
                skip_virtio=bool(request.skip_virtio),
                snapshot_name=f"{kind}-failover-{vm_name}-{int(now.timestamp())}",
                test_duration=(request.test_duration or DEFAULT_TEST_DURATION) if kind == "test" else "",
                auto_cleanup=bool(request.auto_cleanup) if kind == "test" else False,
                network_mappings=resolved, context_id=ctx.context_id if ctx else request.context_id,
                vmware_vm_id=request.vmware_vm_id, unmapped_networks=unmapped,
            )
    return Checked(errors, config, ctx)


def resolve(request: FailoverRequest, *, now: datetime | None = None) -> tuple[FailoverConfig, VmReplicationContext]:
    """The configuration a Start RPC uses; NOT_FOUND for an unknown context, INVALID_ARGUMENT listing
    every other problem."""
    checked = check(request, now=now)
    if request.context_id.strip() and checked.context is None:
        raise NotFound(f"no VM context {quote(request.context_id)}")
    if checked.errors:
        raise InvalidArgument("; ".join(checked.errors))
    assert checked.config is not None and checked.context is not None
    return checked.config, checked.context


def duration_seconds(text: str) -> int:
    """``2h`` → 7200, ``90m`` → 5400 (the pattern is validated by :func:`check`)."""
    value, unit = int(text[:-1]), text[-1]
    return value * (3600 if unit == "h" else 60)


# --- pre-flight descriptors and the rollback question ----------------------------------------------

def _option(default: Any, description: str, *, required: bool = False, options: tuple[str, ...] = (),
            pattern: str = "") -> dict[str, Any]:
    return {"default_value": default, "required": required, "description": description,
            "type": "boolean" if isinstance(default, bool) else "string",
            "options": list(options), "pattern": pattern}


def preflight_options(failover_type: str) -> dict[str, dict[str, Any]]:
    """Per-option descriptors of a live or test failover (docs/design/failover.md#request-and-configuration)."""
    if failover_type not in set(FailoverJobType):
        raise InvalidArgument(f"failover_type must be 'live' or 'test' (got {quote(failover_type)})")
    if failover_type == "live":
        options = {
            "power_off_source": _option(True, "Power off the source VM before the final sync", required=True),
            "perform_final_sync": _option(True, "Copy the last changes after the source is off"),
            "network_strategy": _option("live", "Destination networks: the VM's live mappings, or custom",
                                        options=("live", "custom")),
            "vm_naming": _option("exact", "The destination VM keeps the source VM's name",
                                 options=("exact", "suffixed")),
        }
    else:
        options = {
            "test_duration": _option(DEFAULT_TEST_DURATION, "How long the test VM runs before automatic cleanup "
                                     "(when auto_cleanup is set)", pattern=TEST_DURATION_PATTERN),
            "network_strategy": _option("test", "Destination networks: the VM's test mappings, or custom",
                                        options=("test", "custom")),
            "vm_naming": _option("suffixed", "The test VM is named <vm>-test-<unix time>",
                                 options=("exact", "suffixed")),
        }
    options["skip_validation"] = _option(False, "Skip the readiness checks")
    options["skip_virtio"] = _option(False, "Skip VirtIO driver injection (Windows VMs)")
    return options


def rollback_decision(failover_type: str) -> dict[str, Any]:
    if failover_type == "live":
        return {"decision_id": "live-rollback-power-on",
                "question": "Power on the source VM after rolling back the live failover? The destination VM "
                            "is destroyed and its writes are discarded.",
                "options": ["Yes, power on source VM", "No, leave powered off"],
                "default_value": "Yes, power on source VM", "required": True}
    if failover_type == "test":
        return {"decision_id": "test-cleanup-confirmation",
                "question": "End the test failover? The test VM is destroyed and the replica volumes are reverted.",
                "options": ["Yes, proceed with cleanup", "Cancel"],
                "default_value": "Yes, proceed with cleanup", "required": True}
    return {"decision_id": "generic-rollback", "question": "Proceed with the rollback?", "options": ["Yes", "No"],
            "default_value": "Yes", "required": True}
