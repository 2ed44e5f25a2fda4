"""Snapshots and Changed Block Tracking of a :class:`~.session.Session`: switching CBT, creating,
listing and removing snapshots, the disks a snapshot froze (with change ids) and the changed (or
allocated) areas of a disk since a change id.

QueryChangedDiskAreas answers are read from the SOAP XML (:func:`~.soap.invoke_xml`): a disk with
many small changed areas answers with thousands of them per page.
"""
from __future__ import annotations

from pyVmomi import vim, vmodl

from vma_agent import errors
from vma_agent.integrations.vsphere.faults import VSphereFault, changed_areas_error
from vma_agent.integrations.vsphere.plumbing import PC, SessionPlumbing
from vma_agent.integrations.vsphere.properties import DeviceSet, child_int
from vma_agent.integrations.vsphere.soap import VIM_NS, Connection, invoke_xml
from vma_agent.integrations.vsphere.types import Disk, SnapshotInfo, VMHandle


class SnapshotsAndCBT(SessionPlumbing):
    """Snapshot and CBT operations of :class:`~.session.Session` (which adds the login they run on)."""

    def set_change_tracking(self, vm: VMHandle, enabled: bool, timeout: float = 300.0) -> None:
        spec = vim.vm.ConfigSpec(changeTrackingEnabled=enabled)
        self._task(lambda c: self._mo(c, vim.VirtualMachine, vm.moref).ReconfigVM_Task(spec), timeout,
                   f"reconfiguration of VM {vm.name or vm.moref} (changeTrackingEnabled={enabled})")

    def list_snapshots(self, vm: VMHandle) -> list[SnapshotInfo]:
        """Every snapshot of the VM (tree order: parents before children)."""
        def read(c: Connection) -> list[SnapshotInfo]:
            objs = self._retrieve(c, [PC.FilterSpec(
                objectSet=[PC.ObjectSpec(obj=self._mo(c, vim.VirtualMachine, vm.moref))],
                propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=["snapshot"])])])
            snaps = objs[0][2].get("snapshot") if objs else None
            return list(snaps[0]) if isinstance(snaps, tuple) else []

        return self._run(read)

    def find_snapshot(self, vm: VMHandle, name: str) -> SnapshotInfo | None:
        return next((s for s in self.list_snapshots(vm) if s.name == name), None)

    def create_snapshot(self, vm: VMHandle, name: str, description: str = "", *, quiesce: bool = False,
                        memory: bool = False, timeout: float = 1800.0) -> SnapshotInfo:
        """Create a snapshot (no memory by default) and return it."""
        result = self._task(
            lambda c: self._mo(c, vim.VirtualMachine, vm.moref).CreateSnapshot_Task(
                name=name, description=description, memory=memory, quiesce=quiesce),
            timeout, f"snapshot {name!r} of VM {vm.name or vm.moref}")
        moref = getattr(result, "_moId", "") or ""
        snap = next((s for s in self.list_snapshots(vm) if s.moref == moref), None)
        return snap or SnapshotInfo(moref, name, description)

    def remove_snapshot(self, snapshot: SnapshotInfo | str, *, consolidate: bool = True,
                        timeout: float = 3600.0) -> None:
        """Remove one snapshot (not its children) and consolidate the disks."""
        moref = snapshot.moref if isinstance(snapshot, SnapshotInfo) else snapshot
        name = snapshot.name if isinstance(snapshot, SnapshotInfo) else moref
        self._task(lambda c: self._mo(c, vim.vm.Snapshot, moref).RemoveSnapshot_Task(
            removeChildren=False, consolidate=consolidate), timeout, f"removal of snapshot {name!r}")

    def snapshot_disks(self, snapshot: SnapshotInfo | str) -> list[Disk]:
        """The disks as frozen by a snapshot (from the snapshot's config.hardware.device): device
        key, backing file, capacity and CBT change id."""
        moref = snapshot.moref if isinstance(snapshot, SnapshotInfo) else snapshot

        def read(c: Connection) -> list[Disk]:
            objs = self._retrieve(c, [PC.FilterSpec(
                objectSet=[PC.ObjectSpec(obj=self._mo(c, vim.vm.Snapshot, moref))],
                propSet=[PC.PropertySpec(type=vim.vm.Snapshot, pathSet=["config.hardware.device"])])])
            if not objs:
                raise errors.NotFound(f"snapshot {moref} does not exist on vCenter {self.host}")
            devices = objs[0][2].get("config.hardware.device")
            return list(devices.disks) if isinstance(devices, DeviceSet) else []

        return self._run(read)

    def query_changed_areas(self, vm: VMHandle, snapshot: SnapshotInfo | str | None, device_key: int,
                            change_id: str, capacity_bytes: int, start_offset: int = 0) -> list[tuple[int, int]]:
        """QueryChangedDiskAreas paged over [start_offset, capacity_bytes): the changed (or, with
        ``change_id="*"``, the allocated) areas as (offset, length) pairs, in order.

        Raises ChangeTrackingNotActive (CBT off, or snapshot taken with CBT off) or
        InvalidChangeId (change id rejected) - both ChangeTrackingUnusable: copy the whole disk."""
        snap_moref = snapshot.moref if isinstance(snapshot, SnapshotInfo) else (snapshot or "")
        label = f"disk {device_key} of VM {vm.name or vm.moref}"

        def query(c: Connection) -> list[tuple[int, int]]:
            mo = self._mo(c, vim.VirtualMachine, vm.moref)
            snap = self._mo(c, vim.vm.Snapshot, snap_moref) if snap_moref else None
            areas: list[tuple[int, int]] = []
            offset = start_offset
            while offset < capacity_bytes:
                try:
                    resp = invoke_xml(c.stub, mo, "QueryChangedDiskAreas", [snap, device_key, offset, change_id])
                except (vim.fault.FileFault, vmodl.fault.InvalidArgument) as exc:
                    raise changed_areas_error(exc, host=self.host, label=label, change_id=change_id) from None
                ret = resp.find(VIM_NS + "returnval") if resp is not None else None
                if ret is None:
                    raise VSphereFault(f"vCenter {self.host} answered QueryChangedDiskAreas for {label} with nothing")
                start, length = child_int(ret, "startOffset"), child_int(ret, "length")
                for a in ret.iterfind(VIM_NS + "changedArea"):
                    areas.append((child_int(a, "start"), child_int(a, "length")))
                if length <= 0:
                    raise VSphereFault(f"vCenter {self.host}: QueryChangedDiskAreas for {label} made no progress "
                                       f"at offset {offset}")
                offset = start + length
            return areas

        return self._run(query)
