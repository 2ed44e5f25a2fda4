"""Discovery: find VMs in vCenter through the VMA and put them under management.

Adding writes a vm_replication_contexts row and its vm_disks rows in one transaction per VM and never
a replication job. A VM that is already managed (same VMware id, or same name, in the same vCenter)
is reported as skipped, so adding the same set twice changes nothing. Every requested name gets an
outcome: added, skipped, not_found or failed. One inventory fetch serves a whole request.

Bad input (missing connection details, an unknown credential) and vCenter refusing the call leave the
database untouched; a successful add is recorded as a discovery job with its steps.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Sequence

from peewee import IntegrityError

from oma_server.db.database import database_proxy as db
from oma_server.db.models import (
    ContextStatus,
    JobCategory,
    JobTrackingStatus,
    JobType,
    VmDisk,
    VmReplicationContext,
    VmwareCredential,
    utcnow,
)
from oma_server.domain import cloudstack_config, credentials, joblog, text_rules
from oma_server.domain.crypto import SecretBox
from oma_server.errors import InvalidArgument, require
from oma_server.integrations.vcenter_login import VCenterLogin

CONTEXT_ID_MAX = 64


@dataclass
class VCenterSource:
    """Where to discover: a saved credential, or explicit connection details."""

    credential_id: int | None = None
    vcenter: str = ""
    username: str = ""
    password: str = field(default="", repr=False)  # never in logs or tracebacks
    datacenter: str = ""
    thumbprint: str = ""
    insecure: bool = False


def resolve_login(box: SecretBox, source: VCenterSource) -> VCenterLogin:
    """A saved credential is used exactly as saved (host, pin, password together): connection
    details next to a credential_id are refused rather than combined with its password."""
    if source.credential_id:
        mixed = [name for name in ("vcenter", "username", "password", "datacenter", "thumbprint", "insecure")
                 if getattr(source, name)]
        if mixed:
            raise InvalidArgument(
                f"give either credential_id or explicit connection details, not both (also given: {', '.join(mixed)}); "
                "a saved credential is only used with the host and certificate pin it was saved with"
            )
        return credentials.login_for(box, source.credential_id)
    missing = [name for name in ("vcenter", "username", "password", "datacenter") if not getattr(source, name)]
    if missing:
        raise InvalidArgument(
            f"give a credential_id, or all of vcenter, username, password and datacenter (missing: {', '.join(missing)})"
        )
    vcenter = text_rules.host_port(source.vcenter, "vcenter")
    username = text_rules.name(source.username, VmwareCredential.username)
    datacenter = text_rules.name(source.datacenter, VmwareCredential.datacenter)
    return VCenterLogin(None, vcenter, username, source.password, datacenter,
                        text_rules.name(source.thumbprint, VmwareCredential.tls_thumbprint, "thumbprint"),
                        source.insecure)


@dataclass
class Inventory:
    vcenter_host: str
    datacenter: str
    vms: list[Any]  # vma.v1.VirtualMachine
    elapsed_ms: int

    def by_name(self) -> dict[str, Any]:
        return {vm.name.lower(): vm for vm in self.vms}


def fetch_inventory(vma: Any, login: VCenterLogin, *, filter: str = "", names: Sequence[str] = (),
                    read_only: bool = False) -> Inventory:
    """The inventory through the VMA. A saved credential's use is recorded unless ``read_only``
    (PreviewDiscovery writes nothing at all)."""
    started = time.monotonic()
    response = vma.discover(login, filter=filter, names=tuple(names))
    if not read_only:
        credentials.record_use(login.credential_id)
    return Inventory(response.vcenter_host or login.host, response.datacenter or login.datacenter,
                     list(response.vms), int((time.monotonic() - started) * 1000))


def existing_contexts(vcenter_host: str, vms: Iterable[Any]) -> dict[str, str]:
    """VM id → context id of the VMs already managed in this vCenter (by VMware id, else by name)."""
    vms = list(vms)
    if not vms:
        return {}
    rows = list(VmReplicationContext.select(
        VmReplicationContext.context_id, VmReplicationContext.vmware_vm_id, VmReplicationContext.vm_name,
    ).where(VmReplicationContext.vcenter_host == vcenter_host))
    by_uuid = {r.vmware_vm_id: r.context_id for r in rows}
    by_name = {r.vm_name: r.context_id for r in rows}
    found = {}
    for vm in vms:
        context_id = by_uuid.get(vm.id) or by_name.get(vm.name)
        if context_id:
            found[vm.id] = context_id
    return found


def new_context_id(vm_name: str) -> str:
    """``ctx-<name>-<UTC timestamp>-<random>``: readable like the original, collision-safe (docs/design/data-model.md#identifiers)."""
    stamp = utcnow().strftime("%Y%m%d-%H%M%S")
    suffix = secrets.token_hex(3)
    room = CONTEXT_ID_MAX - len(f"ctx--{stamp}-{suffix}")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in vm_name)[:room]
    return f"ctx-{safe}-{stamp}-{suffix}"


def _nic_config(vm: Any) -> list[dict[str, Any]]:
    return [{"label": n.label, "network_name": n.network_name, "mac_address": n.mac_address,
             "adapter_type": n.adapter_type, "connected": n.connected} for n in vm.networks]


