"""PowerService: PowerOff, PowerOn, GetPowerState (thin: validate, call the domain, convert)."""
from __future__ import annotations

from vma.v1 import power_pb2, power_pb2_grpc

from vma_agent import errors, power
from vma_agent.config import Settings
from vma_agent.integrations import vsphere
from vma_agent.services import timestamp
from vma_agent.services.discovery import connection_params, vm_ref


def _result(r: power.PowerResult) -> power_pb2.PowerOperationResult:
    return power_pb2.PowerOperationResult(
        success=r.success, vm_id=r.vm_id, previous_state=r.previous_state, new_state=r.new_state,
        operation=r.operation, method=r.method, duration_ms=r.duration_ms, timestamp=timestamp(r.timestamp),
        message=r.message, tools_status=r.tools_status)


class PowerServicer(power_pb2_grpc.PowerServiceServicer):
    def __init__(self, sessions: vsphere.SessionCache, settings: Settings):
        self._sessions = sessions
        self._settings = settings

    def _params(self, request) -> vsphere.VCenterParams:
        return connection_params(request.connection, self._settings.vcenter_timeout_seconds)

    def PowerOff(self, request, context):
        if request.timeout_seconds < 0:
            raise errors.InvalidArgument("timeout_seconds cannot be negative")
        params, ref = self._params(request), vm_ref(request.vm)
        with self._sessions.session(params) as session:
            result = power.power_off(
                session, ref, datacenter=request.connection.datacenter, force=request.force,
                timeout_seconds=request.timeout_seconds or self._settings.power_off_timeout_seconds,
                force_after_timeout=request.force_after_timeout)
        return power_pb2.PowerOffResponse(result=_result(result))

    def PowerOn(self, request, context):
        if request.timeout_seconds < 0:
            raise errors.InvalidArgument("timeout_seconds cannot be negative")
        params, ref = self._params(request), vm_ref(request.vm)
        with self._sessions.session(params) as session:
            result = power.power_on(
                session, ref, datacenter=request.connection.datacenter,
                timeout_seconds=request.timeout_seconds or self._settings.power_on_timeout_seconds,
                wait_for_tools=request.wait_for_tools)
        return power_pb2.PowerOnResponse(result=_result(result))

    def GetPowerState(self, request, context):
        params, ref = self._params(request), vm_ref(request.vm)
        with self._sessions.session(params) as session:
            state = power.power_state(session, ref, datacenter=request.connection.datacenter)
        return power_pb2.GetPowerStateResponse(
            vm_id=state.vm_id, power_state=state.power_state, tools_status=state.tools_status,
            last_state_change=timestamp(state.last_state_change), uptime_seconds=state.uptime_seconds,
            timestamp=timestamp(state.timestamp))
