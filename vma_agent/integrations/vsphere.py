"""vSphere (vCenter) through pyVmomi: the only module of the agent that imports pyVim/pyVmomi.

Everything that leaves this module is a plain dataclass (managed object references as their string
values, e.g. ``"vm-42"``); errors are :mod:`vma_agent.errors` exceptions whose messages name the
vCenter host and the object and never contain a password.

Sessions
    :class:`VCenterParams` says how to reach a vCenter (host[:port], user, password, TLS mode:
    pinned SHA-1/SHA-256 thumbprint, CA bundle, explicitly insecure, or the system CA store).
    :class:`Session` is one login; it re-logs in once when vCenter answers NotAuthenticated (session
    expired) and can keep itself alive (:meth:`Session.start_keepalive`). :class:`SessionCache`
    shares logins between RPCs, keyed by (host, user, TLS mode, keyed hash of the password).

Inventory
    :meth:`Session.inventory_skeleton` reads the folder tree, networks (standard, distributed,
    opaque), hosts and VMs of a datacenter (or of everything) with ONE RetrievePropertiesEx over a
    container view (+ ContinueRetrievePropertiesEx pages) - with or without the VM properties of
    :data:`VM_PROPERTIES`; :meth:`Session.vm_records` reads those properties for chosen VMs only
    (exact names / filters: the names come first from the skeleton). Property-collector answers
    are parsed from the SOAP XML by this module (see "property values" below): pyVmomi's generic
    deserializer costs ~4 ms per VM, seconds for 1,000 VMs. pyVmomi still builds and sends every
    request, owns the session cookie and turns SOAP faults into its exception classes.

Data mover API (one process per job, all disks of one VM; see docs/design/replication.md#data-mover-run)::

    session = vsphere.connect(params)             # or SessionCache().get(params)
    session.start_keepalive()
    vm = session.find_vm(VMRef(path="/DC0/vm/web01"), datacenter="DC0")
    info = session.vm_record(vm)                  # .cbt_enabled, .snapshots, .disks (live)
    snap = session.create_snapshot(vm, f"srep-{job_id}", quiesce=False)
    for disk in session.snapshot_disks(snap):     # key, file_name, capacity_bytes, change_id
        areas = session.query_changed_areas(vm, snap, disk.key, previous_change_id or "*",
                                            disk.capacity_bytes)   # [(offset, length), ...]
    session.remove_snapshot(snap)
    session.close()

    except ChangeTrackingUnusable (ChangeTrackingNotActive, InvalidChangeId): copy the whole disk.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import html
import http.client
import io
import logging
import re
import secrets
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from pyVmomi import SoapAdapter, VmomiSupport, vim, vmodl

from vma_agent import errors

log = logging.getLogger(__name__)

PC = vmodl.query.PropertyCollector
T = TypeVar("T")

__all__ = [
    "VM_PROPERTIES", "CertificateMismatch", "ChangeTrackingNotActive", "ChangeTrackingUnusable",
    "Controller", "DatacenterInfo", "Disk", "Fingerprints", "GuestOperationUnavailable",
    "InvalidChangeId", "InventoryNode", "NetworkInfo", "Nic", "PowerInfo", "ServerInfo", "Session",
    "SessionCache", "Skeleton", "SnapshotInfo", "VCenterParams", "VMHandle", "VMRecord", "VMRef",
    "VSphereFault", "connect", "probe_certificate",
]

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

_POWER_PROPERTIES = (
    "name", "config.uuid", "runtime.powerState", "runtime.bootTime",
    "guest.toolsStatus", "guest.toolsRunningStatus",
)

_V = "{urn:vim25}"
_XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
_SOAP_BODY = "{http://schemas.xmlsoap.org/soap/envelope/}Body"
_FALLBACK_VERSION = "vim.version.version9"  # vSphere 5.5: every vCenter still speaks it
_PARALLEL_CHUNK = 500  # VMs per retrieval when a bulk read is split over connections
_MAX_PARALLEL = 4


# =============================================================================================
# errors


class VSphereFault(errors.AgentError):
    """vCenter refused or failed an operation for a reason no other class describes."""

    code = "INTERNAL"


class GuestOperationUnavailable(errors.FailedPrecondition):
    """A guest operation (shutdown) needs running VMware Tools, or the VM is in the wrong state."""


class ChangeTrackingUnusable(errors.FailedPrecondition):
    """Changed Block Tracking cannot answer for this disk/change id: copy the whole disk."""


class ChangeTrackingNotActive(ChangeTrackingUnusable):
    """CBT is off for the VM, or the snapshot was taken while CBT was off (vim.fault.FileFault)."""


class InvalidChangeId(ChangeTrackingUnusable):
    """vCenter rejected the change id (garbled, from an older CBT identity, or from another disk)."""


class CertificateMismatch(ssl.SSLError):
    """The server certificate does not match the pinned thumbprint (raised inside the TLS
    handshake, so no request - and no password - is ever sent to that server)."""

    def __init__(self, host: str, expected: str, actual: Fingerprints):
        self.host, self.expected, self.actual = host, expected, actual
        kind = "SHA-1" if len(expected) == 40 else "SHA-256"
        super().__init__(
            f"the certificate of vCenter {host} does not match the pinned {kind} thumbprint "
            f"{_colon(expected)}: the server presented SHA-1 {actual.sha1} / SHA-256 {actual.sha256}"
        )


# =============================================================================================
# plain data


@dataclass(frozen=True)
class Fingerprints:
    sha1: str  # colon hex, upper case, as vSphere shows it
    sha256: str

    @classmethod
    def of(cls, der: bytes) -> Fingerprints:
        return cls(_colon(hashlib.sha1(der).hexdigest()), _colon(hashlib.sha256(der).hexdigest()))


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
            return ("thumbprint", _normalise_thumbprint(self.thumbprint))
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


# =============================================================================================
# TLS


def _colon(hexdigits: str) -> str:
    h = hexdigits.upper()
    return ":".join(h[i:i + 2] for i in range(0, len(h), 2))


def _normalise_thumbprint(value: str) -> str:
    v = re.sub(r"^\s*sha-?(1|256)\s*[:=]?\s*", "", value.strip(), flags=re.I)
    v = re.sub(r"[\s:]", "", v).lower()
    if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", v):
        raise errors.InvalidArgument(
            "connection.thumbprint must be a SHA-1 (40 hex digits) or SHA-256 (64 hex digits) "
            "certificate fingerprint, e.g. AB:CD:...")
    return v


class _TLSContext(ssl.SSLContext):
    """Client context that records the server certificate and, when pinned, refuses a server
    whose certificate fingerprint differs (checked right after every handshake)."""

    pin: str = ""
    host_label: str = ""
    peer_der: bytes | None = None

    def wrap_socket(self, sock, *args, **kwargs):  # type: ignore[override]
        ssock = super().wrap_socket(sock, *args, **kwargs)
        der = ssock.getpeercert(binary_form=True)
        if der:
            self.peer_der = der
        if self.pin:
            fp = Fingerprints.of(der or b"")
            actual = (fp.sha1 if len(self.pin) == 40 else fp.sha256).replace(":", "").lower()
            if not der or not hmac.compare_digest(actual, self.pin):
                ssock.close()
                raise CertificateMismatch(self.host_label, self.pin, fp)
        return ssock


def _tls_context(params: VCenterParams) -> _TLSContext:
    mode, detail = params.tls_mode()
    ctx = _TLSContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.host_label = params.label
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode in ("thumbprint", "insecure"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.pin = detail if mode == "thumbprint" else ""
    elif mode == "ca_pem":
        try:
            ctx.load_verify_locations(cadata=params.ca_pem)
        except (ssl.SSLError, ValueError) as exc:
            raise errors.InvalidArgument(f"connection.ca_pem is not a usable PEM CA bundle: {exc}") from None
    else:
        ctx.load_default_certs()
    return ctx


def probe_certificate(host: str, port: int = 443, timeout: float = 10.0) -> Fingerprints:
    """Fingerprints of the certificate a server presents (no verification: for showing/pinning)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    label = host if port == 443 else f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                der = s.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise errors.Unavailable(f"vCenter {label} is unreachable: {_describe_os_error(exc)}") from None
    if not der:
        raise errors.Unavailable(f"vCenter {label} presented no certificate")
    return Fingerprints.of(der)


