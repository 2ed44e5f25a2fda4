from __future__ import annotations

from typing import Any

from oma.v1 import validation_pb2 as pb
from oma.v1 import validation_pb2_grpc

from oma_server.convert import fill, struct, timestamp
from oma_server.domain import readiness, validation
from oma_server.integrations.vma_client import VmaClient


def _check(check: dict[str, Any]) -> pb.VMValidationCheck:
    return fill(pb.VMValidationCheck(), check, details=struct(check.get("details")))


def _readiness_message(result: readiness.ReadinessResult) -> str:
    if result.is_valid:
        return f"{result.vm_name} is ready for a {result.failover_type} failover"
    return f"{result.vm_name} is not ready for a {result.failover_type} failover: {'; '.join(result.errors)}"


class ValidationServicer(validation_pb2_grpc.ValidationServiceServicer):

    def __init__(self, vma: VmaClient):
        self._vma = vma

    def GetVMFailoverReadiness(self, request, context):
        ctx, result = validation.failover_readiness(request.vm_id, request.failover_type,
                                                    self._vma)
        checks = [_check(vars(c)) for c in result.checks]
        return pb.GetVMFailoverReadinessResponse(
            vm_id=request.vm_id, context_id=ctx.context_id, vm_name=ctx.vm_name, is_ready=result.is_valid,
            readiness_score=result.score, required_actions=result.required_actions,
            validated_at=timestamp(result.validated_at), message=_readiness_message(result),
            validation_result=pb.VMValidationResult(
                is_valid=result.is_valid, validation_errors=result.errors, validation_warnings=result.warnings,
                checks=checks, execution_time_ms=result.execution_time_ms),
        )

    def GetVMSyncStatus(self, request, context):
        ctx, status = validation.sync_status(request.vm_id)
        return pb.GetVMSyncStatusResponse(vm_id=request.vm_id, context_id=ctx.context_id,
                                          sync_status=fill(pb.VMSyncStatus(), status))

    def GetVMNetworkMappingStatus(self, request, context):
        ctx, failover_type, status = validation.network_status(request.vm_id, request.failover_type)
        return pb.GetVMNetworkMappingStatusResponse(vm_id=request.vm_id, context_id=ctx.context_id,
                                                    failover_type=failover_type,
                                                    network_status=fill(pb.VMNetworkStatus(), status))

    def GetVMVolumeStatus(self, request, context):
        ctx, status = validation.volume_status(request.vm_id)
        message = fill(pb.VMVolumeStatus(), status, volumes=[fill(pb.VMVolumeState(), v) for v in status["volumes"]])
        return pb.GetVMVolumeStatusResponse(vm_id=request.vm_id, context_id=ctx.context_id, volume_status=message)

    def GetVMActiveJobs(self, request, context):
        ctx, jobs = validation.active_jobs(request.vm_id)
        return pb.GetVMActiveJobsResponse(vm_id=request.vm_id, context_id=ctx.context_id,
                                          active_jobs=[fill(pb.VMActiveJob(), j) for j in jobs],
                                          jobs_count=len(jobs), has_active_jobs=bool(jobs))

    def ValidateVMConfiguration(self, request, context):
        ctx, result = validation.configuration_check(request.vm_id)
        return fill(pb.ValidateVMConfigurationResponse(), result, vm_id=request.vm_id, context_id=ctx.context_id,
                    checks=[_check(c) for c in result["checks"]])
