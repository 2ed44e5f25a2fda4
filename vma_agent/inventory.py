"""Discovery: the vSphere inventory of a datacenter normalised into plain VM descriptions (docs/design/replication.md#vma-agent-operations).

No gRPC and no pyVmomi here: the vCenter session (``vma_agent.integrations.vsphere.Session``)
is passed in and hands back plain records. What this module decides:

* which VMs (``filter`` terms, ``folder``, exact ``names``) - the names-only skeleton is read first
  whenever the request narrows the set, so the full properties are read just for the matches;
* identity and placement: id = BIOS UUID else moref, inventory path, folder path ("Root" when the
  VM sits directly in the datacenter's VM folder), host name;
* guest OS family from guest info, falling back to the VM configuration (powered-off VMs);
* VMware Tools status and the real tools version (never the virtual hardware version);
* disks (``disk-<key>``, controller type/bus, provisioning, backing, CBT) and NICs with port-group
  names resolved from one batched read of the networks.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vma_agent import errors

if TYPE_CHECKING:  # the session comes from vma_agent.integrations.vsphere
    from vma_agent.integrations.vsphere import Disk, Nic, Session, Skeleton, VMRecord

GiB = 1 << 30

POWER_STATES = ("poweredOn", "poweredOff", "suspended")


@dataclass
class DiscoveredDisk:
    id: str
    key: int
    label: str
    vmdk_path: str
    datastore: str
    capacity_bytes: int
    size_gb: int
    unit_number: int
    controller_key: int
    controller_type: str
    bus_number: int
    provisioning_type: str
    backing_type: str
    change_tracking_active: bool
    change_id: str = ""


@dataclass
class DiscoveredNic:
    label: str
    network_name: str
    mac_address: str
    adapter_type: str
    connected: bool
    key: int


@dataclass
class DiscoveredVM:
    id: str
    instance_uuid: str
    moref: str
    name: str
    path: str
    datacenter: str
    folder_path: str
    power_state: str
    guest_os: str
    guest_full_name: str
    guest_id: str
    num_cpu: int
    memory_mb: int
    vmx_version: str
    tools_status: str
    tools_version: str
    firmware: str
    annotation: str
    cbt_enabled: bool
    snapshot_count: int
    host: str
    disks: list[DiscoveredDisk] = field(default_factory=list)
    networks: list[DiscoveredNic] = field(default_factory=list)


@dataclass
class DiscoveryResult:
    vcenter_host: str
    datacenter: str
    vms: list[DiscoveredVM]
    elapsed_ms: int


# --------------------------------------------------------------------------------- normalising


_LINUX_WORDS = (
    "linux", "ubuntu", "debian", "centos", "rhel", "red hat", "redhat", "sles", "suse", "fedora",
    "photon", "coreos", "flatcar", "mandrake", "mandriva", "asianux", "turbolinux", "rocky", "alma",
    "oracle linux", "amazon", "miracle", "kylin", "pardus",
)
_LINUX_GUEST_IDS = ("nld9", "oes", "sjds", "rhel", "sles", "suse", "ubuntu", "debian", "centos", "fedora",
                    "mandrake", "mandriva", "asianux", "turbolinux", "redhat", "oracle", "amazonlinux",
                    "rocky", "alma", "photon", "vmwarephoton", "coreos", "other24xlinux", "other26xlinux",
                    "other3xlinux", "other4xlinux", "other5xlinux", "other6xlinux", "otherlinux", "genericlinux",
                    "crxpod", "crxsys")
_MAC_WORDS = ("mac os", "macos", "os x", "darwin")


def guest_family(text: str) -> str:
    """"windows", "linux", "macos", "other" for one guest name or guest id; "unknown" if empty."""
    t = (text or "").strip().lower()
    if not t:
        return "unknown"
    if "windows" in t or t.startswith("win"):
        return "windows"
    if any(w in t for w in _MAC_WORDS):
        return "macos"
    if any(w in t for w in _LINUX_WORDS) or t.startswith(_LINUX_GUEST_IDS):
        return "linux"
    return "other"


def normalise_guest_os(*candidates: str) -> str:
    """The first specific family among the candidates (guest info first, then the configuration);
    "other" only when no candidate names a known family; "unknown" when all are empty."""
    seen_other = False
    for c in candidates:
        family = guest_family(c)
        if family in ("windows", "linux", "macos"):
            return family
        seen_other = seen_other or family == "other"
    return "other" if seen_other else "unknown"


def normalise_power_state(state: str) -> str:
    return state if state in POWER_STATES else "unknown"


def tools_version(record: VMRecord) -> str:
    """The VMware Tools version (guest.toolsVersion, else config.tools.toolsVersion); "" when not
    installed. Never the virtual hardware version."""
    v = (record.tools_version or "").strip()
    if v and v != "0":
        return v
    if record.config_tools_version > 0:
        return str(record.config_tools_version)
    return ""


def datastore_of(file_name: str) -> str:
    if file_name.startswith("[") and "]" in file_name:
        return file_name[1:file_name.index("]")].strip()
    return ""


def provisioning_of(disk: Disk) -> str:
    if disk.backing == "flat":
        if disk.thin:
            return "thin"
        if disk.eagerly_scrub:
            return "eager-zeroed-thick"
        return "thick"
    if disk.backing == "sparse":
        return "thin"
    return "unknown"


def normalise_disk(disk: Disk, record: VMRecord) -> DiscoveredDisk:
    ctrl = record.controllers.get(disk.controller_key)
    return DiscoveredDisk(
        id=f"disk-{disk.key}", key=disk.key, label=disk.label, vmdk_path=disk.file_name,
        datastore=datastore_of(disk.file_name), capacity_bytes=disk.capacity_bytes,
        size_gb=math.ceil(disk.capacity_bytes / GiB) if disk.capacity_bytes > 0 else 0,
        unit_number=disk.unit_number, controller_key=disk.controller_key,
        controller_type=ctrl.kind if ctrl else "unknown", bus_number=ctrl.bus_number if ctrl else 0,
        provisioning_type=provisioning_of(disk), backing_type=disk.backing,
        change_tracking_active=bool(disk.change_id), change_id=disk.change_id,
    )


@dataclass
class NetworkNames:
    """Network names of one inventory, for resolving NIC backings without per-NIC lookups."""

    by_moref: dict[str, str]
    by_portgroup_key: dict[str, str]

    @classmethod
    def of(cls, skeleton: Skeleton) -> NetworkNames:
        by_moref = {m: n.name for m, n in skeleton.networks.items()}
        by_key = {n.key: n.name for n in skeleton.networks.values() if n.key}
        return cls(by_moref, by_key)

    def resolve(self, nic: Nic) -> str:
        if nic.backing == "standard":
            if nic.network and nic.network in self.by_moref:
                return self.by_moref[nic.network]
            if nic.device_name:
                return nic.device_name
            return f"STD-REF-{nic.network}" if nic.network else "unknown"
        if nic.backing == "distributed":
            name = self.by_portgroup_key.get(nic.portgroup_key) or self.by_moref.get(nic.portgroup_key)
            if name:
                return name
            if nic.portgroup_key:
                return f"DVS-PG-{nic.portgroup_key}"
            return f"DVS-SWITCH-{nic.switch_uuid.replace(' ', '')[:8]}" if nic.switch_uuid else "unknown"
        if nic.backing == "opaque":
            return f"NSX-{nic.opaque_id}" if nic.opaque_id else "NSX-unknown"
        return nic.device_name or "unknown"


def folder_path_of(path: str, datacenter_path: str) -> str:
    """Path below the datacenter's VM folder ("Root" when the VM sits directly in it)."""
    prefix = datacenter_path.rstrip("/") + "/vm/"
    if not path.startswith(prefix):
        return ""
    rest = path[len(prefix):]
    folder = rest.rpartition("/")[0]
    return folder or "Root"