# =============================================================================================
# error translation


def _describe_os_error(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message or exc.reason})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc.reason or exc})"
    if isinstance(exc, ConnectionError):
        return f"connection lost ({exc.__class__.__name__})"
    return str(exc) or exc.__class__.__name__


def _fault_text(fault: BaseException) -> str:
    msg = getattr(fault, "msg", "") or ""
    if not msg:
        lm = getattr(fault, "faultMessage", None) or []
        msg = "; ".join(m.message for m in lm if getattr(m, "message", None))
    name = type(fault).__name__.rsplit(".", 1)[-1]
    return f"{name}: {msg}" if msg else name


def _scrub(text: str, secret: str) -> str:
    if secret and len(secret) >= 3:
        text = text.replace(secret, "***")
    return text


# =============================================================================================
# raw SOAP: pyVmomi serializes the request and deserializes faults; answers are parsed here


def _invoke_raw(stub: Any, mo: Any, method: str, args: Sequence[Any]) -> bytes:
    """Invoke ``method`` on ``mo`` through pyVmomi's connection pool and return the raw SOAP
    answer. Faults are deserialized by pyVmomi and raised as its exception classes."""
    info = mo._GetMethodInfo(method)
    body = stub.SerializeRequest(mo, info, list(args))
    headers = {
        "Cookie": stub.cookie,
        "SOAPAction": stub.versionId,
        "Content-Type": "text/xml; charset=UTF-8",
        "Accept-Encoding": "gzip, deflate",
        "User-Agent": "vma-agent (pyVmomi)",
    }
    conn = stub.GetConnection()
    try:
        conn.request("POST", stub.path, body, headers)
        resp = conn.getresponse()
        status = resp.status
        if status not in (200, 500):
            resp.read()
            raise http.client.HTTPException(f"HTTP {status} {resp.reason}")
        encoding = (resp.getheader("Content-Encoding") or "identity").lower()
        inflate = None
        if encoding == "gzip":
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            inflate = zlib.decompressobj()
        kept: list[bytes] = []
        while True:
            chunk = resp.read(1 << 18)
            if not chunk:
                break
            kept.append(inflate.decompress(chunk) if inflate is not None else chunk)
        if inflate is not None:
            kept.append(inflate.flush())
    except BaseException:
        conn.close()
        stub.DropConnections()
        raise
    cookie = resp.getheader("Set-Cookie")
    if cookie:
        stub.cookie = cookie
    stub.ReturnConnection(conn)
    data = b"".join(kept)
    if status == 500:
        fault = SoapAdapter.SoapResponseDeserializer(stub).Deserialize(io.BytesIO(data), info.result)
        if isinstance(fault, BaseException):
            raise fault
        raise VSphereFault(f"unexpected SOAP fault answer to {method}")
    return data


def _response_element(data: bytes, method: str) -> ET.Element:
    """The ``<method>Response`` element of a SOAP answer (ElementTree)."""
    root = ET.fromstring(data)
    soap_body = root.find(_SOAP_BODY)
    if soap_body is None or len(soap_body) == 0:
        raise VSphereFault(f"malformed answer to {method} (no SOAP body)")
    return soap_body[0]


def _invoke_xml(stub: Any, mo: Any, method: str, args: Sequence[Any]) -> ET.Element:
    return _response_element(_invoke_raw(stub, mo, method, args), method)


# --- property values -------------------------------------------------------------------------
# A retrieved object is (type, moref, {property path: value}) where a value is a str (scalars and
# managed object references), _DeviceSet for config.hardware.device, (snapshots, current) for
# "snapshot", and an ElementTree element for any other complex value. Two parsers produce it:
#
# * the fast one reads the answer with regular expressions: objects, property sets and virtual
#   devices are flat, well-known shapes in a vSphere answer, and a device is reduced to its leaf
#   elements (first occurrence wins: a disk's own fileName/changeId come before its backing's
#   parent chain). pyVmomi's deserializer needs ~4 ms per VM and ElementTree's tree ~0.4 ms; this
#   much less, which is what lets one discovery of 1,000 VMs take about the server's time.
# * the reference one uses ElementTree. It serves every answer the fast parser does not vouch
#   for (counts of objects/property sets/devices must agree, no CDATA, device keys present) and
#   the tests compare both on the simulator's answers.

ObjectTuple = tuple[str, str, dict[str, Any]]


@dataclass
class _DeviceSet:
    controllers: dict[int, Controller]
    disks: list[Disk]
    nics: list[Nic]


