"""Plain data of the vSphere integration: what leaves the package (no pyVmomi objects).

Managed object references travel as their string values (``"vm-42"``). :class:`VCenterParams`
validates how to reach a vCenter (address, one TLS mode) and keys the session cache without
keeping the password in the key. :func:`inventory_path` builds "/DC/vm/Folder/VM" from parent links.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

from vma_agent import errors

#: Properties read per VM (discovery, power and CBT reads share them; the benchmark compares a
#: plain pyVmomi retrieval of exactly these paths).
VM_PROPERTIES: tuple[str, ...] = (
    "name", "parent", "parentVApp",
    "config.uuid", "config.instanceUuid", "config.guestFullName", "config.guestId",
    "config.version", "config.firmware", "config.template", "config.annotation",
    "config.hardware.numCPU", "config.hardware.memoryMB", "config.hardware.device",
    "config.changeTrackingEnabled", "config.tools.toolsVersion",
    "runtime.powerState", "runtime.host", "runtime.bootTime",
    "guest.toolsStatus", "guest.toolsRunningStatus", "guest.toolsVersion",
    "guest.toolsVersionStatus2", "guest.guestFullName", "guest.guestId",
    "snapshot",
)


def colon_hex(hexdigits: str) -> str:
    h = hexdigits.upper()
    return ":".join(h[i:i + 2] for i in range(0, len(h), 2))


def normalise_thumbprint(value: str) -> str:
    v = re.sub(r"^\s*sha-?(1|256)\s*[:=]?\s*", "", value.strip(), flags=re.I)
    v = re.sub(r"[\s:]", "", v).lower()
    if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", v):
        raise errors.InvalidArgument(
            "connection.thumbprint must be a SHA-1 (40 hex digits) or SHA-256 (64 hex digits) "
            "certificate fingerprint, e.g. AB:CD:...")
    return v


@dataclass(frozen=True)
class Fingerprints:
    sha1: str  # colon hex, upper case, as vSphere shows it
    sha256: str

    @classmethod
    def of(cls, der: bytes) -> Fingerprints:
        return cls(colon_hex(hashlib.sha1(der).hexdigest()), colon_hex(hashlib.sha256(der).hexdigest()))


@dataclass(frozen=True)
class VCenterParams:
    """How to reach one vCenter. The password is excluded from repr()."""

    host: str
    username: str
    password: str = field(repr=False)
    thumbprint: str = ""
    ca_pem: str = field(default="", repr=False)
    insecure: bool = False
    timeout: float = 60.0

    def address(self) -> tuple[str, int]:
        """(hostname, port) from "host", "host:port", "[v6]:port" or "https://host[:port]/sdk"."""
        raw = self.host.strip()
        raw = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", raw).split("/", 1)[0]
        m = re.fullmatch(r"\[([0-9a-fA-F:.%a-zA-Z]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?|([0-9a-fA-F:]+)", raw)
        if not raw or not m:
            raise errors.InvalidArgument(f"connection.host {self.host!r} is not a host name or host:port")
        name = m.group(1) or m.group(3) or m.group(5)
        port = int(m.group(2) or m.group(4) or 443)
        if not 0 < port < 65536:
            raise errors.InvalidArgument(f"connection.host {self.host!r} has an invalid port")
        return name, port

    @property
    def label(self) -> str:
        """The host as used in messages."""
        name, port = self.address()
        return name if port == 443 else f"{name}:{port}"

    def tls_mode(self) -> tuple[str, str]:
        chosen = [m for m, on in (("thumbprint", bool(self.thumbprint.strip())),
                                  ("ca_pem", bool(self.ca_pem.strip())), ("insecure", self.insecure)) if on]
        if len(chosen) > 1:
            raise errors.InvalidArgument(
                f"connection: choose one TLS mode, not {' and '.join(chosen)} "
                "(thumbprint pinning, a CA bundle, or insecure)")
        if not chosen:
            return ("system", "")
        if chosen[0] == "thumbprint":
            return ("thumbprint", normalise_thumbprint(self.thumbprint))
        if chosen[0] == "ca_pem":
            return ("ca_pem", hashlib.sha256(self.ca_pem.strip().encode()).hexdigest())
        return ("insecure", "")

    def cache_key(self) -> tuple[str, ...]:
        name, port = self.address()
        mode, detail = self.tls_mode()
        secret = hmac.new(_CACHE_KEY_SALT, self.password.encode(), hashlib.sha256).hexdigest()
        return (name.lower(), str(port), self.username, mode, detail, secret)


_CACHE_KEY_SALT = secrets.token_bytes(32)


@dataclass(frozen=True)
class VMRef:
    """A VM by BIOS UUID, managed object reference or inventory path (first non-empty wins)."""

    uuid: str = ""
    moref: str = ""
    path: str = ""

    def describe(self) -> str:
        if self.uuid:
            return f"BIOS UUID {self.uuid}"
        if self.moref:
            return f"moref {self.moref}"
        return f"path {self.path}"


@dataclass(frozen=True)
class VMHandle:
    moref: str
    name: str = ""


@dataclass(frozen=True)
class ServerInfo:
    host: str
    full_name: str
    version: str
    build: str
    api_type: str
    api_version: str
    instance_uuid: str
    fingerprints: Fingerprints | None


@dataclass(frozen=True)
class DatacenterInfo:
    moref: str
    name: str
    path: str  # inventory path, "/DC0" or "/Folder/DC0"
    vm_folder: str


@dataclass(frozen=True)
class InventoryNode:
    moref: str
    kind: str  # "Folder", "Datacenter", "VirtualApp", "VirtualMachine"
    name: str
    parent: str  # moref of the parent ("" for the root)


@dataclass(frozen=True)
class NetworkInfo:
    moref: str
    kind: str  # "Network", "DistributedVirtualPortgroup", "OpaqueNetwork"
    name: str
    key: str = ""  # distributed port group key


@dataclass
class Skeleton:
    """Names and parents of everything discovery needs, from one retrieval."""

    datacenters: dict[str, DatacenterInfo]
    nodes: dict[str, InventoryNode]
    networks: dict[str, NetworkInfo]
    hosts: dict[str, str]
    vms: list[str]  # VM morefs in scope, inventory order
    records: dict[str, VMRecord] = field(default_factory=dict)  # with_vm_properties=True

    def path_of(self, moref: str) -> str:
        """Inventory path of a VM, folder or vApp of this skeleton ("/DC0/vm/Folder/VM")."""
        return inventory_path(moref, self.nodes, {m: d.path for m, d in self.datacenters.items()})


@dataclass(frozen=True)
class Controller:
    key: int
    kind: str  # "scsi", "sata", "ide", "nvme", "other"
    model: str  # "pvscsi", "lsilogic", "lsilogic-sas", "buslogic", "ahci", "ide", "nvme", ...
    bus_number: int


@dataclass(frozen=True)
class Disk:
    key: int
    label: str
    controller_key: int
    unit_number: int
    capacity_bytes: int
    file_name: str  # datastore path "[ds] dir/file.vmdk"
    backing: str  # "flat", "sparse", "rdm-virtual", "rdm-physical", "other"
    thin: bool | None
    eagerly_scrub: bool | None
    change_id: str
    disk_mode: str = ""
    uuid: str = ""


@dataclass(frozen=True)
class Nic:
    key: int
    label: str
    adapter_type: str  # "vmxnet3", "e1000", "e1000e", "vmxnet2", "vmxnet", "pcnet32", "sriov", "unknown"
    mac_address: str
    connected: bool
    backing: str  # "standard", "distributed", "opaque", "other"
    network: str = ""  # standard: Network moref
    device_name: str = ""
    portgroup_key: str = ""
    switch_uuid: str = ""
    opaque_id: str = ""
    opaque_type: str = ""


@dataclass(frozen=True)
class SnapshotInfo:
    moref: str
    name: str
    description: str = ""
    created: dt.datetime | None = None
    id: int = 0
    quiesced: bool = False
    parent: str = ""  # moref of the parent snapshot


@dataclass
class VMRecord:
    moref: str
    name: str = ""
    parent: str = ""
    parent_vapp: str = ""
    uuid: str = ""
    instance_uuid: str = ""
    config_guest_full_name: str = ""
    config_guest_id: str = ""
    vmx_version: str = ""
    firmware: str = ""
    template: bool = False
    annotation: str = ""
    num_cpu: int = 0
    memory_mb: int = 0
    cbt_enabled: bool = False
    config_tools_version: int = 0
    power_state: str = "unknown"
    host: str = ""
    boot_time: dt.datetime | None = None
    tools_status: str = ""
    tools_running_status: str = ""
    tools_version: str = ""
    tools_version_status: str = ""
    guest_full_name: str = ""
    guest_id: str = ""
    snapshots: list[SnapshotInfo] = field(default_factory=list)
    current_snapshot: str = ""
    controllers: dict[int, Controller] = field(default_factory=dict)
    disks: list[Disk] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)
    path: str = ""  # filled by vm_record() (single-VM reads)


@dataclass(frozen=True)
class PowerInfo:
    moref: str
    name: str
    uuid: str
    power_state: str
    tools_status: str
    tools_running_status: str
    boot_time: dt.datetime | None


def inventory_path(moref: str, nodes: dict[str, InventoryNode], anchors: dict[str, str] | None = None) -> str:
    """"/DC/vm/Folder/VM" from the parent chain (the root folder is not part of paths).
    ``anchors`` maps morefs whose path is known (datacenters) to that path."""
    parts: list[str] = []
    seen: set[str] = set()
    cur = nodes.get(moref)
    prefix = ""
    while cur is not None and cur.moref not in seen:
        seen.add(cur.moref)
        if anchors and cur.moref in anchors:
            prefix = anchors[cur.moref].rstrip("/")
            break
        parent = nodes.get(cur.parent)
        if parent is None and cur.kind == "Folder" and not cur.parent:
            break  # the root folder ("Datacenters")
        parts.append(cur.name)
        cur = parent
    return prefix + "/" + "/".join(reversed(parts))