def normalise_vm(record: VMRecord, *, path: str, datacenter: str, datacenter_path: str,
                 networks: NetworkNames, hosts: dict[str, str]) -> DiscoveredVM:
    return DiscoveredVM(
        id=record.uuid or record.moref,
        instance_uuid=record.instance_uuid,
        moref=record.moref,
        name=record.name,
        path=path,
        datacenter=datacenter,
        folder_path=folder_path_of(path, datacenter_path),
        power_state=normalise_power_state(record.power_state),
        guest_os=normalise_guest_os(record.guest_full_name, record.config_guest_full_name,
                                    record.guest_id, record.config_guest_id),
        guest_full_name=record.guest_full_name or record.config_guest_full_name,
        guest_id=record.guest_id or record.config_guest_id,
        num_cpu=record.num_cpu,
        memory_mb=record.memory_mb,
        vmx_version=record.vmx_version,
        tools_status=record.tools_status or "toolsNotInstalled",
        tools_version=tools_version(record),
        firmware=record.firmware,
        annotation=record.annotation,
        cbt_enabled=record.cbt_enabled,
        snapshot_count=len(record.snapshots),
        host=hosts.get(record.host, record.host),
        disks=[normalise_disk(d, record) for d in sorted(record.disks, key=lambda d: d.key)],
        networks=[DiscoveredNic(n.label, networks.resolve(n), n.mac_address, n.adapter_type, n.connected, n.key)
                  for n in sorted(record.nics, key=lambda n: n.key)],
    )


# --------------------------------------------------------------------------------- selecting


