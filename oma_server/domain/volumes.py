"""Replica volumes: CloudStack volumes that receive a VM's disks, attached to the OMA VM and exported
over NBD (ossea_volumes, device_mappings, nbd_exports).

A disk reuses its own replica volume (vm_disks.ossea_volume_id) when it still exists and is large
enough (sizes compared in bytes; a grown source disk grows the volume). A newly created volume clears
the disk's change id, so the next copy of that disk is full: an incremental copy into a blank target
is impossible by construction. After attaching, the device is found by the volume's id (on KVM
``<device_dir>/virtio-<first 20 hex of the uuid>``), never by guessing the newest device.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from oma_server.db.database import database_proxy as db
from oma_server.db.models import (
    DeviceMapping,
    DeviceOperationMode,
    NbdExport,
    NbdExportStatus,
    OsseaConfig,
    OsseaVolume,
    OsseaVolumeStatus,
    VmDisk,
    VmReplicationContext,
    utcnow,
)
from oma_server.domain.text_rules import quote
from oma_server.errors import DeadlineExceeded, FailedPrecondition
from oma_server.integrations.cloudstack import CloudStack
from oma_server.integrations.nbd_exports import Export, ExportManager

log = logging.getLogger("oma_server.volumes")
GIB = 1 << 30


def replicas_of(disks) -> dict[int, OsseaVolume]:
    """ossea_volumes.id → row, for the replica volumes of these disks (one query)."""
    ids = [d.ossea_volume_id for d in disks if d.ossea_volume_id]
    return {v.id: v for v in OsseaVolume.select().where(OsseaVolume.id.in_(ids))} if ids else {}


def device_name(volume_uuid: str) -> str:
    """What KVM guests see for a CloudStack volume: the disk serial is the uuid without dashes, cut to 20."""
    return "virtio-" + volume_uuid.replace("-", "")[:20]


def export_name(volume_uuid: str) -> str:
    return f"migration-vol-{volume_uuid}"


def volume_name(ctx: VmReplicationContext, disk: VmDisk) -> str:
    return f"migration-{ctx.vm_name}-{disk.disk_id}"


@dataclass
class Provisioned:
    volume: OsseaVolume
    created: bool
    resized: bool = False


def provision(cs: CloudStack, config: OsseaConfig, ctx: VmReplicationContext, disk: VmDisk,
              extra_gib: int) -> Provisioned:
    """Reuse the disk's replica volume or create one of at least capacity + extra_gib."""
    needed = (disk.capacity_bytes or disk.size_gb * GIB) + extra_gib * GIB
    size_gb = max(1, math.ceil(needed / GIB))
    volume = OsseaVolume.get_or_none(OsseaVolume.id == disk.ossea_volume_id) if disk.ossea_volume_id else None
    if volume is not None:
        remote = cs.get_volume(volume.volume_id)
        if remote is None:
            log.warning("replica volume %s of %s is gone from CloudStack; creating a new one",
                        volume.volume_id, disk.disk_id)
            volume.delete_instance()
            volume = None
        elif remote.size_bytes < needed:
            cs.resize_volume(volume.volume_id, size_gb, config.disk_offering_id or "")
            OsseaVolume.update(size_gb=size_gb).where(OsseaVolume.id == volume.id).execute()
            return Provisioned(OsseaVolume.get_by_id(volume.id), created=False, resized=True)
        else:
            return Provisioned(volume, created=False)
    created = cs.create_volume(name=volume_name(ctx, disk), zone_id=_zone_id(cs, config),
                               disk_offering_id=config.disk_offering_id, size_gb=size_gb)
    with db.atomic():
        volume = OsseaVolume.create(
            vm_context=ctx.context_id, volume_id=created.id, volume_name=created.name or volume_name(ctx, disk),
            size_gb=math.ceil((created.size_bytes or size_gb * GIB) / GIB), ossea_config=config.id,
            volume_type="DATADISK", status=OsseaVolumeStatus.AVAILABLE,
        )
        # A new target: the stored change id described the old volume, so the next copy is full.
        VmDisk.update(ossea_volume_id=volume.id, disk_change_id=None).where(VmDisk.id == disk.id).execute()
    return Provisioned(volume, created=True)


def _zone_id(cs: CloudStack, config: OsseaConfig) -> str:
    """The configured zone may be an id or a name (older configurations stored names)."""
    zones = cs.list_zones()
    for zone in zones:
        if zone.matches(config.zone):
            return zone.id
    raise FailedPrecondition(
        f"CloudStack zone {quote(config.zone)} of configuration {quote(config.name)} does not exist "
        f"(zones: {', '.join(z.name or z.id for z in zones)})"
    )


