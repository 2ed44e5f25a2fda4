"""Changed Block Tracking per VM (docs/design/replication.md#vma-agent-operations): status and enabling. No gRPC, no pyVmomi.

Enabling: nothing to do when ``config.changeTrackingEnabled`` is already on. Refused while the VM has
snapshots (CBT would not be reliable on their delta disks). Otherwise reconfigure with
changeTrackingEnabled=true, then create and remove a snapshot ``cbt-init-<unix time>`` (no memory,
no quiesce): CBT only takes effect on the disks after a snapshot or power cycle. The per-disk result
comes from that snapshot's disks (their backings carry the first change ids).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vma_agent import errors

if TYPE_CHECKING:
    from vma_agent.integrations.vsphere import Disk, Session, VMHandle, VMRecord, VMRef

log = logging.getLogger(__name__)

ACTIVATION_PREFIX = "cbt-init-"


@dataclass
class DiskCBT:
    disk_id: str
    label: str
    active: bool
    change_id: str


@dataclass
class CBTStatus:
    enabled: bool
    vm_name: str
    vm_path: str
    power_state: str
    snapshot_count: int
    disks: list[DiskCBT] = field(default_factory=list)


@dataclass
class EnableResult:
    enabled: bool
    already_enabled: bool
    activation_snapshot: str
    message: str
    disks: list[DiskCBT] = field(default_factory=list)


def _disks(disks: list[Disk], labels: dict[int, str] | None = None) -> list[DiskCBT]:
    return [DiskCBT(f"disk-{d.key}", (labels or {}).get(d.key, d.label), bool(d.change_id), d.change_id)
            for d in sorted(disks, key=lambda d: d.key)]


def status_of(record: VMRecord) -> CBTStatus:
    return CBTStatus(record.cbt_enabled, record.name, record.path, record.power_state,
                     len(record.snapshots), _disks(record.disks))


def cbt_status(session: Session, ref: VMRef, *, datacenter: str = "") -> CBTStatus:
    vm = session.find_vm(ref, datacenter)
    return status_of(session.vm_record(vm))


def enable_cbt(session: Session, ref: VMRef | None = None, *, vm: VMHandle | None = None,
               datacenter: str = "", timeout_seconds: float = 600.0) -> EnableResult:
    """Turn CBT on for a VM (by reference or handle) and activate it on the disks."""
    if vm is None:
        if ref is None:
            raise errors.InvalidArgument("vm: a VM reference is required")
        vm = session.find_vm(ref, datacenter)
    record = session.vm_record(vm)
    name = record.name or vm.name
    if record.cbt_enabled:
        return EnableResult(True, True, "", f"CBT is already enabled on VM {name}", _disks(record.disks))
    if record.snapshots:
        names = ", ".join(s.name for s in record.snapshots)
        raise errors.FailedPrecondition(
            f"CBT cannot be enabled reliably while the VM has snapshots: {names}; remove them first "
            f"(VM {name} on vCenter {session.host})")

    session.set_change_tracking(vm, True, timeout_seconds)
    snap_name = f"{ACTIVATION_PREFIX}{int(time.time())}"
    snap = session.create_snapshot(vm, snap_name, "created by the VMA to activate changed block tracking",
                                   quiesce=False, memory=False, timeout=timeout_seconds)
    try:
        frozen = session.snapshot_disks(snap)
    finally:
        try:
            session.remove_snapshot(snap, consolidate=True, timeout=timeout_seconds)
        except errors.AgentError as exc:
            raise errors.FailedPrecondition(
                f"CBT was enabled on VM {name} but the activation snapshot {snap_name} could not be removed: "
                f"{exc.message}; remove it by hand") from None
    labels = {d.key: d.label for d in record.disks}
    disks = _disks(frozen, labels)
    inactive = [d.disk_id for d in disks if not d.active]
    message = f"CBT enabled on VM {name} and activated by snapshot {snap_name}"
    if inactive:
        message += f"; no change id yet on {', '.join(inactive)}"
    return EnableResult(True, False, snap_name, message, disks)
