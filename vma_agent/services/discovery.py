"""DiscoveryService: Discover and CheckConnection (thin: validate, call the domain, convert).

Also home of the helpers the vSphere-facing servicers share: the VCenterConnection / VMReference
messages turned into the integration's plain parameters, with INVALID_ARGUMENT naming the missing
field.
"""
from __future__ import annotations

import time

from vma.v1 import discovery_pb2, discovery_pb2_grpc

from vma_agent import errors, inventory
from vma_agent.config import Settings
from vma_agent.integrations import vsphere


def connection_params(conn, timeout: float) -> vsphere.VCenterParams:
    """vsphere.VCenterParams from a vma.v1.VCenterConnection (host, username, password required)."""
    for name in ("host", "username", "password"):
        if not getattr(conn, name).strip():
            raise errors.InvalidArgument(f"connection.{name} is required")
    params = vsphere.VCenterParams(
        host=conn.host.strip(), username=conn.username.strip(), password=conn.password,
        thumbprint=conn.thumbprint.strip(), ca_pem=conn.ca_pem, insecure=conn.insecure, timeout=timeout,
    )
    params.address()
    params.tls_mode()
    return params


def vm_ref(ref) -> vsphere.VMRef:
    """vsphere.VMRef from a vma.v1.VMReference (one of uuid, moref or path required)."""
    out = vsphere.VMRef(uuid=ref.uuid.strip(), moref=ref.moref.strip(), path=ref.path.strip())
    if not (out.uuid or out.moref or out.path):
        raise errors.InvalidArgument("vm: one of vm.uuid, vm.moref or vm.path is required")
    return out


def _budget(settings: Settings, context) -> float:
    budget = settings.vcenter_timeout_seconds
    remaining = context.time_remaining() if context is not None else None
    if remaining is not None:
        budget = min(budget, max(remaining, 0.5))
    return budget


def _vm_message(vm: inventory.DiscoveredVM) -> discovery_pb2.VirtualMachine:
    return discovery_pb2.VirtualMachine(
        id=vm.id, instance_uuid=vm.instance_uuid, moref=vm.moref, name=vm.name, path=vm.path,
        datacenter=vm.datacenter, folder_path=vm.folder_path, power_state=vm.power_state,
        guest_os=vm.guest_os, guest_full_name=vm.guest_full_name, guest_id=vm.guest_id,
        num_cpu=vm.num_cpu, memory_mb=vm.memory_mb, vmx_version=vm.vmx_version,
        tools_status=vm.tools_status, tools_version=vm.tools_version, firmware=vm.firmware,
        annotation=vm.annotation, cbt_enabled=vm.cbt_enabled, snapshot_count=vm.snapshot_count,
        host=vm.host,
        disks=[discovery_pb2.VirtualDisk(
            id=d.id, key=d.key, label=d.label, vmdk_path=d.vmdk_path, datastore=d.datastore,
            capacity_bytes=d.capacity_bytes, size_gb=d.size_gb, unit_number=d.unit_number,
            controller_key=d.controller_key, controller_type=d.controller_type, bus_number=d.bus_number,
            provisioning_type=d.provisioning_type, backing_type=d.backing_type,
            change_tracking_active=d.change_tracking_active) for d in vm.disks],
        networks=[discovery_pb2.NetworkAdapter(
            label=n.label, network_name=n.network_name, mac_address=n.mac_address,
            adapter_type=n.adapter_type, connected=n.connected, key=n.key) for n in vm.networks],
    )


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServiceServicer):
    def __init__(self, sessions: vsphere.SessionCache, settings: Settings):
        self._sessions = sessions
        self._settings = settings

    def Discover(self, request, context):
        budget = _budget(self._settings, context)
        params = connection_params(request.connection, budget)
        deadline = time.monotonic() + budget
        with self._sessions.session(params) as session:
            result = inventory.discover(
                session, datacenter=request.connection.datacenter, filter=request.filter,
                folder=request.folder, names=list(request.names), deadline=deadline)
        return discovery_pb2.DiscoverResponse(
            vcenter_host=result.vcenter_host, datacenter=result.datacenter,
            vms=[_vm_message(vm) for vm in result.vms], elapsed_ms=result.elapsed_ms)

    def CheckConnection(self, request, context):
        params = connection_params(request.connection, min(_budget(self._settings, context), 30.0))
        datacenter = request.connection.datacenter.strip()
        try:
            with self._sessions.session(params) as session:
                info = session.server_info()
                names = sorted(d.name for d in session.datacenters(max_age=0).values())
                thumbprint = info.fingerprints.sha1 if info.fingerprints else ""
                version = f"{info.version} (build {info.build})" if info.build else info.version
                if datacenter:
                    try:
                        session.datacenter(datacenter)
                    except errors.NotFound as exc:
                        return discovery_pb2.CheckConnectionResponse(
                            success=False, message=exc.message, vcenter_version=version,
                            datacenters=names, thumbprint=thumbprint)
                where = f", datacenter {datacenter} found" if datacenter else ""
                return discovery_pb2.CheckConnectionResponse(
                    success=True, message=f"logged in to {info.full_name} at {session.host} as {params.username}{where}",
                    vcenter_version=version, datacenters=names, thumbprint=thumbprint)
        except (errors.Unauthenticated, errors.Unavailable, errors.FailedPrecondition,
                errors.PermissionDenied, errors.DeadlineExceeded, vsphere.VSphereFault) as exc:
            thumbprint = ""
            try:
                name, port = params.address()
                thumbprint = vsphere.probe_certificate(name, port, min(params.timeout, 10.0)).sha1
            except errors.AgentError:
                pass
            return discovery_pb2.CheckConnectionResponse(success=False, message=exc.message, thumbprint=thumbprint)
