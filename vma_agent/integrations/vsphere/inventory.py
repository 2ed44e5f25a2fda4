"""Inventory reads of a :class:`~.session.Session`: datacenters, the inventory skeleton, VM
records in bulk or one by one, and finding a VM by UUID, moref or path.

The skeleton (folders, vApps, networks, hosts, VM names and parents - optionally every VM's
:data:`~.types.VM_PROPERTIES`) comes from ONE RetrievePropertiesEx over a container view (+
continuation pages); big VM sets are read in chunks over parallel connections.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pyVmomi import vim

from vma_agent import errors
from vma_agent.integrations.vsphere.faults import VSphereFault
from vma_agent.integrations.vsphere.plumbing import PC, SessionPlumbing
from vma_agent.integrations.vsphere.properties import prop_str, vm_record_from_properties
from vma_agent.integrations.vsphere.soap import Connection
from vma_agent.integrations.vsphere.types import (
    VM_PROPERTIES,
    DatacenterInfo,
    InventoryNode,
    NetworkInfo,
    Skeleton,
    VMHandle,
    VMRecord,
    VMRef,
    inventory_path,
)

PARALLEL_CHUNK = 500  # VMs per retrieval when a bulk read is split over connections
MAX_PARALLEL_READS = 4


def _view_spec(view: Any, prop_sets: dict[type, Sequence[str]], extra: Sequence[Any] = ()) -> Any:
    return PC.FilterSpec(
        objectSet=[PC.ObjectSpec(obj=view, skip=True, selectSet=[
            PC.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)]), *extra],
        propSet=[PC.PropertySpec(type=t, pathSet=list(paths)) for t, paths in prop_sets.items()],
    )


def _parents_selection() -> list[Any]:
    """Traversal from an entity up through its parents (and a VM's vApp) to the root folder."""
    return [
        PC.TraversalSpec(name="up", type=vim.ManagedEntity, path="parent", skip=False,
                         selectSet=[PC.SelectionSpec(name="up"), PC.SelectionSpec(name="vappFolder")]),
        PC.TraversalSpec(name="vmVApp", type=vim.VirtualMachine, path="parentVApp", skip=False,
                         selectSet=[PC.SelectionSpec(name="up"), PC.SelectionSpec(name="vappFolder")]),
        PC.TraversalSpec(name="vappFolder", type=vim.VirtualApp, path="parentFolder", skip=False,
                         selectSet=[PC.SelectionSpec(name="up")]),
    ]


_NODE_PROPS: dict[type, Sequence[str]] = {
    vim.Folder: ["name", "parent"],
    vim.Datacenter: ["name", "parent", "vmFolder"],
    vim.VirtualApp: ["name", "parent", "parentFolder", "parentVApp"],
}


def _node(kind: str, moref: str, p: dict[str, Any]) -> InventoryNode:
    parent = prop_str(p, "parent")
    if kind == "VirtualApp":
        parent = prop_str(p, "parentFolder") or prop_str(p, "parentVApp") or parent
    elif kind == "VirtualMachine" and not parent:
        parent = prop_str(p, "parentVApp")
    return InventoryNode(moref, kind, prop_str(p, "name"), parent)


class InventoryReads(SessionPlumbing):
    """Inventory operations of :class:`~.session.Session` (which adds the login they run on)."""

    _datacenters: tuple[float, dict[str, DatacenterInfo]] | None = None

    def datacenters(self, max_age: float = 60.0) -> dict[str, DatacenterInfo]:
        """All datacenters by moref (cached for ``max_age`` seconds)."""
        cached = self._datacenters
        if cached and time.monotonic() - cached[0] < max_age:
            return cached[1]

        def read(c: Connection) -> dict[str, DatacenterInfo]:
            with self._view(c, c.content.rootFolder, [vim.Datacenter]) as view:
                spec = PC.FilterSpec(
                    objectSet=[PC.ObjectSpec(obj=view, skip=True, selectSet=[
                        PC.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView,
                                         selectSet=[PC.SelectionSpec(name="up")]),
                        *_parents_selection()])],
                    propSet=[PC.PropertySpec(type=t, pathSet=list(p)) for t, p in _NODE_PROPS.items()],
                )
                objs = self._retrieve(c, [spec])
            nodes = {m: _node(t, m, p) for t, m, p in objs}
            return {m: DatacenterInfo(m, prop_str(p, "name"), inventory_path(m, nodes), prop_str(p, "vmFolder"))
                    for t, m, p in objs if t == "Datacenter"}

        dcs = self._run(read)
        self._datacenters = (time.monotonic(), dcs)
        return dcs

    def datacenter(self, name: str) -> DatacenterInfo:
        """A datacenter by name or inventory path (NotFound lists the existing ones)."""
        want = name.strip().strip("/")
        dcs = self.datacenters()
        for dc in dcs.values():
            if dc.name == want or dc.path.strip("/") == want:
                return dc
        for dc in dcs.values():
            if dc.name.lower() == want.lower():
                return dc
        known = ", ".join(sorted(dc.name for dc in dcs.values())) or "none"
        raise errors.NotFound(f"datacenter {name!r} does not exist on vCenter {self.host} (datacenters: {known})")

    def inventory_skeleton(self, datacenter: DatacenterInfo | None = None, *,
                           with_vm_properties: bool = False) -> Skeleton:
        """Folders, vApps, networks, hosts and VM names/parents below ``datacenter`` (or all), in
        ONE property-collector retrieval over a container view; with ``with_vm_properties`` also
        every VM's :data:`VM_PROPERTIES` (``Skeleton.records``) in that same retrieval."""
        dcs = self.datacenters()

        def read(c: Connection) -> Skeleton:
            root = self._mo(c, vim.Datacenter, datacenter.moref) if datacenter else c.content.rootFolder
            types = [vim.Folder, vim.VirtualMachine, vim.VirtualApp, vim.Network, vim.HostSystem]
            props: dict[type, Sequence[str]] = {
                **_NODE_PROPS,
                vim.VirtualMachine: list(VM_PROPERTIES) if with_vm_properties else ["name", "parent", "parentVApp"],
                vim.Network: ["name"],
                vim.dvs.DistributedVirtualPortgroup: ["key"],
                vim.HostSystem: ["name"],
            }
            with self._view(c, root, types) as view:
                objs = self._retrieve(c, [_view_spec(view, props)])
            sk = Skeleton(dcs, {}, {}, {}, [])
            for dc in dcs.values():
                sk.nodes[dc.moref] = InventoryNode(dc.moref, "Datacenter", dc.name, "")
            for t, m, p in objs:
                if t == "HostSystem":
                    sk.hosts[m] = prop_str(p, "name")
                elif t in ("Network", "DistributedVirtualPortgroup", "OpaqueNetwork"):
                    sk.networks[m] = NetworkInfo(m, t, prop_str(p, "name"), prop_str(p, "key"))
                elif t in ("Folder", "VirtualApp", "VirtualMachine"):
                    sk.nodes[m] = _node(t, m, p)
                    if t == "VirtualMachine":
                        sk.vms.append(m)
                        if with_vm_properties:
                            sk.records[m] = vm_record_from_properties(m, p)
            return sk

        return self._run(read)

    def vm_records(self, morefs: Sequence[str], properties: Sequence[str] = VM_PROPERTIES,
                   parallel: int = MAX_PARALLEL_READS) -> list[VMRecord]:
        """VM properties for many VMs: chunks of VMs read over parallel connections."""
        if not morefs:
            return []
        n = len(morefs)
        chunks = max(1, min(parallel, (n + PARALLEL_CHUNK - 1) // PARALLEL_CHUNK))
        size = (n + chunks - 1) // chunks
        parts = [list(morefs[i:i + size]) for i in range(0, n, size)]

        def read_part(c: Connection, part: list[str]) -> list[VMRecord]:
            spec = PC.FilterSpec(
                objectSet=[PC.ObjectSpec(obj=self._mo(c, vim.VirtualMachine, m), skip=False) for m in part],
                propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=list(properties))],
            )
            return [vm_record_from_properties(m, p) for t, m, p in self._retrieve(c, [spec]) if t == "VirtualMachine"]

        def read(c: Connection) -> list[VMRecord]:
            if len(parts) == 1:
                return read_part(c, parts[0])
            with ThreadPoolExecutor(len(parts), thread_name_prefix="vsphere-read") as pool:
                results = list(pool.map(lambda part: read_part(c, part), parts))
            return [r for rs in results for r in rs]

        return self._run(read)

    # -- single VM

    def find_vm(self, ref: VMRef, datacenter: str = "") -> VMHandle:
        """The VM a reference points at (NotFound names the reference, datacenter and host)."""
        if not (ref.uuid or ref.moref or ref.path):
            raise errors.InvalidArgument("vm: one of uuid, moref or path is required")
        dc = self.datacenter(datacenter) if datacenter else None
        where = f" in datacenter {dc.name}" if dc else ""

        def find(c: Connection) -> str | None:
            index = c.content.searchIndex
            if ref.uuid:
                dc_mo = self._mo(c, vim.Datacenter, dc.moref) if dc else None
                found = index.FindByUuid(dc_mo, ref.uuid.strip(), True, False)
                if found is None:
                    found = index.FindByUuid(dc_mo, ref.uuid.strip(), True, True)
                return found._moId if found is not None else None
            if ref.moref:
                return ref.moref.strip()
            for candidate in self._path_candidates(ref.path, dc):
                found = index.FindByInventoryPath(candidate)
                if found is not None:
                    return found._moId if isinstance(found, vim.VirtualMachine) else None
            return None

        moref = self._run(find)
        if moref is None:
            raise errors.NotFound(f"no VM with {ref.describe()}{where} on vCenter {self.host}")
        if not ref.moref:
            return VMHandle(moref)  # found by the search index: it exists
        try:
            objs = self._run(lambda c: self._retrieve(c, [PC.FilterSpec(
                objectSet=[PC.ObjectSpec(obj=self._mo(c, vim.VirtualMachine, moref))],
                propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=["name"])])]))
        except (errors.NotFound, VSphereFault):
            objs = []
        if not objs:
            raise errors.NotFound(f"no VM with {ref.describe()}{where} on vCenter {self.host}")
        return VMHandle(moref, prop_str(objs[0][2], "name"))

    @staticmethod
    def _path_candidates(path: str, dc: DatacenterInfo | None) -> list[str]:
        p = path.strip()
        out = [p, p.lstrip("/")]
        if dc and "/vm/" not in f"/{p.strip('/')}/":
            out.append(f"{dc.path.strip('/')}/vm/{p.strip('/')}")
        return list(dict.fromkeys(x for x in out if x))

    def vm_record(self, vm: VMHandle, properties: Sequence[str] = VM_PROPERTIES) -> VMRecord:
        """:data:`VM_PROPERTIES` (or the given subset) of one VM plus its inventory path, in one
        retrieval (fields of properties not asked for keep their defaults)."""

        paths = list(dict.fromkeys(["name", "parent", "parentVApp", *properties]))  # the path needs these

        def read(c: Connection) -> VMRecord:
            spec = PC.FilterSpec(
                objectSet=[PC.ObjectSpec(obj=self._mo(c, vim.VirtualMachine, vm.moref), skip=False,
                                         selectSet=_parents_selection())],
                propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=paths),
                         *[PC.PropertySpec(type=t, pathSet=list(p)) for t, p in _NODE_PROPS.items()]],
            )
            objs = self._retrieve(c, [spec])
            nodes = {m: _node(t, m, p) for t, m, p in objs}
            for t, m, p in objs:
                if t == "VirtualMachine" and m == vm.moref:
                    rec = vm_record_from_properties(m, p)
                    rec.path = inventory_path(m, nodes)
                    return rec
            raise errors.NotFound(f"VM {vm.moref} does not exist (any more) on vCenter {self.host}")

        return self._run(read)
