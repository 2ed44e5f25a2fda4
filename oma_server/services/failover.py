from __future__ import annotations

from google.protobuf import struct_pb2
from oma.v1 import failover_pb2 as pb
from oma.v1 import failover_pb2_grpc

from oma_server.convert import fill, optional, struct, struct_dict, timestamp
from oma_server.db.database import database_proxy as db
from oma_server.db.models import FailoverJob, JobTracking, VmDisk, utcnow
from oma_server.domain import failover, failover_config, joblog, paging, readiness
from oma_server.domain.failover_config import FailoverConfig, FailoverRequest
from oma_server.domain.step_names import friendly_step_name
from oma_server.errors import require
from oma_server.integrations.vma_client import VmaClient
from oma_server.rpc import caller_name
from oma_server.workflows.failover import FailoverEngine

# How often a watcher re-reads the database without a wake-up (another OMA may run the job).
_WATCH_POLL_SECONDS = 0.5
_BYTES_PER_SECOND = 100 * 1024 * 1024  # rough copy/boot rate for the readiness estimate


def configuration(config: FailoverConfig | None) -> pb.FailoverConfiguration | None:
    if config is None:
        return None
    values = config.message_fields()
    mappings = values.pop("network_mappings")
    message = fill(pb.FailoverConfiguration(), values)
    message.network_mappings.update(mappings)
    return message


def failover_request(request: pb.StartFailoverRequest) -> FailoverRequest:
    return FailoverRequest(
        context_id=request.context_id, vmware_vm_id=request.vmware_vm_id, vm_name=request.vm_name,
        failover_type=request.failover_type,
        power_off_source=optional(request, "power_off_source"),
        perform_final_sync=optional(request, "perform_final_sync"),
        skip_validation=optional(request, "skip_validation"),
        skip_virtio=optional(request, "skip_virtio"),
        network_strategy=request.network_strategy, vm_naming=request.vm_naming, test_duration=request.test_duration,
        auto_cleanup=optional(request, "auto_cleanup"),
        custom_config=struct_dict(request.custom_config), network_mappings=dict(request.network_mappings),
        request_id=request.request_id,
    )


def tracking_message(job: JobTracking, steps: list) -> pb.FailoverJobTracking:
    prog = joblog.progress(job, steps)
    return fill(
        pb.FailoverJobTracking(), job, job_id=job.id, parent_job_id=job.parent_job_id,
        metadata=struct(failover.loads(job.metadata), keep_empty=True), total_steps=prog["total_steps"],
        completed_steps=prog["completed_steps"], failed_steps=prog["failed_steps"],
        running_steps=prog["running_steps"], skipped_steps=prog["skipped_steps"],
        progress_percent=int(prog["step_completion_percentage"]), last_activity=prog["last_activity"],
        runtime_seconds=prog["runtime_seconds"],
        steps=[fill(pb.FailoverJobStep(), s, job_id=s.job_id, display_name=friendly_step_name(s.name),
                    metadata=struct(failover.loads(s.metadata), keep_empty=True)) for s in steps],
    )


def record_message(record: FailoverJob, progress: int | None = None) -> pb.FailoverJob:
    return fill(pb.FailoverJob(), record, vm_context_id=record.vm_context_id,
                source_vm_spec=struct(failover.loads(record.source_vm_spec), keep_empty=True),
                network_mappings=struct(failover.loads(record.network_mappings), keep_empty=True),
                progress=failover.record_progress(record) if progress is None else progress)


