"""omactl schedules: replication schedules, their executions and manual triggers."""
from __future__ import annotations

import argparse
from typing import Any

from oma.v1 import schedules_pb2 as schedules_pb

from omaclient import output
from omaclient.cli.common import (
    Session,
    UsageError,
    add_command,
    add_family,
    add_limit,
    limited,
    schedule_id_of,
    set_present,
)


def _schedule_values(s: Session, args: argparse.Namespace) -> dict[str, Any]:
    """The fields create and update share, None where the option was not given."""
    return {
        "description": args.description, "cron_expression": args.cron, "timezone": args.timezone,
        "replication_type": args.type, "max_concurrent_jobs": args.max_concurrent,
        "retry_attempts": args.retries, "retry_delay_minutes": args.retry_delay,
        "skip_if_running": args.skip_if_running, "chain_delay_minutes": args.chain_delay,
        "chain_parent_schedule_id": schedule_id_of(s, args.after) if args.after else None,
        "schedule_type": "chain" if args.after else None,
    }


def _schedules_create(s: Session, args: argparse.Namespace) -> None:
    if not args.cron and not args.after:
        raise UsageError("a schedule needs --cron EXPRESSION, or --after SCHEDULE for a chained one")
    request = set_present(schedules_pb.CreateScheduleRequest(name=args.name), **_schedule_values(s, args),
                           enabled=False if args.disabled else None)
    response = s.call(s.client.schedules.CreateSchedule, request)

    def render(r: Any) -> str:
        nxt = f", next run {output.when(r.schedule.next_execution)}" if r.schedule.HasField("next_execution") else ""
        return f"created schedule {r.schedule.name} ({r.schedule.id}){nxt}"

    s.show(response, render)


def _schedules_list(s: Session, args: argparse.Namespace) -> None:
    request = schedules_pb.ListSchedulesRequest(enabled_only=args.enabled)
    schedules = list(s.client.pages(s.client.schedules.ListSchedules, request, "schedules"))
    enabled = sum(1 for x in schedules if x.enabled)
    s.show(schedules_pb.ListSchedulesResponse(schedules=schedules, total_count=len(schedules), enabled_count=enabled,
                                              disabled_count=len(schedules) - enabled),
           lambda r: output.table(r.schedules, output.SCHEDULE_COLUMNS, empty="no schedules"))


def _schedules_show(s: Session, args: argparse.Namespace) -> None:
    request = schedules_pb.GetScheduleRequest(id=schedule_id_of(s, args.schedule))
    s.show(s.call(s.client.schedules.GetSchedule, request), lambda r: output.schedule_details(r.schedule))


def _schedules_update(s: Session, args: argparse.Namespace) -> None:
    request = set_present(schedules_pb.UpdateScheduleRequest(id=schedule_id_of(s, args.schedule)), name=args.name,
                           **_schedule_values(s, args))
    response = s.call(s.client.schedules.UpdateSchedule, request)
    s.show(response, lambda r: f"updated schedule {r.schedule.name} ({r.schedule.id})")


def _schedules_delete(s: Session, args: argparse.Namespace) -> None:
    schedule_id = schedule_id_of(s, args.schedule)
    response = s.call(s.client.schedules.DeleteSchedule, schedules_pb.DeleteScheduleRequest(id=schedule_id))
    s.show(response, lambda r: f"deleted schedule {args.schedule}")


def _schedules_enable(s: Session, args: argparse.Namespace) -> None:
    enabled = args.schedules_action == "enable"
    request = schedules_pb.SetScheduleEnabledRequest(id=schedule_id_of(s, args.schedule), enabled=enabled)
    response = s.call(s.client.schedules.SetScheduleEnabled, request)

    def render(r: Any) -> str:
        nxt = f"; next run {output.when(r.schedule.next_execution)}" if r.schedule.HasField("next_execution") else ""
        return f"schedule {r.schedule.name} is {'enabled' if r.schedule.enabled else 'disabled'}{nxt}"

    s.show(response, render)