def wait_for_device(device_dir: Path, volume_uuid: str, timeout: float) -> Path:
    path = device_dir / device_name(volume_uuid)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"volume {volume_uuid} is attached but its device {path} did not appear within {timeout:.0f} s"
            )
        time.sleep(0.1)
    return path


def attach(cs: CloudStack, config: OsseaConfig, volume: OsseaVolume, *, device_dir: Path,
           wait_seconds: float) -> DeviceMapping:
    """Attach to the OMA VM (unless already there), find the device, record the mapping."""
    if not config.oma_vm_id:
        raise FailedPrecondition(f"configuration {quote(config.name)} has no oma_vm_id (detect the OMA VM first)")
    remote = cs.get_volume(volume.volume_id)
    attached_to = remote.virtual_machine_id if remote else None
    if attached_to and attached_to != config.oma_vm_id:
        raise FailedPrecondition(
            f"volume {volume.volume_id} is attached to VM {attached_to}, not to the OMA; a failover may be using it"
        )
    if not attached_to:
        remote = cs.attach_volume(volume.volume_id, config.oma_vm_id)
    path = wait_for_device(device_dir, volume.volume_id, wait_seconds)
    size = (remote.size_bytes if remote else 0) or volume.size_gb * GIB
    values = {
        "vm_context": volume.vm_context_id, "volume_id_numeric": volume.id, "vm_id": config.oma_vm_id,
        "operation_mode": DeviceOperationMode.OMA, "cloudstack_device_id": remote.device_id if remote else None,
        "requires_device_correlation": False, "device_path": str(path), "cloudstack_state": "attached",
        "linux_state": "present", "size": size, "last_sync": utcnow(),
    }
    with db.atomic():
        mapping = DeviceMapping.get_or_none(DeviceMapping.volume_uuid == volume.volume_id)
        if mapping is None:
            mapping = DeviceMapping.create(volume_uuid=volume.volume_id, **values)
        else:
            DeviceMapping.update(values).where(DeviceMapping.id == mapping.id).execute()
        OsseaVolume.update(device_path=str(path), status=OsseaVolumeStatus.ATTACHED).where(
            OsseaVolume.id == volume.id).execute()
    return DeviceMapping.get(DeviceMapping.volume_uuid == volume.volume_id)


def export(exports: ExportManager, mapping: DeviceMapping, disk: VmDisk, job_id: str) -> Export:
    """Serve the device over NBD for ``job_id`` (with TLS: that job's key) and record it in nbd_exports
    (one row per volume, reused)."""
    name = export_name(mapping.volume_uuid)
    served = exports.ensure(name, mapping.device_path, job_id=job_id)
    values = {
        "vm_context": disk.vm_context_id, "job": job_id, "volume_id": mapping.volume_uuid, "vm_disk": disk.id,
        "device_mapping": mapping.volume_uuid, "port": served.port, "device_path": mapping.device_path,
        "status": NbdExportStatus.ACTIVE,
    }
    with db.atomic():
        if NbdExport.select().where(NbdExport.export_name == name).exists():
            NbdExport.update(values).where(NbdExport.export_name == name).execute()
        else:
            NbdExport.create(export_name=name, **values)
    return served


def restore_exports(exports: ExportManager, job_id: str) -> list[Export]:
    """Serve a job's exports again on their recorded ports (after an OMA restart the VMA may still be
    copying into them and reconnects to the same URIs)."""
    restored = []
    for row in NbdExport.select().where(NbdExport.job == job_id):
        served = exports.ensure(row.export_name, row.device_path, port=row.port, job_id=job_id)
        if served.port != row.port:
            NbdExport.update(port=served.port).where(NbdExport.id == row.id).execute()
        restored.append(served)
    return restored


def remove(cs: CloudStack, exports: ExportManager, volume: OsseaVolume) -> None:
    """Stop the export, detach and delete the CloudStack volume, and drop its rows."""
    exports.remove(export_name(volume.volume_id))
    remote = cs.get_volume(volume.volume_id)
    if remote is not None:
        if remote.virtual_machine_id:
            cs.detach_volume(volume.volume_id)
        cs.delete_volume(volume.volume_id)
    with db.atomic():
        NbdExport.delete().where(NbdExport.volume_id == volume.volume_id).execute()
        DeviceMapping.delete().where(DeviceMapping.volume_uuid == volume.volume_id).execute()
        OsseaVolume.delete().where(OsseaVolume.id == volume.id).execute()