class _NotForFastPath(Exception):
    """The fast parser met something it does not vouch for: use ElementTree."""


def _xtype(el: ET.Element) -> str:
    return (el.get(_XSI_TYPE) or "").rpartition(":")[2]


def _s(el: ET.Element | None, tag: str | None = None) -> str:
    if el is None:
        return ""
    if tag is None:
        return el.text or ""
    return el.findtext(_V + tag) or ""


def _i(el: ET.Element | None, tag: str | None = None, default: int = 0) -> int:
    text = _s(el, tag)
    try:
        return int(text) if text else default
    except ValueError:
        return default


def _b(el: ET.Element | None, tag: str | None = None) -> bool | None:
    text = _s(el, tag)
    return None if text == "" else text == "true"


def _int(text: str | None, default: int = 0) -> int:
    try:
        return int(text) if text else default
    except ValueError:
        return default


def _bool(text: str | None) -> bool | None:
    return None if not text else text == "true"


def _time(text: str) -> dt.datetime | None:
    if not text:
        return None
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


_kinds: dict[str, type | None] = {}


def _wsdl_class(name: str) -> type | None:
    if name not in _kinds:
        try:
            _kinds[name] = VmomiSupport.GetWsdlType("urn:vim25", name)
        except (KeyError, AttributeError):
            _kinds[name] = None
    return _kinds[name]


_dev = vim.vm.device
_NIC_TYPES = (  # most specific first
    (_dev.VirtualVmxnet3, "vmxnet3"), (_dev.VirtualVmxnet2, "vmxnet2"), (_dev.VirtualVmxnet, "vmxnet"),
    (_dev.VirtualE1000e, "e1000e"), (_dev.VirtualE1000, "e1000"), (_dev.VirtualPCNet32, "pcnet32"),
    (_dev.VirtualSriovEthernetCard, "sriov"),
)
_CONTROLLER_TYPES = (
    (_dev.ParaVirtualSCSIController, "scsi", "pvscsi"),
    (_dev.VirtualLsiLogicSASController, "scsi", "lsilogic-sas"),
    (_dev.VirtualLsiLogicController, "scsi", "lsilogic"),
    (_dev.VirtualBusLogicController, "scsi", "buslogic"),
    (_dev.VirtualSCSIController, "scsi", "scsi"),
    (_dev.VirtualAHCIController, "sata", "ahci"),
    (_dev.VirtualSATAController, "sata", "sata"),
    (_dev.VirtualIDEController, "ide", "ide"),
    (_dev.VirtualNVMEController, "nvme", "nvme"),
)
_kind_cache: dict[str, tuple[str, str, str]] = {}


def _device_kind(name: str) -> tuple[str, str, str]:
    """("disk"|"nic"|"controller"|"", detail, model) for a device xsi:type (cached: pyVmomi's
    type lookups are slow)."""
    hit = _kind_cache.get(name)
    if hit is not None:
        return hit
    cls = _wsdl_class(name)
    out = ("", "", "")
    if cls is not None:
        if issubclass(cls, _dev.VirtualDisk):
            out = ("disk", "", "")
        elif issubclass(cls, _dev.VirtualEthernetCard):
            out = ("nic", next((n for c, n in _NIC_TYPES if issubclass(cls, c)), "unknown"), "")
        elif issubclass(cls, _dev.VirtualController):
            kind, model = next(((k, m) for c, k, m in _CONTROLLER_TYPES if issubclass(cls, c)), ("", ""))
            if kind:
                out = ("controller", kind, model)
    _kind_cache[name] = out
    return out


_backing_cache: dict[str, str] = {}


def _backing_kind(name: str) -> str:
    """Disk backings: "flat", "sparse", "rdm"; NIC backings: "standard", "distributed",
    "opaque"; anything else: "other" (cached per xsi:type)."""
    hit = _backing_cache.get(name)
    if hit is not None:
        return hit
    b, card = _dev.VirtualDisk, _dev.VirtualEthernetCard
    table = (
        (b.RawDiskMappingVer1BackingInfo, "rdm"),
        (b.FlatVer2BackingInfo, "flat"), (b.FlatVer1BackingInfo, "flat"),
        (b.SparseVer2BackingInfo, "sparse"), (b.SparseVer1BackingInfo, "sparse"),
        (b.SeSparseBackingInfo, "sparse"),
        (card.DistributedVirtualPortBackingInfo, "distributed"),
        (card.OpaqueNetworkBackingInfo, "opaque"),
        (card.NetworkBackingInfo, "standard"),
    )
    cls = _wsdl_class(name)
    kind = next((k for c, k in table if cls is not None and issubclass(cls, c)), "other")
    _backing_cache[name] = kind
    return kind


def _add_device(out: _DeviceSet, type_name: str, backing_type: str, f: dict[str, str]) -> bool:
    """Add one device from its xsi:type, its backing's xsi:type and its leaf values (first
    occurrence per element name). False when a device the agent reads has no key."""
    kind, detail, model = _device_kind(type_name)
    if not kind:
        return True
    if "key" not in f:
        return False
    key = _int(f["key"])
    if kind == "controller":
        out.controllers[key] = Controller(key, detail, model, _int(f.get("busNumber")))
        return True
    label = f.get("label", "")
    backing = _backing_kind(backing_type) if backing_type else "other"
    if kind == "disk":
        capacity = _int(f.get("capacityInBytes")) or _int(f.get("capacityInKB")) * 1024
        thin = eager = None
        if backing == "rdm":
            backing = "rdm-physical" if f.get("compatibilityMode") == "physicalMode" else "rdm-virtual"
        elif backing == "flat":
            thin, eager = _bool(f.get("thinProvisioned")), _bool(f.get("eagerlyScrub"))
        elif backing == "sparse":
            thin, eager = True, False
        else:
            backing = "other"
        out.disks.append(Disk(key, label, _int(f.get("controllerKey")), _int(f.get("unitNumber"), -1), capacity,
                              f.get("fileName", ""), backing, thin, eager, f.get("changeId", ""),
                              f.get("diskMode", ""), f.get("uuid", "")))
        return True
    nic = Nic(key, label, detail, f.get("macAddress", ""), bool(_bool(f.get("connected"))),
              backing if backing in ("standard", "distributed", "opaque") else "other",
              device_name=f.get("deviceName", ""))
    if nic.backing == "standard":
        nic = Nic(**{**nic.__dict__, "network": f.get("network", "")})
    elif nic.backing == "distributed":
        nic = Nic(**{**nic.__dict__, "portgroup_key": f.get("portgroupKey", ""),
                     "switch_uuid": f.get("switchUuid", ""), "device_name": ""})
    elif nic.backing == "opaque":
        nic = Nic(**{**nic.__dict__, "opaque_id": f.get("opaqueNetworkId", ""),
                     "opaque_type": f.get("opaqueNetworkType", ""), "device_name": ""})
    out.nics.append(nic)
    return True