def parse_filter(text: str) -> list[str]:
    """Comma-separated terms, trimmed, lower-cased, empty ones dropped."""
    return [t.strip().lower() for t in (text or "").split(",") if t.strip()]


def name_matches(name: str, terms: Sequence[str]) -> bool:
    n = name.lower()
    return any(t in n for t in terms)


@dataclass
class Selection:
    terms: list[str]
    names: set[str]  # lower-cased exact names
    folder: str  # normalised: "" (everything) or a path relative to the VM folder / absolute

    @property
    def narrows(self) -> bool:
        return bool(self.terms or self.names or self.folder)


def _folder_prefixes(folder: str, datacenters: Iterable[tuple[str, str]]) -> list[str]:
    """Absolute inventory-path prefixes ("/DC0/vm/Folder1/") a folder argument stands for."""
    f = folder.strip()
    if not f:
        return []
    if f.startswith("/"):
        return ["/" + f.strip("/") + "/"]
    rel = f.strip("/")
    if rel.lower() in ("root", ""):
        return [f"{dc_path.rstrip('/')}/vm/" for _, dc_path in datacenters]
    return [f"{dc_path.rstrip('/')}/vm/{rel}/" for _, dc_path in datacenters]


def discover(session: Session, *, datacenter: str = "", filter: str = "", folder: str = "",
             names: Sequence[str] = (), deadline: float | None = None) -> DiscoveryResult:
    """Discover the VMs of ``datacenter`` (every datacenter when empty).

    ``filter``: comma-separated terms, a VM matches when its name contains one (case-insensitive);
    ``folder``: only VMs below that folder ("/DC0/vm/Prod" or "Prod" relative to the VM folder);
    ``names``: exact names (case-insensitive), searched in the names-only skeleton; a name with no
    VM is simply absent from the answer (the caller compares, e.g. the OMA reports it "not found").
    Criteria combine (AND)."""
    t0 = time.monotonic()

    def check_deadline(step: str) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise errors.DeadlineExceeded(f"discovery on vCenter {session.host} ran out of time while {step}")

    sel = Selection(parse_filter(filter), {n.strip().lower() for n in names if n.strip()}, folder.strip())
    dc = session.datacenter(datacenter) if datacenter.strip() else None
    check_deadline("finding the datacenter")
    skeleton = session.inventory_skeleton(dc, with_vm_properties=not sel.narrows)
    check_deadline("reading the inventory")
    dc_by_moref = skeleton.datacenters
    paths = {m: skeleton.path_of(m) for m in skeleton.vms}

    selected = list(skeleton.vms)
    if sel.folder:
        scope = [(d.name, d.path) for d in ([dc] if dc else dc_by_moref.values())]
        prefixes = _folder_prefixes(sel.folder, scope)
        folder_paths = {skeleton.path_of(m) + "/"
                        for m, n in skeleton.nodes.items() if n.kind in ("Folder", "VirtualApp")}
        folder_paths |= {f"{p.rstrip('/')}/vm/" for _, p in scope}
        if not any(p in folder_paths for p in prefixes):
            where = f"datacenter {dc.name}" if dc else "any datacenter"
            raise errors.NotFound(f"folder {sel.folder!r} does not exist in {where} on vCenter {session.host}")
        selected = [m for m in selected if any(paths[m].startswith(p) for p in prefixes)]
    if sel.terms:
        selected = [m for m in selected if name_matches(skeleton.nodes[m].name, sel.terms)]
    if sel.names:
        selected = [m for m in selected if skeleton.nodes[m].name.lower() in sel.names]
    if sel.narrows:
        records = {r.moref: r for r in session.vm_records(selected)}
        check_deadline("reading the VM properties")
    else:
        records = skeleton.records

    networks = NetworkNames.of(skeleton)
    vms: list[DiscoveredVM] = []
    for m in selected:
        rec = records.get(m)
        if rec is None:  # deleted between the two reads
            continue
        dc_info = _datacenter_of(m, skeleton, dc)
        vms.append(normalise_vm(rec, path=paths[m], datacenter=dc_info.name if dc_info else "",
                                datacenter_path=dc_info.path if dc_info else "",
                                networks=networks, hosts=skeleton.hosts))
    vms.sort(key=lambda v: (v.datacenter, v.name.lower(), v.path))
    return DiscoveryResult(session.host, dc.name if dc else "", vms, int((time.monotonic() - t0) * 1000))


def _datacenter_of(moref: str, skeleton: Skeleton, default):
    if default is not None:
        return default
    seen = set()
    cur = skeleton.nodes.get(moref)
    while cur is not None and cur.moref not in seen:
        seen.add(cur.moref)
        if cur.kind == "Datacenter":
            return skeleton.datacenters.get(cur.moref)
        cur = skeleton.nodes.get(cur.parent)
    return None