class FailoverServicer(failover_pb2_grpc.FailoverServiceServicer):

    def __init__(self, engine: FailoverEngine, vma: VmaClient):
        self._engine, self._vma = engine, vma

    def _submit(self, started: failover.Started) -> failover.Started:
        if not started.existing:
            self._engine.submit(started.job_id)
        return started

    # --- starting work ------------------------------------------------------------------------------
    def _start(self, request: FailoverRequest, response_type):
        started = self._submit(failover.start_failover(request, caller_name(), self._engine))
        return fill(response_type(), job_id=started.job_id, external_job_id=started.external_job_id,
                    context_id=started.context_id, failover_job_id=started.failover_job_id, status=started.status,
                    message=started.message, configuration=configuration(started.configuration),
                    existing=started.existing)

    def StartFailover(self, request, context):
        return self._start(failover_request(request), pb.StartFailoverResponse)

    def StartLiveFailover(self, request, context):
        return self._start(FailoverRequest(
            context_id=request.context_id, vmware_vm_id=request.vmware_vm_id, vm_name=request.vm_name,
            failover_type="live",
            skip_validation=optional(request, "skip_validation"),
            skip_virtio=optional(request, "skip_virtio"),
            power_off_source=optional(request, "power_off_source"),
            perform_final_sync=optional(request, "perform_final_sync"),
            network_mappings=dict(request.network_mappings), custom_config=struct_dict(request.custom_config),
            notification_config=struct_dict(request.notification_config), request_id=request.request_id,
        ), pb.StartLiveFailoverResponse)

    def StartTestFailover(self, request, context):
        return self._start(FailoverRequest(
            context_id=request.context_id, vmware_vm_id=request.vmware_vm_id, vm_name=request.vm_name,
            failover_type="test",
            skip_validation=optional(request, "skip_validation"),
            skip_virtio=optional(request, "skip_virtio"),
            test_duration=request.test_duration,
            auto_cleanup=optional(request, "auto_cleanup"),
            network_mappings=dict(request.network_mappings), custom_config=struct_dict(request.custom_config),
            notification_config=struct_dict(request.notification_config), request_id=request.request_id,
        ), pb.StartTestFailoverResponse)

    def _cleanup_response(self, started: failover.Started, response_type):
        return fill(response_type(), job_id=started.job_id, external_job_id=started.external_job_id,
                    context_id=started.context_id, failover_job_id=started.failover_job_id, vm_name=started.vm_name,
                    message=started.message, existing=started.existing)

    def EndTestFailover(self, request, context):
        started = self._submit(failover.start_end_test(request.job_id, request.request_id, caller_name(), self._engine))
        return self._cleanup_response(started, pb.EndTestFailoverResponse)

    def CleanupTestFailover(self, request, context):
        started = self._submit(failover.start_cleanup_test(
            vm_name=request.vm_name, context_id=request.context_id, vmware_vm_id=request.vmware_vm_id,
            cleanup_type=request.cleanup_type, request_id=request.request_id, actor=caller_name(), worker=self._engine))
        return self._cleanup_response(started, pb.CleanupTestFailoverResponse)

    def CleanupFailedExecution(self, request, context):
        started = self._submit(failover.start_cleanup_failed(
            vm_name=request.vm_name, context_id=request.context_id, request_id=request.request_id,
            actor=caller_name(), worker=self._engine))
        return self._cleanup_response(started, pb.CleanupFailedExecutionResponse)

    def StartRollback(self, request, context):
        started = self._submit(failover.start_rollback(failover.RollbackRequest(
            context_id=request.context_id, vm_name=request.vm_name, vmware_vm_id=request.vmware_vm_id,
            failover_type=request.failover_type, failover_job_id=request.failover_job_id,
            power_on_source=optional(request, "power_on_source"),
            force_cleanup=optional(request, "force_cleanup"),
            request_id=request.request_id), caller_name(), self._engine))
        return fill(pb.StartRollbackResponse(), started.extra, job_id=started.job_id,
                    external_job_id=started.external_job_id, context_id=started.context_id,
                    failover_job_id=started.failover_job_id, vm_name=started.vm_name,
                    message=started.message, existing=started.existing)

    def GetRollbackDecision(self, request, context):
        return fill(pb.GetRollbackDecisionResponse(), failover_config.rollback_decision(request.failover_type))

    # --- reads --------------------------------------------------------------------------------------
    def _status(self, identifier: str) -> tuple[failover.StatusView, pb.GetFailoverStatusResponse]:
        view = failover.find(identifier)
        job, record = view.job, view.record
        tracked = tracking_message(job, view.steps) if job is not None else None
        if record is not None:
            progress = failover.record_progress(record) if job is None or job.id != record.job_id else \
                (tracked.progress_percent if tracked else None)
            record_msg = record_message(record, progress)
        else:
            record_msg = None
        started_at = (job.started_at if job is not None else None) or (record.started_at if record else None)
        completed_at = (job.completed_at if job is not None else None) or (record.completed_at if record else None)
        response = fill(
            pb.GetFailoverStatusResponse(),
            job_id=job.id if job is not None else record.job_id,
            external_job_id=job.external_job_id if job is not None else None,
            context_id=(job.context_id if job is not None else None) or (record.vm_context_id if record else None),
            failover_job_id=record.job_id if record else None,
            status=str(job.status) if job is not None else str(record.status),
            progress=tracked.progress_percent if tracked else failover.STATUS_PROGRESS.get(record.status, 50),
            started_at=started_at, duration_seconds=failover.duration_seconds(started_at, completed_at),
            tracking_source="job_tracking" if job is not None else "failover_jobs",
            job=tracked, failover_job=record_msg,
        )
        return view, response

    def GetFailoverStatus(self, request, context):
        return self._status(request.job_id)[1]

    def WatchFailoverJob(self, request, context):
        require(request.job_id, "job_id is required")
        hub = self._engine.hub
        last = None
        key = None
        while context.is_active():
            with db.connection_context():
                view, status = self._status(request.job_id)
            key = key or (view.job.id if view.job is not None else status.job_id)
            seen = hub.version(key)
            message = pb.WatchFailoverJobResponse(terminal=view.terminal)
            if status.HasField("job"):
                message.job.CopyFrom(status.job)
            if status.HasField("failover_job"):
                message.failover_job.CopyFrom(status.failover_job)
            if message != last:
                yield message
                last = message
            if view.terminal:
                return
            hub.wait(key, seen, _WATCH_POLL_SECONDS)

    def GetFailoverReadiness(self, request, context):
        ctx = failover.readiness_context(request.vm_id)
        kind = readiness.failover_type_or_default(request.failover_type)
        result = readiness.failover_readiness(ctx, kind, vma=self._vma if kind == "live" else None)
        capacity = sum(d.capacity_bytes or 0 for d in VmDisk.select().where(VmDisk.vm_context == ctx.context_id))
        estimate = 120 + capacity // _BYTES_PER_SECOND if capacity else 0
        return pb.GetFailoverReadinessResponse(
            context_id=ctx.context_id, vm_name=ctx.vm_name, failover_type=kind, is_valid=result.is_valid,
            readiness_score=result.score, validation_errors=result.errors, validation_warnings=result.warnings,
            required_actions=result.required_actions,
            checks=[fill(pb.FailoverReadinessCheck(), check_name=c.check_name, check_type=c.check_type,
                         status=c.status, message=c.message, details=struct(failover.loads(c.details), keep_empty=True),
                         execution_time_ms=c.execution_time_ms) for c in result.checks],
            execution_time_ms=result.execution_time_ms, validated_at=timestamp(result.validated_at),
            estimated_duration_seconds=int(estimate),
        )

    def ListFailoverJobs(self, request, context):
        query = failover.list_failover_jobs(failover_type=request.failover_type, status=request.status,
                                            vm_id=request.vm_id, context_id=request.context_id)
        page = paging.paginate(query, request.page_size, request.page_token)
        items = [fill(pb.FailoverJobSummary(), r, vm_context_id=r.vm_context_id, vm_name=r.source_vm_name,
                      progress=failover.record_progress(r), snapshot_id=r.ossea_snapshot_id,
                      duration_seconds=failover.duration_seconds(r.started_at or r.created_at, r.completed_at))
                 for r in page.items]
        return pb.ListFailoverJobsResponse(failover_jobs=items, next_page_token=page.next_page_token,
                                           total_count=page.total)

    def GetPreflightConfig(self, request, context):
        options = failover_config.preflight_options(request.failover_type)
        response = pb.GetPreflightConfigResponse(
            failover_type=request.failover_type, vm_name=request.vm_name, version=failover_config.VERSION,
            description=f"Pre-flight options of a {request.failover_type} failover",
            generated_at=timestamp(utcnow()))
        for name, option in options.items():
            default = option.pop("default_value")
            value = struct_pb2.Value(bool_value=default) if isinstance(default, bool) else \
                struct_pb2.Value(string_value=str(default))
            response.options[name].CopyFrom(fill(pb.FailoverPreflightOption(), option, default_value=value))
        return response

    def ValidatePreflightConfig(self, request, context):
        checked = failover_config.check(failover_request(request.request))
        valid = not checked.errors
        return pb.ValidatePreflightConfigResponse(
            valid=valid, errors=checked.errors,
            message="the configuration is valid" if valid else f"{len(checked.errors)} problem(s) found",
            configuration=configuration(checked.config) if valid else None,
            validated_at=timestamp(utcnow()), version=failover_config.VERSION)
