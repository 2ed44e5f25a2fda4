"""Where a context's replica volumes are (docs/design/failover.md#volume-placement), and the small database helpers of the failover family.

:class:`Placement` moves volumes between the OMA and a destination VM, keeping device_mappings,
nbd_exports and ossea_volumes in step with CloudStack; every mutation looks at CloudStack first, so
repeating it is safe. The helpers below it set the context status, lock/unlock mappings and track
per-volume snapshots.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from oma_server.db.database import database_proxy as db
from oma_server.db.models import (
    ContextStatus,
    DeviceMapping,
    DeviceOperationMode,
    JobTracking,
    OsseaConfig,
    OsseaVolume,
    OsseaVolumeStatus,
    SnapshotStatus,
    VmDisk,
    VmReplicationContext,
    utcnow,
)
from oma_server.domain import volumes
from oma_server.errors import NotFound
from oma_server.integrations.cloudstack import CloudStackError, Volume
from oma_server.workflows.error_rules import VolumeMoveFailed

if TYPE_CHECKING:
    from oma_server.workflows.failover_common import FlowBase

log = logging.getLogger("oma_server.failover")


class Placement:
    """Moves a context's replica volumes between the OMA and a destination VM, keeping
    device_mappings, nbd_exports and ossea_volumes in step with CloudStack. Every mutation first
    looks at CloudStack's state, so repeating it is safe."""

    def __init__(self, flow: FlowBase, config: OsseaConfig):
        self.settings, self.config = flow.settings, config
        self.oma_vm_id = config.oma_vm_id or ""
        self.cs = flow.cs(config, flow.settings.failover_volume_timeout_seconds)
        self.exports = flow.exports

    def remote(self, volume: OsseaVolume) -> Volume | None:
        return self.cs.get_volume(volume.volume_id)

    def location(self, volume: OsseaVolume) -> str | None:
        """The CloudStack VM the volume is attached to (None = detached); NotFound if it is gone."""
        remote = self.remote(volume)
        if remote is None:
            raise NotFound(f"replica volume {volume.volume_id} ({volume.volume_name}) no longer exists in CloudStack")
        return remote.virtual_machine_id

    def detach(self, volume: OsseaVolume) -> str | None:
        """Detach from wherever it is attached (the OMA: its NBD export is stopped first); the mapping
        row goes (DETACHED has none). Returns the VM it was attached to."""
        attached_to = self.location(volume)
        if attached_to is None or attached_to == self.oma_vm_id:
            self.exports.remove(volumes.export_name(volume.volume_id))
        if attached_to:
            self.cs.detach_volume(volume.volume_id)
            log.info("volume %s detached from VM %s", volume.volume_id, attached_to)
        with db.atomic():
            DeviceMapping.delete().where(DeviceMapping.volume_uuid == volume.volume_id).execute()
            OsseaVolume.update(status=OsseaVolumeStatus.DETACHED, device_path=None).where(
                OsseaVolume.id == volume.id).execute()
        return attached_to

    def attach_to(self, volume: OsseaVolume, vm_id: str, device_id: int | None) -> DeviceMapping:
        """Attach to a destination VM (device 0 = root) and record the mapping with a placeholder
        device path unique per volume (``remote-vm-<vm>-<volume>``)."""
        remote = self.remote(volume)
        if remote is None:
            raise NotFound(f"replica volume {volume.volume_id} no longer exists in CloudStack")
        attached_to = remote.virtual_machine_id
        if attached_to and attached_to != vm_id:
            raise VolumeMoveFailed(f"volume {volume.volume_id} is attached to VM {attached_to}; detach it first")
        if not attached_to:
            remote = self.cs.attach_volume(volume.volume_id, vm_id, device_id)
            log.info("volume %s attached to VM %s as device %s", volume.volume_id, vm_id, remote.device_id)
        values = {
            "vm_context": volume.vm_context_id, "volume_id_numeric": volume.id, "vm_id": vm_id,
            "operation_mode": DeviceOperationMode.FAILOVER, "cloudstack_device_id": remote.device_id,
            "requires_device_correlation": False, "device_path": f"remote-vm-{vm_id}-{volume.volume_id}",
            "cloudstack_state": "attached", "linux_state": "n/a",
            "size": remote.size_bytes or volume.size_gb * volumes.GIB, "last_sync": utcnow(),
        }
        with db.atomic():
            if DeviceMapping.select().where(DeviceMapping.volume_uuid == volume.volume_id).exists():
                DeviceMapping.update(values).where(DeviceMapping.volume_uuid == volume.volume_id).execute()
            else:
                DeviceMapping.create(volume_uuid=volume.volume_id, **values)
            OsseaVolume.update(status=OsseaVolumeStatus.ATTACHED, device_path=None).where(
                OsseaVolume.id == volume.id).execute()
        return DeviceMapping.get(DeviceMapping.volume_uuid == volume.volume_id)

    def to_oma(self, volume: OsseaVolume) -> DeviceMapping:
        """Attached to the OMA (unless it is already), device found, mapping ``oma``, NBD export served."""
        s = self.settings
        mapping = volumes.attach(self.cs, self.config, volume, device_dir=s.device_dir, wait_seconds=s.device_wait_seconds)
        disk = VmDisk.get_or_none(VmDisk.ossea_volume_id == volume.id)
        if disk is not None:
            volumes.export(self.exports, mapping, disk, disk.job_id)
        return mapping

    def remove_template_root(self, vm_id: str, keep: set[str]) -> list[str]:
        """Detach and delete the ROOT disk the template gave the new VM (not a replica volume)."""
        removed = []
        for remote in self.cs.list_volumes(virtualmachineid=vm_id):
            if remote.type == "ROOT" and remote.id not in keep:
                self.cs.detach_volume(remote.id)
                self.cs.delete_volume(remote.id)
                removed.append(remote.id)
        return removed

    def volumes_on(self, vm_id: str, candidates: list[OsseaVolume]) -> list[OsseaVolume]:
        """Context volumes CloudStack reports attached to ``vm_id`` plus those whose mapping says so."""
        try:
            remote_ids = {v.id for v in self.cs.list_volumes(virtualmachineid=vm_id)}
        except CloudStackError as exc:
            if exc.cs_code != 431:
                raise
            remote_ids = set()  # the VM is gone
        mapped = {m.volume_uuid for m in DeviceMapping.select(DeviceMapping.volume_uuid).where(DeviceMapping.vm_id == vm_id)}
        return [v for v in candidates if v.volume_id in remote_ids or v.volume_id in mapped]


