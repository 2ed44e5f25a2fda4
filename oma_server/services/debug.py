from __future__ import annotations

import time
from typing import TYPE_CHECKING

from oma.v1 import debug_pb2 as pb
from oma.v1 import debug_pb2_grpc

from oma_server.convert import fill, optional, struct, timestamp
from oma_server.db.models import utcnow
from oma_server.domain import cloudstack_config, debug
from oma_server.rpc import PUBLIC_METHOD_PREFIXES, current_identity

if TYPE_CHECKING:
    from oma_server.startup import Components


def _component(probe: debug.Probe) -> pb.DebugComponentHealth:
    return fill(pb.DebugComponentHealth(), vars(probe), details=struct(probe.details))


class DebugServicer(debug_pb2_grpc.DebugServiceServicer):

    def __init__(self, runtime, parts: Components):
        # Servicers are built when the server starts: this is the server's start time.
        self._runtime, self._parts = runtime, parts
        self._started_at = utcnow()
        self._started = time.monotonic()

    def GetSystemHealth(self, request, context):
        if current_identity.get() is None:  # anonymous: liveness only, no internals
            return pb.GetSystemHealthResponse(system_health=debug.overall([debug.database_health()]),
                                              version=debug.version(), checked_at=timestamp(utcnow()))
        parts, sink = self._parts, self._parts.log_events
        probes = [
            debug.database_health(),
            debug.replication_health(parts.replication.instance, self._runtime.settings.worker_lease_seconds),
            debug.vma_health(parts.vma),
            debug.cloudstack_health(cloudstack_config.active_config(), self._runtime.secrets),
            debug.log_sink_health(sink.dropped),
            debug.vma_connections_health(parts.vma_monitor is not None),
        ]
        scheduler_probe, scheduler = debug.scheduler_health(parts.scheduler)
        probes.append(scheduler_probe)
        return pb.GetSystemHealthResponse(
            system_health=debug.overall(probes), version=debug.version(), started_at=timestamp(self._started_at),
            uptime_seconds=int(time.monotonic() - self._started), components=[_component(p) for p in probes],
            runtime=fill(pb.DebugRuntimeStats(), debug.runtime_stats()),
            scheduler=fill(pb.DebugSchedulerHealth(), scheduler),
            log_sink_dropped_records=sink.dropped, checked_at=timestamp(utcnow()),
        )

    def GetFailoverJobsDebug(self, request, context):
        report = debug.failover_jobs_debug(request.long_running_minutes)
        response = pb.GetFailoverJobsDebugResponse(
            non_terminal_jobs=[fill(pb.DebugFailoverJob(), j["job"], age_seconds=j["age_seconds"])
                               for j in report["non_terminal_jobs"]],
            long_running_jobs=[fill(pb.DebugTrackedJob(), j["job"], job_id=j["job"].id,
                                    running_seconds=j["running_seconds"]) for j in report["long_running_jobs"]],
            generated_at=timestamp(report["generated_at"]),
        )
        response.counts_by_status.update(report["counts_by_status"])
        response.counts_by_type.update(report["counts_by_type"])
        return response

    def ListEndpoints(self, request, context):
        page = debug.endpoints(request.service, PUBLIC_METHOD_PREFIXES, request.page_size, request.page_token)
        return pb.ListEndpointsResponse(endpoints=[fill(pb.DebugEndpoint(), e) for e in page.items],
                                        count=page.total, next_page_token=page.next_page_token)

    def GetRecentLogs(self, request, context):
        events, next_token = debug.recent_logs(
            level=request.level, job_id=request.job_id, external_job_id=request.external_job_id,
            since=optional(request, "since"),
            page_size=request.page_size, page_token=request.page_token)
        return pb.GetRecentLogsResponse(
            events=[fill(pb.DebugLogEvent(), e, job_id=e.job_id, step_id=e.step_id, attrs=struct(e.attrs))
                    for e in events],
            next_page_token=next_token)
