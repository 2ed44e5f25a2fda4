"""ScheduleService: schedules CRUD (replication_schedules), manual triggers and execution listings
(schedule_executions, schedule_execution_summary). Every successful write reloads the scheduler, so a
changed expression, time zone or enabled flag takes effect at once."""
from __future__ import annotations

from oma.v1 import schedules_pb2 as pb
from oma.v1 import schedules_pb2_grpc

from oma_server.convert import fill, optional_fields, struct, timestamp
from oma_server.db.models import utcnow
from oma_server.domain import schedules
from oma_server.domain.scheduler import Scheduler
from oma_server.rpc import caller_name


def schedule_message(view: schedules.ScheduleView) -> pb.ReplicationSchedule:
    return fill(pb.ReplicationSchedule(), view.schedule, group_count=view.group_count, vm_count=view.vm_count,
                last_execution=view.last_execution, next_execution=view.next_execution)


def execution_message(view: schedules.ExecutionView) -> pb.ScheduleExecution:
    e = view.execution
    details = e.execution_details
    return fill(
        pb.ScheduleExecution(), e, schedule_id=e.schedule_id, group_id=e.group_id,
        schedule_name=view.summary["schedule_name"], success_rate_percent=view.summary["success_rate_percent"],
        vms_processed=details.get("vms_processed", 0) if isinstance(details, dict) else 0,
        execution_duration_seconds=view.duration_seconds, execution_type=schedules.execution_type(e.triggered_by),
        execution_details=struct(details, keep_empty=True), error_details=struct(e.error_details, keep_empty=True),
    )


class ScheduleServicer(schedules_pb2_grpc.ScheduleServiceServicer):

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler

    def CreateSchedule(self, request, context):
        view = schedules.create(
            name=request.name, description=request.description, cron_expression=request.cron_expression,
            timezone=request.timezone, schedule_type=request.schedule_type,
            chain_parent_schedule_id=request.chain_parent_schedule_id, replication_type=request.replication_type,
            created_by=request.created_by or caller_name("api"),
            **optional_fields(request, "chain_delay_minutes", "max_concurrent_jobs", "retry_attempts",
                              "retry_delay_minutes", "enabled", "skip_if_running"),
        )
        self._scheduler.reload()
        return pb.CreateScheduleResponse(schedule=schedule_message(view))

    def ListSchedules(self, request, context):
        listed = schedules.list_schedules(enabled_only=request.enabled_only, page_size=request.page_size,
                                          page_token=request.page_token)
        return pb.ListSchedulesResponse(
            schedules=[schedule_message(v) for v in listed.views], total_count=listed.page.total,
            enabled_count=listed.enabled_count, disabled_count=listed.disabled_count,
            retrieved_at=timestamp(utcnow()), next_page_token=listed.page.next_page_token,
        )

    def GetSchedule(self, request, context):
        return pb.GetScheduleResponse(schedule=schedule_message(schedules.get_view(request.id)))

    def UpdateSchedule(self, request, context):
        changes = optional_fields(request, *schedules.UPDATABLE)
        view = schedules.update(request.id, changes, caller_name())
        self._scheduler.reload()
        return pb.UpdateScheduleResponse(schedule=schedule_message(view))

    def DeleteSchedule(self, request, context):
        schedules.delete(request.id, caller_name())
        self._scheduler.reload()
        return pb.DeleteScheduleResponse()

    def SetScheduleEnabled(self, request, context):
        view = schedules.set_enabled(request.id, request.enabled, caller_name())
        self._scheduler.reload()
        return pb.SetScheduleEnabledResponse(schedule=schedule_message(view))

    def TriggerSchedule(self, request, context):
        admission = self._scheduler.trigger(request.id, caller_name("manual"), request.reason)
        e = admission.execution
        return pb.TriggerScheduleResponse(
            execution_id=e.id, schedule_id=admission.schedule.id, schedule_name=admission.schedule.name,
            status=e.status, triggered_at=timestamp(e.started_at), triggered_by=e.triggered_by,
            reason=request.reason, job_id=admission.job_id,
        )

    def ListScheduleExecutions(self, request, context):
        views, page = schedules.list_executions(request.schedule_id, status=request.status,
                                                page_size=request.page_size, page_token=request.page_token)
        return pb.ListScheduleExecutionsResponse(executions=[execution_message(v) for v in views],
                                                 total_count=page.total, next_page_token=page.next_page_token)

    def GetSchedulerStatus(self, request, context):
        status = self._scheduler.status()
        return fill(
            pb.GetSchedulerStatusResponse(), is_running=status.is_running, started_at=status.started_at,
            active_schedules=len(status.registrations), running_executions=status.running_executions,
            max_concurrent_executions=status.max_concurrent_executions, last_reload_at=status.last_reload_at,
            registrations=[fill(pb.ScheduleRegistration(), r) for r in status.registrations],
        )