def _schedules_trigger(s: Session, args: argparse.Namespace) -> None:
    request = schedules_pb.TriggerScheduleRequest(id=schedule_id_of(s, args.schedule), reason=args.reason or "")
    response = s.call(s.client.schedules.TriggerSchedule, request)
    s.show(response, lambda r: f"triggered schedule {r.schedule_name}: execution {r.execution_id} is {r.status} "
                               f"(job {r.job_id}); see: omactl schedules executions {r.schedule_name}")


def _schedules_executions(s: Session, args: argparse.Namespace) -> None:
    request = schedules_pb.ListScheduleExecutionsRequest(schedule_id=schedule_id_of(s, args.schedule),
                                                         status=args.status or "")
    executions = limited(s, s.client.schedules.ListScheduleExecutions, request, "executions", args.limit)
    s.show(schedules_pb.ListScheduleExecutionsResponse(executions=executions, total_count=len(executions)),
           lambda r: output.table(r.executions, output.SCHEDULE_EXECUTION_COLUMNS, empty="no executions"))


def _schedules_status(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.schedules.GetSchedulerStatus, schedules_pb.GetSchedulerStatusRequest())
    s.show(response, output.scheduler_status)


def _add_schedule_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cron", metavar="EXPRESSION",
                   help="5 fields (minute hour day month weekday), or 6 with seconds first, e.g. '0 2 * * *'")
    p.add_argument("--timezone", help="IANA time zone the expression is read in (default UTC)")
    p.add_argument("--description")
    p.add_argument("--type", choices=["auto", "full", "incremental"], help="replication type (default auto)")
    p.add_argument("--max-concurrent", type=int, metavar="N", help="concurrent jobs, 1-100 (default 1)")
    p.add_argument("--retries", type=int, metavar="N", help="retry attempts of a failed job (default 3)")
    p.add_argument("--retry-delay", type=int, metavar="MINUTES", help="between retries (default 30)")
    p.add_argument("--skip-if-running", action=argparse.BooleanOptionalAction,
                   help="skip a firing while the previous one still runs (default: skip)")
    p.add_argument("--after", metavar="SCHEDULE", help="chain: run after each execution of this schedule")
    p.add_argument("--chain-delay", type=int, metavar="MINUTES", help="with --after: wait this long (default 0)")


def register_schedules(commands: Any) -> None:
    actions = add_family(commands, "schedules",
                      "replication schedules (attach a group with: omactl groups update GROUP --schedule SCHEDULE)")
    p = add_command(actions, "create", _schedules_create, "create a schedule")
    p.add_argument("name")
    _add_schedule_options(p)
    p.add_argument("--disabled", action="store_true", help="create it disabled")
    p = add_command(actions, "list", _schedules_list, "list schedules with their next run and groups")
    p.add_argument("--enabled", action="store_true", help="enabled ones only")
    p = add_command(actions, "show", _schedules_show, "show a schedule")
    p.add_argument("schedule", metavar="SCHEDULE", help="schedule name or id")
    p = add_command(actions, "update", _schedules_update, "change a schedule (only the given fields)")
    p.add_argument("schedule", metavar="SCHEDULE", help="schedule name or id")
    p.add_argument("--name", help="new name")
    _add_schedule_options(p)
    p = add_command(actions, "delete", _schedules_delete, "delete a schedule no group uses (its executions go too)")
    p.add_argument("schedule", metavar="SCHEDULE", help="schedule name or id")
    for action, text in (("enable", "enable a schedule"), ("disable", "disable a schedule (it stops firing)")):
        p = add_command(actions, action, _schedules_enable, text)
        p.add_argument("schedule", metavar="SCHEDULE", help="schedule name or id")
    p = add_command(actions, "trigger", _schedules_trigger, "run a schedule now (replicates its groups' VMs)")
    p.add_argument("schedule", metavar="SCHEDULE", help="schedule name or id")
    p.add_argument("--reason", help="recorded with the execution")
    p = add_command(actions, "executions", _schedules_executions, "list a schedule's executions, newest first")
    p.add_argument("schedule", metavar="SCHEDULE", help="schedule name or id")
    p.add_argument("--status", help="scheduled, running, completed, failed, skipped or cancelled")
    add_limit(p)
    add_command(actions, "status", _schedules_status, "the scheduler's state and registered schedules")
