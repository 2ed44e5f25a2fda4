"""CBTService: GetCBTStatus and EnableCBT (thin: validate, call the domain, convert)."""
from __future__ import annotations

from vma.v1 import cbt_pb2, cbt_pb2_grpc

from vma_agent import cbt
from vma_agent.config import Settings
from vma_agent.integrations import vsphere
from vma_agent.services.discovery import connection_params, vm_ref


def _disks(disks: list[cbt.DiskCBT]) -> list[cbt_pb2.DiskCBTStatus]:
    return [cbt_pb2.DiskCBTStatus(disk_id=d.disk_id, label=d.label, active=d.active, change_id=d.change_id)
            for d in disks]


class CBTServicer(cbt_pb2_grpc.CBTServiceServicer):
    def __init__(self, sessions: vsphere.SessionCache, settings: Settings):
        self._sessions = sessions
        self._settings = settings

    def GetCBTStatus(self, request, context):
        params = connection_params(request.connection, self._settings.vcenter_timeout_seconds)
        ref = vm_ref(request.vm)
        with self._sessions.session(params) as session:
            s = cbt.cbt_status(session, ref, datacenter=request.connection.datacenter)
        return cbt_pb2.GetCBTStatusResponse(
            enabled=s.enabled, vm_name=s.vm_name, vm_path=s.vm_path, power_state=s.power_state,
            snapshot_count=s.snapshot_count, disks=_disks(s.disks))

    def EnableCBT(self, request, context):
        params = connection_params(request.connection, self._settings.vcenter_timeout_seconds)
        ref = vm_ref(request.vm)
        with self._sessions.session(params) as session:
            r = cbt.enable_cbt(session, ref, datacenter=request.connection.datacenter)
        return cbt_pb2.EnableCBTResponse(
            enabled=r.enabled, already_enabled=r.already_enabled, activation_snapshot=r.activation_snapshot,
            message=r.message, disks=_disks(r.disks))