def _devices_et(val: ET.Element | None) -> _DeviceSet:
    out = _DeviceSet({}, [], [])
    if val is None:
        return out
    for d in val:
        type_name = _xtype(d)
        if not _device_kind(type_name)[0]:
            continue
        leaves: dict[str, str] = {}
        for e in d.iter():
            if len(e) == 0:
                leaves.setdefault(e.tag.rpartition("}")[2], e.text or "")
        backing = d.find(_V + "backing")
        if not _add_device(out, type_name, _xtype(backing) if backing is not None else "", leaves):
            raise VSphereFault("a virtual device without a key in the vCenter answer")
    return out


def _snapshots(val: ET.Element | None) -> tuple[list[SnapshotInfo], str]:
    if val is None:
        return [], ""
    out: list[SnapshotInfo] = []

    def walk(nodes: list[ET.Element], parent: str) -> None:
        for n in nodes:
            ref = _s(n, "snapshot")
            out.append(SnapshotInfo(ref, _s(n, "name"), _s(n, "description"), _time(_s(n, "createTime")),
                                    _i(n, "id"), bool(_b(n, "quiesced")), parent))
            walk(n.findall(_V + "childSnapshotList"), ref)

    walk(val.findall(_V + "rootSnapshotList"), "")
    return out, _s(val, "currentSnapshot")


def _value_et(name: str, val: ET.Element) -> Any:
    if name.endswith("hardware.device"):
        return _devices_et(val)
    if name == "snapshot":
        return _snapshots(val)
    if len(val):
        return val
    return val.text or ""


def _objects_et(data: bytes, method: str = "RetrievePropertiesEx") -> tuple[list[ObjectTuple], str]:
    ret = _response_element(data, method).find(_V + "returnval")
    if ret is None:
        return [], ""
    out = []
    for o in ret.iterfind(_V + "objects"):
        obj = o.find(_V + "obj")
        props: dict[str, Any] = {}
        for ps in o.iterfind(_V + "propSet"):
            val = ps.find(_V + "val")
            if val is not None:
                name = ps.findtext(_V + "name") or ""
                props[name] = _value_et(name, val)
        out.append((obj.get("type", "") if obj is not None else "", (obj.text or "") if obj is not None else "", props))
    return out, ret.findtext(_V + "token") or ""


_OBJ_HEAD_RE = re.compile(rb"\s*<obj\b([^>]*)>([^<]*)</obj>")
_PROP_HEAD_RE = re.compile(rb"\s*<name>([^<]*)</name>\s*<val\b([^>]*)>")
_TYPE_ATTR_RE = re.compile(rb'(?:^|\s)type="([^"]*)"')
_XSI_TYPE_RE = re.compile(rb'(?:^|\s)[\w.-]+:type="(?:[\w.-]+:)?([\w.-]+)"')
_LEAF_RE = re.compile(rb"<([A-Za-z][\w.-]*)(?:\s[^>]*?)?(?<!/)>([^<]*)</\1>")
_BACKING_RE = re.compile(rb"<backing\b([^>]*)>")
_TOKEN_RE = re.compile(rb"<token>([^<]*)</token>")
_NS_DECL_RE = re.compile(rb'xmlns(?::([\w.-]+))?="([^"]*)"')
_ATTR_RE = re.compile(rb'([\w.:-]+)="([^"]*)"')


def _text(raw: bytes) -> str:
    s = raw.decode("utf-8")
    return html.unescape(s) if "&" in s else s


_DEVICE_FIELDS = tuple((k, k.encode()) for k in (
    "key", "label", "busNumber", "controllerKey", "unitNumber", "capacityInBytes", "capacityInKB",
    "fileName", "changeId", "diskMode", "uuid", "thinProvisioned", "eagerlyScrub", "compatibilityMode",
    "macAddress", "connected", "network", "deviceName", "portgroupKey", "switchUuid", "opaqueNetworkId",
    "opaqueNetworkType"))


def _devices_fast(inner: bytes) -> _DeviceSet:
    """Devices of one config.hardware.device value (elements are found with bytes.find, which is
    much faster than lazy regular expressions over megabytes)."""
    out = _DeviceSet({}, [], [])
    pos = 0
    while True:
        a = inner.find(b"<VirtualDevice", pos)
        if a < 0:
            break
        head_end = inner.find(b">", a)
        close = inner.find(b"</VirtualDevice>", head_end)
        if head_end < 0 or close < 0 or inner[head_end - 1:head_end] == b"/":
            raise _NotForFastPath("unexpected device element")
        pos = close + 16
        t = _XSI_TYPE_RE.search(inner, a, head_end)
        if t is None:
            raise _NotForFastPath("device without xsi:type")
        type_name = t.group(1).decode("ascii")
        if not _device_kind(type_name)[0]:
            continue
        body = inner[head_end + 1:close]
        raw = dict(reversed(_LEAF_RE.findall(body)))  # first occurrence wins
        leaves = {k: _text(raw[kb]) for k, kb in _DEVICE_FIELDS if kb in raw}
        b = _BACKING_RE.search(body)
        backing = ""
        if b is not None:
            bt = _XSI_TYPE_RE.search(b.group(1))
            backing = bt.group(1).decode("ascii") if bt else ""
        if not _add_device(out, type_name, backing, leaves):
            raise _NotForFastPath("device without key")
    return out


def _fragment(namespaces: dict[bytes, bytes], attrs: bytes, inner: bytes) -> ET.Element:
    """Parse one <val> with ElementTree, carrying the namespace declarations in scope."""
    ns = dict(namespaces)
    plain: list[bytes] = []
    for k, v in _ATTR_RE.findall(attrs):
        if k == b"xmlns":
            ns[b""] = v
        elif k.startswith(b"xmlns:"):
            ns[k[6:]] = v
        else:
            plain.append(k + b'="' + v + b'"')
    ns.setdefault(b"", b"urn:vim25")
    decls = [(b'xmlns="' if not p else b'xmlns:' + p + b'="') + u + b'"' for p, u in ns.items()]
    return ET.fromstring(b"<val " + b" ".join(decls + plain) + b">" + inner + b"</val>")


