"""vSphere (vCenter) through pyVmomi: the only package of the agent that imports pyVim/pyVmomi.

Everything that leaves this package is a plain dataclass (managed object references as their string
values, e.g. ``"vm-42"``); errors are :mod:`vma_agent.errors` exceptions whose messages name the
vCenter host and the object and never contain a password. Import from the package, not from its
modules: the names below are its API.

Modules (each depends only on those above it)
    ``types``       plain data: connection parameters, VM records, disks, NICs, snapshots, paths
    ``faults``      the package's exceptions; pyVmomi faults and network errors -> agent errors
    ``tls``         thumbprint pinning inside the handshake, CA bundles, certificate probing
    ``soap``        raw SOAP answers through pyVmomi's stub (for the parser below)
    ``properties``  the hand-written property-collector parser (why it exists: its docstring)
    ``plumbing``    retrievals, container views and tasks on top of one login
    ``inventory``, ``power``, ``snapshots``   the operations, mixed into ``Session``
    ``session``     :class:`Session` (login, re-login, keep-alive) and :func:`connect`
    ``cache``       :class:`SessionCache`: logins shared between RPCs

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
    (exact names / filters: the names come first from the skeleton). pyVmomi builds and sends every
    request, owns the session cookie and turns SOAP faults into its exception classes; the answers
    of property retrievals are parsed by ``properties`` (pyVmomi's deserializer costs ~4 ms per VM).

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
from vma_agent.integrations.vsphere.cache import SessionCache
from vma_agent.integrations.vsphere.faults import (
    CertificateMismatch,
    ChangeTrackingNotActive,
    ChangeTrackingUnusable,
    GuestOperationUnavailable,
    InvalidChangeId,
    VSphereFault,
)
from vma_agent.integrations.vsphere.session import Session, connect
from vma_agent.integrations.vsphere.tls import probe_certificate
from vma_agent.integrations.vsphere.types import (
    VM_PROPERTIES,
    Controller,
    DatacenterInfo,
    Disk,
    Fingerprints,
    InventoryNode,
    NetworkInfo,
    Nic,
    PowerInfo,
    ServerInfo,
    Skeleton,
    SnapshotInfo,
    VCenterParams,
    VMHandle,
    VMRecord,
    VMRef,
    inventory_path,
)

__all__ = [
    "VM_PROPERTIES", "CertificateMismatch", "ChangeTrackingNotActive", "ChangeTrackingUnusable",
    "Controller", "DatacenterInfo", "Disk", "Fingerprints", "GuestOperationUnavailable",
    "InvalidChangeId", "InventoryNode", "NetworkInfo", "Nic", "PowerInfo", "ServerInfo", "Session",
    "SessionCache", "Skeleton", "SnapshotInfo", "VCenterParams", "VMHandle", "VMRecord", "VMRef",
    "VSphereFault", "connect", "inventory_path", "probe_certificate",
]