def disk_rows(context_id: str, vm: Any) -> list[dict[str, Any]]:
    """vm_disks rows for a discovered VM (the VM's hardware facts are copied onto every disk row, as the original)."""
    nics = _nic_config(vm)
    return [{
        "vm_context": context_id, "job": None, "disk_id": d.id, "vmdk_path": d.vmdk_path,
        "size_gb": d.size_gb, "capacity_bytes": d.capacity_bytes, "datastore": d.datastore, "label": d.label,
        "unit_number": d.unit_number, "provisioning_type": d.provisioning_type or "unknown",
        "cpu_count": vm.num_cpu, "memory_mb": vm.memory_mb, "os_type": vm.guest_os or "unknown",
        "vm_tools_version": vm.tools_version, "display_name": vm.name, "power_state": vm.power_state,
        "vmware_uuid": vm.id, "network_config": nics, "annotation": vm.annotation or None,
    } for d in vm.disks]


def create_context(vm: Any, inventory: Inventory, *, credential_id: int | None, ossea_config_id: int | None) -> str:
    """Context + disks of one discovered VM, in one transaction. Returns the context id."""
    context_id = new_context_id(vm.name)
    now = utcnow()
    with db.atomic():
        VmReplicationContext.create(
            context_id=context_id, vm_name=vm.name, vmware_vm_id=vm.id, vm_path=vm.path,
            vcenter_host=inventory.vcenter_host, datacenter=vm.datacenter or inventory.datacenter,
            current_status=ContextStatus.DISCOVERED, cpu_count=vm.num_cpu, memory_mb=vm.memory_mb,
            os_type=vm.guest_os or "unknown", power_state=vm.power_state, vm_tools_version=vm.tools_version,
            auto_added=True, scheduler_enabled=True, credential=credential_id, ossea_config_id=ossea_config_id,
            created_at=now, last_status_change=now,
        )
        rows = disk_rows(context_id, vm)
        if rows:
            VmDisk.insert_many(rows).execute()
    return context_id


@dataclass
class ProcessedVM:
    vm_name: str
    outcome: str  # added | skipped | not_found | failed
    context_id: str = ""
    existing_context_id: str = ""
    vm_path: str = ""
    reason: str = ""
    vm: Any = None


@dataclass
class AddResult:
    processed: list[ProcessedVM] = field(default_factory=list)
    tracking_job_id: str = ""
    added_at: datetime = field(default_factory=utcnow)
    discovery_ms: int = 0
    processing_ms: int = 0

    def count(self, outcome: str) -> int:
        return sum(1 for p in self.processed if p.outcome == outcome)

    @property
    def success(self) -> bool:
        return not (self.count("failed") or self.count("not_found"))

    @property
    def message(self) -> str:
        return (f"{self.count('added')} added, {self.count('skipped')} already managed, "
                f"{self.count('not_found')} not found, {self.count('failed')} failed")


def add_vms(inventory: Inventory, names: Sequence[str], *, login: VCenterLogin, added_by: str,
            operation: str = "bulk-add-vms") -> AddResult:
    """Add the named VMs of an inventory to management (see the module docstring)."""
    wanted = [n.strip() for n in names if n.strip()]
    require(wanted, "name at least one VM to add")
    result = AddResult(discovery_ms=inventory.elapsed_ms)
    started = time.monotonic()
    job_id = joblog.start_job(
        JobType.DISCOVERY, operation, owner=added_by, category=JobCategory.DISCOVERY, expected_steps=2,
        metadata={"added_by": added_by, "vcenter_host": inventory.vcenter_host,
                  "datacenter": inventory.datacenter, "requested": wanted, "credential_id": login.credential_id},
    )
    result.tracking_job_id = job_id
    with joblog.step(job_id, "vma-discovery") as step:
        step.details.update(vms_in_inventory=len(inventory.vms), elapsed_ms=inventory.elapsed_ms)
    try:
        with joblog.step(job_id, "add-contexts") as step:
            by_name = inventory.by_name()
            existing = existing_contexts(inventory.vcenter_host, by_name.values())
            ossea_config_id = cloudstack_config.active_config_id()
            for name in dict.fromkeys(wanted):  # keep order, drop repeats
                vm = by_name.get(name.lower())
                if vm is None:
                    result.processed.append(ProcessedVM(name, "not_found", reason="no VM with this name in vCenter"))
                    continue
                if vm.id in existing:
                    result.processed.append(ProcessedVM(vm.name, "skipped", existing_context_id=existing[vm.id],
                                                        vm_path=vm.path, reason="VM context already exists", vm=vm))
                    continue
                try:
                    context_id = create_context(vm, inventory, credential_id=login.credential_id,
                                                ossea_config_id=ossea_config_id)
                except IntegrityError:
                    # Added meanwhile by a concurrent request: the unique keys keep it single.
                    again = existing_contexts(inventory.vcenter_host, [vm]).get(vm.id, "")
                    outcome = ProcessedVM(vm.name, "skipped" if again else "failed", existing_context_id=again,
                                          vm_path=vm.path, vm=vm,
                                          reason="VM context already exists" if again else "could not be stored")
                    result.processed.append(outcome)
                    continue
                existing[vm.id] = context_id
                result.processed.append(ProcessedVM(vm.name, "added", context_id=context_id, vm_path=vm.path, vm=vm))
            step.details.update({o: result.count(o) for o in ("added", "skipped", "not_found", "failed")})
    except joblog.StepFailed as exc:
        joblog.end_job(job_id, JobTrackingStatus.FAILED, exc.message)
        raise exc.cause from None
    joblog.end_job(job_id, JobTrackingStatus.COMPLETED if result.success else JobTrackingStatus.FAILED,
                   None if result.success else result.message)
    result.processing_ms = int((time.monotonic() - started) * 1000)
    return result