def _objects_fast(data: bytes) -> tuple[list[ObjectTuple], str]:
    if b"<![CDATA[" in data:
        raise _NotForFastPath("CDATA")
    first = data.find(b"<objects>")
    if first < 0:
        raise _NotForFastPath("no objects")  # empty answers are cheap for ElementTree
    head = data[:first]
    namespaces = {p or b"": u for p, u in _NS_DECL_RE.findall(head)}
    token = _TOKEN_RE.search(head)
    out: list[ObjectTuple] = []
    pos = first
    while True:
        i = data.find(b"<objects>", pos)
        if i < 0:
            break
        j = data.find(b"</objects>", i)
        if j < 0:
            raise _NotForFastPath("unterminated objects")
        pos = j + 10
        om = _OBJ_HEAD_RE.match(data, i + 9, j)
        if om is None:
            raise _NotForFastPath("objects without obj")
        props: dict[str, Any] = {}
        k = om.end()
        while True:
            a = data.find(b"<propSet>", k, j)
            if a < 0:
                break
            e = data.find(b"</propSet>", a, j)
            if e < 0:
                raise _NotForFastPath("unterminated propSet")
            k = e + 10
            pm = _PROP_HEAD_RE.match(data, a + 9, e)
            if pm is None:
                raise _NotForFastPath("unrecognised propSet")
            name = pm.group(1).decode("utf-8")
            attrs = pm.group(2)
            if attrs.endswith(b"/"):
                props[name] = ""
                continue
            close = data.rfind(b"</val>", pm.end(), e)
            if close < 0:
                raise _NotForFastPath("unterminated val")
            inner = data[pm.end():close]
            if name.endswith("hardware.device"):
                props[name] = _devices_fast(inner)
            elif b"<" in inner:
                val = _fragment(namespaces, attrs, inner)
                props[name] = _snapshots(val) if name == "snapshot" else val
            else:
                props[name] = _text(inner)
        t = _TYPE_ATTR_RE.search(om.group(1))
        out.append((t.group(1).decode("ascii") if t else "", _text(om.group(2)), props))
    return out, _text(token.group(1)) if token else ""


def _objects(data: bytes, fast: bool = True) -> tuple[list[ObjectTuple], str]:
    """Objects of a RetrievePropertiesEx/ContinueRetrievePropertiesEx answer."""
    if fast:
        try:
            return _objects_fast(data)
        except _NotForFastPath:
            pass
        except (UnicodeDecodeError, ET.ParseError) as exc:
            log.debug("fast parse failed (%s); using ElementTree", exc)
    return _objects_et(data)


def _str(p: dict[str, Any], key: str) -> str:
    v = p.get(key)
    return v if isinstance(v, str) else ""


def _vm_record(moref: str, p: dict[str, Any]) -> VMRecord:
    devices = p.get("config.hardware.device")
    if not isinstance(devices, _DeviceSet):
        devices = _DeviceSet({}, [], [])
    snaps, current = p.get("snapshot") or ([], "")
    s = partial(_str, p)
    return VMRecord(
        moref=moref, name=s("name"), parent=s("parent"), parent_vapp=s("parentVApp"),
        uuid=s("config.uuid"), instance_uuid=s("config.instanceUuid"),
        config_guest_full_name=s("config.guestFullName"), config_guest_id=s("config.guestId"),
        vmx_version=s("config.version"), firmware=s("config.firmware"),
        template=s("config.template") == "true", annotation=s("config.annotation"),
        num_cpu=_int(s("config.hardware.numCPU")), memory_mb=_int(s("config.hardware.memoryMB")),
        cbt_enabled=s("config.changeTrackingEnabled") == "true",
        config_tools_version=_int(s("config.tools.toolsVersion")),
        power_state=s("runtime.powerState") or "unknown", host=s("runtime.host"),
        boot_time=_time(s("runtime.bootTime")),
        tools_status=s("guest.toolsStatus"), tools_running_status=s("guest.toolsRunningStatus"),
        tools_version=s("guest.toolsVersion"), tools_version_status=s("guest.toolsVersionStatus2"),
        guest_full_name=s("guest.guestFullName"), guest_id=s("guest.guestId"),
        snapshots=list(snaps), current_snapshot=current,
        controllers=devices.controllers, disks=devices.disks, nics=devices.nics,
    )


# =============================================================================================
# property collector specs


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
    parent = _str(p, "parent")
    if kind == "VirtualApp":
        parent = _str(p, "parentFolder") or _str(p, "parentVApp") or parent
    elif kind == "VirtualMachine" and not parent:
        parent = _str(p, "parentVApp")
    return InventoryNode(moref, kind, _str(p, "name"), parent)


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


# =============================================================================================
# session


@dataclass
class _Conn:
    stub: Any
    content: Any
    generation: int