def context_volumes(context_id: str) -> list[OsseaVolume]:
    return list(OsseaVolume.select().where(OsseaVolume.vm_context == context_id).order_by(OsseaVolume.id))


def clear_tracking(volume: OsseaVolume) -> None:
    OsseaVolume.update(snapshot_id=None, snapshot_created_at=None, snapshot_status=SnapshotStatus.NONE).where(
        OsseaVolume.id == volume.id).execute()


def tracked_snapshot(volume: OsseaVolume) -> str:
    """The tracked snapshot id ('' is read as NULL, as the original wrote it)."""
    return (volume.snapshot_id or "").strip()


# --- database helpers the failover family shares --------------------------------------------------------------------------------

def set_context_status(context_id: str, status: ContextStatus) -> ContextStatus:
    """Move a context in a failover state (or ready) to ``status``; replication states are left alone."""
    allowed = [ContextStatus.FAILED_OVER_TEST, ContextStatus.FAILED_OVER_LIVE, ContextStatus.CLEANUP_REQUIRED,
               ContextStatus.READY_FOR_FAILOVER]
    VmReplicationContext.update(current_status=status, last_status_change=utcnow()).where(
        VmReplicationContext.context_id == context_id, VmReplicationContext.current_status.in_(allowed),
        VmReplicationContext.current_status != status).execute()
    ctx = VmReplicationContext.get_or_none(VmReplicationContext.context_id == context_id)
    return ctx.current_status if ctx else status


def unlock_mappings(context_id: str, oma_vm_id: str) -> int:
    return DeviceMapping.update(operation_mode=DeviceOperationMode.OMA).where(
        DeviceMapping.vm_context == context_id, DeviceMapping.vm_id == oma_vm_id,
        DeviceMapping.operation_mode == DeviceOperationMode.FAILOVER).execute()


def tracked_volumes(context_id: str) -> list[OsseaVolume]:
    return [v for v in context_volumes(context_id)
            if tracked_snapshot(v) or v.snapshot_status not in (SnapshotStatus.NONE, None)]


def force_full_resync(volume: OsseaVolume) -> None:
    """The replica can no longer be trusted block for block: forget the change id, the next copy is full."""
    VmDisk.update(disk_change_id=None).where(VmDisk.ossea_volume_id == volume.id).execute()
    log.warning("volume %s could not be reverted; its disk's change id is cleared (next sync is full)", volume.volume_id)


def merge_job_metadata(job_id: str, values: dict[str, Any]) -> None:
    job = JobTracking.get_or_none(JobTracking.id == job_id)
    if job is not None:
        JobTracking.update(metadata={**(job.metadata or {}), **values}).where(JobTracking.id == job_id).execute()