class Session:
    """One vCenter login. Thread-safe: calls may run concurrently (pyVmomi pools connections)."""

    def __init__(self, params: VCenterParams):
        self.params = params
        self.host = params.label
        self.username = params.username
        self._lock = threading.Lock()
        self._conn: _Conn | None = None
        self._generation = 0
        self._ctx: _TLSContext | None = None
        self._about: Any = None
        self._datacenters: tuple[float, dict[str, DatacenterInfo]] | None = None
        self._keepalive_stop = threading.Event()
        self._keepalive_thread: threading.Thread | None = None
        self.closed = False
        self.fast_parse = True  # False: parse every answer with ElementTree (reference path)
        self.logins = 0
        self.last_used = time.monotonic()
        with self._translate():
            self._login()

    def __repr__(self) -> str:
        return f"Session(host={self.host!r}, user={self.username!r}, logins={self.logins})"

    # -- login

    def _negotiate_version(self, name: str, port: int) -> str:
        conn = http.client.HTTPSConnection(name, port, context=self._ctx, timeout=self.params.timeout)
        try:
            conn.request("GET", "/sdk/vimServiceVersions.xml")
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            return _FALLBACK_VERSION
        try:
            root = ET.fromstring(data)
        except ET.ParseError:
            return _FALLBACK_VERSION
        offered = set()
        for ns in root.iter("namespace"):
            if (ns.findtext("name") or "") != "urn:vim25":
                continue
            offered.update(v.text for v in ns.iter("version") if v.text)
        from pyVim.connect import GetServiceVersions

        for version in GetServiceVersions("vim25"):
            if VmomiSupport.versionIdMap.get(version) in offered:
                return version
        return _FALLBACK_VERSION

    def _login(self) -> None:
        name, port = self.params.address()
        self._ctx = _tls_context(self.params)
        version = self._negotiate_version(name, port)
        stub = SoapAdapter.SoapStubAdapter(
            host=name, port=port, version=version, path="/sdk", sslContext=self._ctx,
            httpConnectionTimeout=self.params.timeout, poolSize=_MAX_PARALLEL + 4,
        )
        si = vim.ServiceInstance("ServiceInstance", stub)
        content = si.RetrieveContent()
        try:
            content.sessionManager.Login(self.params.username, self.params.password, None)
        except BaseException:
            stub.DropConnections()
            raise
        self._about = content.about
        self._generation += 1
        self._conn = _Conn(stub, content, self._generation)
        self.logins += 1
        log.info("logged in to vCenter %s as %s (API %s)", self.host, self.username, version)

    def _relogin(self, failed_generation: int) -> None:
        with self._lock:
            if self._conn is not None and self._conn.generation != failed_generation:
                return  # another thread logged in again already
            log.info("vCenter %s session of %s expired; logging in again", self.host, self.username)
            old = self._conn
            self._login()
            if old is not None:
                old.stub.DropConnections()

    # -- plumbing

    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        host, user = self.host, self.username
        try:
            yield
        except errors.AgentError as exc:
            exc.message = _scrub(exc.message, self.params.password)
            exc.args = (exc.message,)
            raise
        except CertificateMismatch as exc:
            raise errors.FailedPrecondition(_scrub(str(exc), self.params.password)) from None
        except vim.fault.InvalidLogin:
            raise errors.Unauthenticated(f"vCenter {host} refused the login for {user}") from None
        except vim.fault.NotAuthenticated:
            raise errors.Unauthenticated(f"vCenter {host} did not accept the session of {user}") from None
        except vim.fault.NoPermission as exc:
            priv = getattr(exc, "privilegeId", "") or "?"
            obj = getattr(getattr(exc, "object", None), "_moId", "") or "?"
            raise errors.PermissionDenied(
                f"vCenter {host}: user {user} lacks privilege {priv} on {obj}") from None
        except vmodl.fault.ManagedObjectNotFound as exc:
            obj = getattr(getattr(exc, "obj", None), "_moId", "") or "an object"
            raise errors.NotFound(f"{obj} does not exist (any more) on vCenter {host}") from None
        except (vim.fault.ToolsUnavailable, vim.fault.InvalidPowerState) as exc:
            raise GuestOperationUnavailable(
                _scrub(f"vCenter {host}: {_fault_text(exc)}", self.params.password)) from None
        except (vim.fault.InvalidState, vim.fault.TaskInProgress, vim.fault.SnapshotFault) as exc:
            raise errors.FailedPrecondition(
                _scrub(f"vCenter {host}: {_fault_text(exc)}", self.params.password)) from None
        except vim.fault.HostConnectFault as exc:
            raise errors.Unavailable(
                _scrub(f"vCenter {host} is unreachable: {_fault_text(exc)}", self.params.password)) from None
        except vmodl.MethodFault as exc:
            raise VSphereFault(_scrub(f"vCenter {host}: {_fault_text(exc)}", self.params.password)) from None
        except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
            hint = ""
            if isinstance(exc, ssl.SSLCertVerificationError):
                with contextlib.suppress(errors.AgentError):
                    name, port = self.params.address()
                    fp = probe_certificate(name, port, min(self.params.timeout, 10.0))
                    hint = (f"; pin its thumbprint (SHA-1 {fp.sha1}) or provide its CA bundle "
                            "after checking it")
            raise errors.Unavailable(_scrub(
                f"vCenter {host} is unreachable: {_describe_os_error(exc)}{hint}", self.params.password)) from None
        except ET.ParseError as exc:
            raise errors.Unavailable(f"vCenter {host} sent a malformed answer: {exc}") from None

    def _run(self, fn: Callable[[_Conn], T]) -> T:
        """Run ``fn`` with the current connection; log in again once if the session expired."""
        if self.closed:
            raise errors.FailedPrecondition(f"the session to vCenter {self.host} is closed")
        self.last_used = time.monotonic()
        with self._translate():
            conn = self._conn
            assert conn is not None
            try:
                return fn(conn)
            except vim.fault.NotAuthenticated:
                self._relogin(conn.generation)
                assert self._conn is not None
                return fn(self._conn)

    def _mo(self, conn: _Conn, cls: type, moref: str) -> Any:
        return cls(moref, conn.stub)

    def _retrieve(self, conn: _Conn, specs: list[Any], max_objects: int | None = None) -> list[ObjectTuple]:
        """RetrievePropertiesEx and its continuations: [(type, moref, {path: value})]."""
        pc = conn.content.propertyCollector
        data = _invoke_raw(conn.stub, pc, "RetrievePropertiesEx", [specs, PC.RetrieveOptions(maxObjects=max_objects)])
        objs, token = _objects(data, self.fast_parse)
        while token:
            data = _invoke_raw(conn.stub, pc, "ContinueRetrievePropertiesEx", [token])
            more, token = _objects(data, self.fast_parse)
            objs.extend(more)
        return objs

    @contextlib.contextmanager
    def _view(self, conn: _Conn, root: Any, types: list[type]) -> Iterator[Any]:
        view = conn.content.viewManager.CreateContainerView(root, types, True)
        try:
            yield view
        finally:
            with contextlib.suppress(Exception):
                view.DestroyView()

    # -- keep-alive / close

    def start_keepalive(self, interval: float = 300.0) -> None:
        """Touch the session every ``interval`` seconds until :meth:`close` (long data copies)."""
        if self._keepalive_thread is not None:
            return

        def loop() -> None:
            while not self._keepalive_stop.wait(interval):
                try:
                    self._run(lambda c: c.content.sessionManager.currentSession)
                except errors.AgentError as exc:
                    log.warning("keep-alive of the vCenter %s session failed: %s", self.host, exc.message)

        self._keepalive_thread = threading.Thread(target=loop, name=f"vsphere-keepalive-{self.host}", daemon=True)
        self._keepalive_thread.start()

    def close(self, logout: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        self._keepalive_stop.set()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if logout:
            with contextlib.suppress(Exception):
                conn.content.sessionManager.Logout()
        with contextlib.suppress(Exception):
            conn.stub.DropConnections()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- server

    def server_info(self) -> ServerInfo:
        a = self._about
        der = self._ctx.peer_der if self._ctx else None
        return ServerInfo(self.host, a.fullName or "", a.version or "", a.build or "", a.apiType or "",
                          a.apiVersion or "", a.instanceUuid or "", Fingerprints.of(der) if der else None)

    # -- datacenters and inventory

    def datacenters(self, max_age: float = 60.0) -> dict[str, DatacenterInfo]:
        """All datacenters by moref (cached for ``max_age`` seconds)."""
        cached = self._datacenters
        if cached and time.monotonic() - cached[0] < max_age:
            return cached[1]

        def read(c: _Conn) -> dict[str, DatacenterInfo]:
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
            return {m: DatacenterInfo(m, _str(p, "name"), inventory_path(m, nodes), _str(p, "vmFolder"))
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

        def read(c: _Conn) -> Skeleton:
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
                    sk.hosts[m] = _str(p, "name")
                elif t in ("Network", "DistributedVirtualPortgroup", "OpaqueNetwork"):
                    sk.networks[m] = NetworkInfo(m, t, _str(p, "name"), _str(p, "key"))
                elif t in ("Folder", "VirtualApp", "VirtualMachine"):
                    sk.nodes[m] = _node(t, m, p)
                    if t == "VirtualMachine":
                        sk.vms.append(m)
                        if with_vm_properties:
                            sk.records[m] = _vm_record(m, p)
            return sk

        return self._run(read)

    def vm_records(self, morefs: Sequence[str], properties: Sequence[str] = VM_PROPERTIES,
                   parallel: int = _MAX_PARALLEL) -> list[VMRecord]:
        """VM properties for many VMs: chunks of VMs read over parallel connections."""
        if not morefs:
            return []
        n = len(morefs)
        chunks = max(1, min(parallel, (n + _PARALLEL_CHUNK - 1) // _PARALLEL_CHUNK))
        size = (n + chunks - 1) // chunks
        parts = [list(morefs[i:i + size]) for i in range(0, n, size)]

        def read_part(c: _Conn, part: list[str]) -> list[VMRecord]:
            spec = PC.FilterSpec(
                objectSet=[PC.ObjectSpec(obj=self._mo(c, vim.VirtualMachine, m), skip=False) for m in part],
                propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=list(properties))],
            )
            return [_vm_record(m, p) for t, m, p in self._retrieve(c, [spec]) if t == "VirtualMachine"]

        def read(c: _Conn) -> list[VMRecord]:
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

        def find(c: _Conn) -> str | None:
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
        return VMHandle(moref, _str(objs[0][2], "name"))

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

        def read(c: _Conn) -> VMRecord:
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
                    rec = _vm_record(m, p)
                    rec.path = inventory_path(m, nodes)
                    return rec
            raise errors.NotFound(f"VM {vm.moref} does not exist (any more) on vCenter {self.host}")

        return self._run(read)

    # -- power

    def power_state(self, vm: VMHandle) -> PowerInfo:
        def read(c: _Conn) -> PowerInfo:
            objs = self._retrieve(c, [PC.FilterSpec(
                objectSet=[PC.ObjectSpec(obj=self._mo(c, vim.VirtualMachine, vm.moref))],
                propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=list(_POWER_PROPERTIES))])])
            if not objs:
                raise errors.NotFound(f"VM {vm.moref} does not exist (any more) on vCenter {self.host}")
            p = objs[0][2]
            return PowerInfo(vm.moref, _str(p, "name"), _str(p, "config.uuid"),
                             _str(p, "runtime.powerState") or "unknown", _str(p, "guest.toolsStatus"),
                             _str(p, "guest.toolsRunningStatus"), _time(_str(p, "runtime.bootTime")))

        return self._run(read)

    def power_on(self, vm: VMHandle, timeout: float) -> None:
        self._task(lambda c: self._mo(c, vim.VirtualMachine, vm.moref).PowerOnVM_Task(), timeout,
                   f"power-on of VM {vm.name or vm.moref}")

    def power_off(self, vm: VMHandle, timeout: float) -> None:
        self._task(lambda c: self._mo(c, vim.VirtualMachine, vm.moref).PowerOffVM_Task(), timeout,
                   f"power-off of VM {vm.name or vm.moref}")

    def shutdown_guest(self, vm: VMHandle) -> None:
        """Ask the guest OS to shut down (returns at once; GuestOperationUnavailable without tools)."""
        self._run(lambda c: self._mo(c, vim.VirtualMachine, vm.moref).ShutdownGuest())

    def wait_power_state(self, vm: VMHandle, states: Sequence[str], timeout: float,
                         poll: float = 1.0) -> PowerInfo:
        """Poll until the VM is in one of ``states`` or ``timeout`` passed; the last reading."""
        deadline = time.monotonic() + timeout
        delay = min(0.1, poll)
        while True:
            info = self.power_state(vm)
            left = deadline - time.monotonic()
            if info.power_state in states or left <= 0:
                return info
            time.sleep(min(delay, left))
            delay = min(delay * 2, poll)

    # -- tasks

    def _task(self, start: Callable[[_Conn], Any], timeout: float, what: str) -> Any:
        """Start a task and wait for it; returns the task result (pyVmomi object, internal use)."""
        task = self._run(start)
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            info = self._run(lambda c: self._mo(c, vim.Task, task._moId).info)
            if info.state == "success":
                return info.result
            if info.state == "error":
                fault = info.error
                with self._translate():
                    if isinstance(fault, BaseException):
                        raise fault
                    raise VSphereFault(f"{what} failed on vCenter {self.host}")
            if time.monotonic() >= deadline:
                raise errors.DeadlineExceeded(
                    f"{what} on vCenter {self.host} did not finish within {timeout:.0f}s (task {task._moId})")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    # -- CBT and snapshots

    def set_change_tracking(self, vm: VMHandle, enabled: bool, timeout: float = 300.0) -> None:
        spec = vim.vm.ConfigSpec(changeTrackingEnabled=enabled)
        self._task(lambda c: self._mo(c, vim.VirtualMachine, vm.moref).ReconfigVM_Task(spec), timeout,
                   f"reconfiguration of VM {vm.name or vm.moref} (changeTrackingEnabled={enabled})")

    def list_snapshots(self, vm: VMHandle) -> list[SnapshotInfo]:
        """Every snapshot of the VM (tree order: parents before children)."""
        def read(c: _Conn) -> list[SnapshotInfo]:
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

        def read(c: _Conn) -> list[Disk]:
            objs = self._retrieve(c, [PC.FilterSpec(
                objectSet=[PC.ObjectSpec(obj=self._mo(c, vim.vm.Snapshot, moref))],
                propSet=[PC.PropertySpec(type=vim.vm.Snapshot, pathSet=["config.hardware.device"])])])
            if not objs:
                raise errors.NotFound(f"snapshot {moref} does not exist on vCenter {self.host}")
            devices = objs[0][2].get("config.hardware.device")
            return list(devices.disks) if isinstance(devices, _DeviceSet) else []

        return self._run(read)

    def query_changed_areas(self, vm: VMHandle, snapshot: SnapshotInfo | str | None, device_key: int,
                            change_id: str, capacity_bytes: int, start_offset: int = 0) -> list[tuple[int, int]]:
        """QueryChangedDiskAreas paged over [start_offset, capacity_bytes): the changed (or, with
        ``change_id="*"``, the allocated) areas as (offset, length) pairs, in order.

        Raises ChangeTrackingNotActive (CBT off, or snapshot taken with CBT off) or
        InvalidChangeId (change id rejected) - both ChangeTrackingUnusable: copy the whole disk."""
        snap_moref = snapshot.moref if isinstance(snapshot, SnapshotInfo) else (snapshot or "")
        label = f"disk {device_key} of VM {vm.name or vm.moref}"

        def query(c: _Conn) -> list[tuple[int, int]]:
            mo = self._mo(c, vim.VirtualMachine, vm.moref)
            snap = self._mo(c, vim.vm.Snapshot, snap_moref) if snap_moref else None
            areas: list[tuple[int, int]] = []
            offset = start_offset
            while offset < capacity_bytes:
                try:
                    resp = _invoke_xml(c.stub, mo, "QueryChangedDiskAreas", [snap, device_key, offset, change_id])
                except vim.fault.FileFault as exc:
                    raise ChangeTrackingNotActive(
                        f"changed block tracking is not active for {label} on vCenter {self.host}: "
                        f"{_fault_text(exc)}") from None
                except vmodl.fault.InvalidArgument as exc:
                    prop = getattr(exc, "invalidProperty", "") or ""
                    if prop in ("", "changeId"):
                        raise InvalidChangeId(
                            f"vCenter {self.host} rejected change id {change_id!r} for {label}") from None
                    raise errors.InvalidArgument(
                        f"vCenter {self.host} rejected QueryChangedDiskAreas for {label}: invalid {prop}") from None
                ret = resp.find(_V + "returnval") if resp is not None else None
                if ret is None:
                    raise VSphereFault(f"vCenter {self.host} answered QueryChangedDiskAreas for {label} with nothing")
                start, length = _i(ret, "startOffset"), _i(ret, "length")
                for a in ret.iterfind(_V + "changedArea"):
                    areas.append((_i(a, "start"), _i(a, "length")))
                if length <= 0:
                    raise VSphereFault(f"vCenter {self.host}: QueryChangedDiskAreas for {label} made no progress "
                                       f"at offset {offset}")
                offset = start + length
            return areas

        return self._run(query)


def connect(params: VCenterParams) -> Session:
    """A new session (log in now). Use :class:`SessionCache` to share logins between calls."""
    if not params.host.strip():
        raise errors.InvalidArgument("connection.host is required")
    if not params.username:
        raise errors.InvalidArgument("connection.username is required")
    if not params.password:
        raise errors.InvalidArgument("connection.password is required")
    params.address()
    params.tls_mode()
    return Session(params)


class SessionCache:
    """Logins shared between RPCs: one session per (host, user, TLS mode, password hash).

    Sessions idle longer than ``idle_seconds`` are logged out; a session whose vCenter became
    unreachable is dropped so the next call starts afresh."""

    def __init__(self, idle_seconds: float = 600.0, max_sessions: int = 32,
                 factory: Callable[[VCenterParams], Session] = connect):
        self._idle = idle_seconds
        self._max = max_sessions
        self._factory = factory
        self._lock = threading.Lock()
        self._sessions: dict[tuple[str, ...], Session] = {}
        self._key_locks: dict[tuple[str, ...], threading.Lock] = {}
        self.logins = 0

    def _evict(self) -> list[Session]:
        now = time.monotonic()
        old = [k for k, s in self._sessions.items() if s.closed or now - s.last_used > self._idle]
        while len(self._sessions) - len(old) >= self._max:
            rest = sorted((s.last_used, k) for k, s in self._sessions.items() if k not in old)
            old.append(rest[0][1])
        for k in old:
            self._key_locks.pop(k, None)
        return [self._sessions.pop(k) for k in old]

    def get(self, params: VCenterParams) -> Session:
        key = params.cache_key()
        with self._lock:
            stale = self._evict()
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        for s in stale:
            s.close()
        with key_lock:
            with self._lock:
                session = self._sessions.get(key)
            if session is not None and not session.closed:
                session.last_used = time.monotonic()
                return session
            try:
                session = self._factory(params)
            except BaseException:
                with self._lock:
                    if key not in self._sessions:
                        self._key_locks.pop(key, None)  # no entry per failed (e.g. wrong) password
                raise
            with self._lock:
                self.logins += 1
                existing = self._sessions.get(key)
                if existing is None or existing.closed:
                    self._sessions[key] = session
                    return session
            session.close()  # raced with another login for the same key: keep the first
            return existing

    @contextlib.contextmanager
    def session(self, params: VCenterParams) -> Iterator[Session]:
        s = self.get(params)
        try:
            yield s
        except errors.Unavailable:
            self.discard(s, logout=False)
            raise
        except errors.Unauthenticated:
            self.discard(s, logout=False)
            raise

    def discard(self, session: Session, logout: bool = True) -> None:
        with self._lock:
            for k, s in list(self._sessions.items()):
                if s is session:
                    del self._sessions[k]
        session.close(logout=logout)

    def stop(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            s.close()

    def __len__(self) -> int:
        return len(self._sessions)
