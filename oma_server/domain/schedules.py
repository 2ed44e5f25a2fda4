"""Replication schedules (replication_schedules): validation, CRUD and fire-time arithmetic.

Everything a schedule says is checked when it is written, so the scheduler never meets a schedule it
cannot run (the original accepted 5-field expressions its engine then refused silently; docs/design/scheduler.md#cron-and-time-zone):

* cron: 5 fields (minute precision) or 6 fields with the seconds FIRST, as the original stores them;
  croniter wants the seconds last, so a 6-field expression is rotated before evaluation (the stored
  text stays as given). The descriptors @yearly/@annually/@monthly/@weekly/@daily/@midnight/@hourly
  are accepted too. A valid expression must also have a next fire time (``0 0 31 2 *`` never fires).
* timezone: an IANA name; the expression is evaluated in it, DST included (:func:`next_fire`).
* chain schedules name a parent schedule and fire after its executions; a parent chain must not
  loop back to the schedule itself.

Fire times are returned as naive UTC datetimes (the storage convention). DST rules, as vixie cron:
a wall-clock time skipped by a spring-forward fires when the clock jumps (02:30 → 03:00); a
wall-clock time repeated by a fall-back fires once, at its first occurrence — unless the hour field is
``*``, in which case the schedule keeps its real interval through the repeated hour.
"""
from __future__ import annotations

import functools
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from croniter import CroniterError, croniter
from peewee import IntegrityError, fn

from oma_server.db.models import (
    JobCategory,
    JobType,
    ReplicationSchedule,
    ScheduleExecution,
    ScheduleExecutionStatus,
    ScheduleReplicationType,
    ScheduleType,
    VmGroupMembership,
    VmMachineGroup,
    utcnow,
)
from oma_server.db.views import ScheduleExecutionSummaryRow
from oma_server.domain import joblog, paging, text_rules
from oma_server.domain.text_rules import quote
from oma_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, require

SCHEDULER_OWNER = "scheduler-service"
CHAIN_TRIGGER = "chain"
# Values of schedule_executions.triggered_by that mean "fired by the scheduler's clock" (the original
# wrote ``scheduler-service``; the column default is ``scheduler``).
SCHEDULED_TRIGGERS = (SCHEDULER_OWNER, "scheduler")

MAX_CONCURRENT_JOBS_RANGE = (1, 100)
RETRY_ATTEMPTS_RANGE = (0, 10)
RETRY_DELAY_MINUTES_RANGE = (0, 1440)
CHAIN_DELAY_MINUTES_RANGE = (0, 1440)
EXECUTIONS_DEFAULT_PAGE, EXECUTIONS_MAX_PAGE = 20, 100

_DESCRIPTORS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}


# --- cron and time zones -------------------------------------------------------------------------

@dataclass(frozen=True)
class Cron:
    """A validated expression in croniter's field order, and whether its hour field is ``*``."""

    expression: str
    every_hour: bool


def parse_cron(text: str) -> Cron:
    """Validate a cron expression (see the module docstring) → croniter's form; INVALID_ARGUMENT otherwise."""
    stripped = (text or "").strip()
    require(stripped, "cron_expression is required")
    require(len(stripped) <= 100, "cron_expression is longer than 100 characters")
    fields = _DESCRIPTORS.get(stripped.lower(), stripped).split()
    if len(fields) == 5:
        minute_first = fields
    elif len(fields) == 6:  # seconds first (the original's form) → croniter's seconds-last form
        minute_first = [*fields[1:], fields[0]]
    else:
        raise InvalidArgument(
            f"cron_expression {quote(stripped)} must have 5 fields (minute hour day month weekday) or 6 "
            "(second minute hour day month weekday)")
    cron = Cron(" ".join(minute_first), minute_first[1] == "*")
    try:
        croniter(cron.expression, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except (CroniterError, ValueError, KeyError, IndexError, OverflowError) as exc:
        raise InvalidArgument(f"cron_expression {quote(stripped)} is not valid: {exc}") from None
    return cron


@functools.cache
def _zone_names() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def parse_timezone(name: str) -> zoneinfo.ZoneInfo:
    name = (name or "").strip() or "UTC"
    if name not in _zone_names():
        raise InvalidArgument(f"timezone {quote(name)} is not an IANA time zone name (e.g. 'Europe/Berlin', 'UTC')")
    return zoneinfo.ZoneInfo(name)


def _repeated_occurrence(local: datetime) -> bool:
    """True when ``local`` is the second occurrence of a wall-clock time repeated by a fall-back."""
    wall = local.replace(tzinfo=None)
    first, second = (wall.replace(tzinfo=local.tzinfo, fold=f).utcoffset() for f in (0, 1))
    return first > second and local.utcoffset() == second


def next_fire(cron_expression: str, timezone: str, after: datetime) -> datetime:
    """The first fire time strictly after ``after`` (naive UTC), evaluated in ``timezone``; naive UTC."""
    cron, zone = parse_cron(cron_expression), parse_timezone(timezone)
    start = after.replace(tzinfo=UTC).astimezone(zone)
    times = croniter(cron.expression, start)
    while True:
        local = times.get_next(datetime)
        if cron.every_hour or not _repeated_occurrence(local):
            return local.astimezone(UTC).replace(tzinfo=None)


def next_execution(schedule: ReplicationSchedule, after: datetime | None = None) -> datetime | None:
    """When an enabled cron schedule fires next (None when disabled, a chain schedule, or unusable)."""
    if not schedule.enabled or schedule.schedule_type != ScheduleType.CRON:
        return None
    try:
        return next_fire(schedule.cron_expression, schedule.timezone, after or utcnow())
    except (InvalidArgument, CroniterError):  # a row written by another tool: shown without a next run
        return None


# --- reads ---------------------------------------------------------------------------------------

def get(schedule_id: str) -> ReplicationSchedule:
    require(schedule_id, "schedule id is required")
    schedule = ReplicationSchedule.get_or_none(ReplicationSchedule.id == schedule_id)
    if schedule is None:
        raise NotFound(f"no schedule {quote(schedule_id)}")
    return schedule


@dataclass
class ScheduleView:
    """A schedule with the computed columns of the ``active_schedules`` view."""

    schedule: ReplicationSchedule
    group_count: int = 0
    vm_count: int = 0
    last_execution: datetime | None = None
    next_execution: datetime | None = None


def views_of(schedules: list[ReplicationSchedule]) -> list[ScheduleView]:
    """Group and VM counts and last/next execution for many schedules in three queries."""
    ids = [s.id for s in schedules]
    if not ids:
        return []
    groups = dict(VmMachineGroup.select(VmMachineGroup.schedule, fn.COUNT(VmMachineGroup.id))
                  .where(VmMachineGroup.schedule.in_(ids)).group_by(VmMachineGroup.schedule).tuples())
    vms = dict(
        VmGroupMembership.select(VmMachineGroup.schedule, fn.COUNT(VmGroupMembership.vm_context.distinct()))
        .join(VmMachineGroup, on=(VmGroupMembership.group == VmMachineGroup.id))
        .where(VmMachineGroup.schedule.in_(ids), VmGroupMembership.enabled == True)  # noqa: E712
        .group_by(VmMachineGroup.schedule).tuples())
    last = dict(ScheduleExecution.select(ScheduleExecution.schedule, fn.MAX(ScheduleExecution.started_at))
                .where(ScheduleExecution.schedule.in_(ids)).group_by(ScheduleExecution.schedule).tuples())
    now = utcnow()
    return [ScheduleView(s, groups.get(s.id, 0), vms.get(s.id, 0), last.get(s.id), next_execution(s, now))
            for s in schedules]


def get_view(schedule_id: str) -> ScheduleView:
    return views_of([get(schedule_id)])[0]


@dataclass
class ScheduleList:
    views: list[ScheduleView]
    page: paging.Page
    enabled_count: int
    disabled_count: int


def list_schedules(*, enabled_only: bool = False, page_size: int = 0, page_token: str = "") -> ScheduleList:
    query = ReplicationSchedule.select()
    if enabled_only:
        query = query.where(ReplicationSchedule.enabled == True)  # noqa: E712
    page = paging.paginate(query.order_by(ReplicationSchedule.name, ReplicationSchedule.id), page_size, page_token)
    enabled = ReplicationSchedule.select().where(ReplicationSchedule.enabled == True).count()  # noqa: E712
    return ScheduleList(views_of(page.items), page, enabled, ReplicationSchedule.select().count() - enabled)


# --- writes --------------------------------------------------------------------------------------

def _check_range(name: str, value: int, bounds: tuple[int, int]) -> int:
    low, high = bounds
    if not low <= value <= high:
        raise InvalidArgument(f"{name} must be between {low} and {high}, got {value}")
    return value


def _choice(name: str, value: str, allowed: type, default: str) -> str:
    value = value or default
    if value not in set(allowed):
        raise InvalidArgument(f"{name} must be one of {', '.join(allowed)}, got {quote(value)}")
    return value


def _check_name(name: str, current_id: str | None = None) -> str:
    name = text_rules.name(name, ReplicationSchedule.name)
    require(name, "name is required")
    clash = ReplicationSchedule.select().where(ReplicationSchedule.name == name)
    if current_id:
        clash = clash.where(ReplicationSchedule.id != current_id)
    if clash.exists():
        raise AlreadyExists(f"a schedule named {quote(name)} already exists")
    return name


def _check_chain(schedule_id: str | None, parent_id: str) -> None:
    """The parent exists and following parents from it never comes back to this schedule."""
    seen = {schedule_id}
    current: str | None = parent_id
    while current:
        if current in seen:
            raise InvalidArgument(f"chain_parent_schedule_id {quote(parent_id)} would make a cycle of chain schedules")
        seen.add(current)
        row = ReplicationSchedule.get_or_none(ReplicationSchedule.id == current)
        if row is None:
            raise NotFound(f"no schedule {quote(current)} (chain_parent_schedule_id)")
        current = row.chain_parent_schedule_id


def _check_shape(values: dict[str, Any], schedule_id: str | None) -> None:
    """Type-dependent rules on the schedule as it will be stored: a cron schedule has a valid
    expression and no parent; a chain schedule has an acyclic parent (its expression is unused)."""
    if values["schedule_type"] == ScheduleType.CRON:
        parse_cron(values["cron_expression"])
        require(not values["chain_parent_schedule"],
                "chain_parent_schedule_id is only for chain schedules (schedule_type 'chain')")
    else:
        require(values["chain_parent_schedule"], "a chain schedule needs chain_parent_schedule_id")
        if values["cron_expression"]:
            parse_cron(values["cron_expression"])
        _check_chain(schedule_id, values["chain_parent_schedule"])
    parse_timezone(values["timezone"])


def create(*, name: str, description: str = "", cron_expression: str, timezone: str = "", schedule_type: str = "",
           chain_parent_schedule_id: str = "", chain_delay_minutes: int | None = None, replication_type: str = "",
           max_concurrent_jobs: int | None = None, retry_attempts: int | None = None,
           retry_delay_minutes: int | None = None, enabled: bool | None = None, skip_if_running: bool | None = None,
           created_by: str) -> ScheduleView:
    created_by = text_rules.name(created_by, ReplicationSchedule.created_by)
    values: dict[str, Any] = {
        "description": text_rules.free_text(description, ReplicationSchedule.description) or None,
        "cron_expression": (cron_expression or "").strip(),
        "timezone": (timezone or "").strip() or "UTC",
        "schedule_type": _choice("schedule_type", schedule_type, ScheduleType, ScheduleType.CRON),
        "chain_parent_schedule": chain_parent_schedule_id or None,
        "chain_delay_minutes": _check_range("chain_delay_minutes", chain_delay_minutes or 0, CHAIN_DELAY_MINUTES_RANGE),
        "replication_type": _choice("replication_type", replication_type, ScheduleReplicationType,
                                    ScheduleReplicationType.AUTO),
        "max_concurrent_jobs": _check_range("max_concurrent_jobs", 1 if max_concurrent_jobs is None
                                            else max_concurrent_jobs, MAX_CONCURRENT_JOBS_RANGE),
        "retry_attempts": _check_range("retry_attempts", 3 if retry_attempts is None else retry_attempts,
                                       RETRY_ATTEMPTS_RANGE),
        "retry_delay_minutes": _check_range("retry_delay_minutes", 30 if retry_delay_minutes is None
                                            else retry_delay_minutes, RETRY_DELAY_MINUTES_RANGE),
        "enabled": True if enabled is None else enabled,
        "skip_if_running": True if skip_if_running is None else skip_if_running,
        "created_by": created_by,
    }
    values["name"] = _check_name(name)
    text_rules.fit(ReplicationSchedule, values)
    _check_shape(values, None)
    try:
        with joblog.recorded_operation(JobType.SCHEDULE_MANAGEMENT, "create-schedule", owner=created_by,
                                       metadata={"name": values["name"]}, category=JobCategory.SCHEDULER) as step:
            schedule = ReplicationSchedule.create(**values)
            step.details["schedule_id"] = schedule.id
    except IntegrityError:  # a concurrent create took the name between the check and the insert
        raise AlreadyExists(f"a schedule named {quote(values['name'])} already exists") from None
    return get_view(schedule.id)


UPDATABLE = ("name", "description", "cron_expression", "timezone", "schedule_type", "chain_parent_schedule_id",
              "chain_delay_minutes", "replication_type", "max_concurrent_jobs", "retry_attempts",
              "retry_delay_minutes", "enabled", "skip_if_running")


def update(schedule_id: str, changes: dict[str, Any], actor: str) -> ScheduleView:
    """Partial update: only the fields in ``changes`` (a present empty chain parent clears it)."""
    schedule = get(schedule_id)
    unknown = set(changes) - set(UPDATABLE)
    if unknown:
        raise InvalidArgument(f"cannot update {', '.join(sorted(unknown))}")
    if not changes:
        raise InvalidArgument("no fields to update")
    merged: dict[str, Any] = {
        "cron_expression": schedule.cron_expression, "timezone": schedule.timezone,
        "schedule_type": schedule.schedule_type, "chain_parent_schedule": schedule.chain_parent_schedule_id,
    }
    values: dict[str, Any] = {}
    if "name" in changes:
        values["name"] = _check_name(changes["name"], schedule_id)
    if "description" in changes:
        values["description"] = text_rules.free_text(changes["description"], ReplicationSchedule.description) or None
    if "cron_expression" in changes:
        values["cron_expression"] = changes["cron_expression"].strip()
    if "timezone" in changes:
        values["timezone"] = changes["timezone"].strip() or "UTC"
    if "schedule_type" in changes:
        values["schedule_type"] = _choice("schedule_type", changes["schedule_type"], ScheduleType, ScheduleType.CRON)
    if "chain_parent_schedule_id" in changes:
        values["chain_parent_schedule"] = changes["chain_parent_schedule_id"] or None
    if "replication_type" in changes:
        values["replication_type"] = _choice("replication_type", changes["replication_type"],
                                             ScheduleReplicationType, ScheduleReplicationType.AUTO)
    for name, bounds in (("chain_delay_minutes", CHAIN_DELAY_MINUTES_RANGE),
                         ("max_concurrent_jobs", MAX_CONCURRENT_JOBS_RANGE),
                         ("retry_attempts", RETRY_ATTEMPTS_RANGE),
                         ("retry_delay_minutes", RETRY_DELAY_MINUTES_RANGE)):
        if name in changes:
            values[name] = _check_range(name, changes[name], bounds)
    for name in ("enabled", "skip_if_running"):
        if name in changes:
            values[name] = bool(changes[name])
    text_rules.fit(ReplicationSchedule, values)
    merged.update({k: v for k, v in values.items() if k in merged})
    _check_shape(merged, schedule_id)
    with joblog.recorded_operation(JobType.SCHEDULE_MANAGEMENT, "update-schedule", owner=actor,
                                   metadata={"schedule_id": schedule_id, "fields": sorted(changes)},
                                   category=JobCategory.SCHEDULER):
        ReplicationSchedule.update(values).where(ReplicationSchedule.id == schedule_id).execute()
    return get_view(schedule_id)


def delete(schedule_id: str, actor: str) -> None:
    """Refused while groups use the schedule; executions cascade, chain children and membership
    overrides lose the reference (the foreign keys' ON DELETE)."""
    schedule = get(schedule_id)
    groups = VmMachineGroup.select().where(VmMachineGroup.schedule == schedule_id).count()
    if groups:
        raise FailedPrecondition(
            f"cannot delete schedule {quote(schedule.name)}: {groups} machine groups are still using this schedule")
    with joblog.recorded_operation(JobType.SCHEDULE_MANAGEMENT, "delete-schedule", owner=actor,
                                   metadata={"schedule_id": schedule_id, "name": schedule.name},
                                   category=JobCategory.SCHEDULER):
        ReplicationSchedule.delete().where(ReplicationSchedule.id == schedule_id).execute()


def set_enabled(schedule_id: str, enabled: bool, actor: str) -> ScheduleView:
    schedule = get(schedule_id)
    if enabled and schedule.schedule_type == ScheduleType.CRON:
        parse_cron(schedule.cron_expression)  # a row written elsewhere must be fixed before it can run
        parse_timezone(schedule.timezone)
    with joblog.recorded_operation(JobType.SCHEDULE_CONTROL, "enable-schedule", owner=actor,
                                   metadata={"schedule_id": schedule_id, "enabled": enabled},
                                   category=JobCategory.SCHEDULER):
        ReplicationSchedule.update(enabled=enabled).where(ReplicationSchedule.id == schedule_id).execute()
    return get_view(schedule_id)


# --- executions ----------------------------------------------------------------------------------

def execution_type(triggered_by: str) -> str:
    if triggered_by in SCHEDULED_TRIGGERS:
        return "scheduled"
    return "chain" if triggered_by == CHAIN_TRIGGER else "manual"


@dataclass
class ExecutionView:
    """A ``schedule_execution_summary`` row with its execution's JSON columns."""

    summary: dict[str, Any]
    execution: ScheduleExecution

    @property
    def duration_seconds(self) -> int | None:
        stored = self.execution.execution_duration_seconds
        if stored is not None:
            return stored
        e = self.execution
        return int((e.completed_at - e.started_at).total_seconds()) if e.completed_at and e.started_at else None


def list_executions(schedule_id: str, *, status: str = "", page_size: int = 0,
                    page_token: str = "") -> tuple[list[ExecutionView], paging.Page]:
    """A schedule's executions, newest scheduled_at first, from the summary view (total = all pages)."""
    get(schedule_id)
    row = ScheduleExecutionSummaryRow
    query = row.select().where(row.schedule_id == schedule_id)
    if status:
        query = query.where(row.status == _choice("status", status, ScheduleExecutionStatus, ""))
    page = paging.paginate(query.order_by(row.scheduled_at.desc(), row.id.desc()),
                           min(page_size, EXECUTIONS_MAX_PAGE), page_token, default=EXECUTIONS_DEFAULT_PAGE)
    ids = [r.id for r in page.items]
    rows = {e.id: e for e in ScheduleExecution.select().where(ScheduleExecution.id.in_(ids))} if ids else {}
    views = [ExecutionView(r.__data__, rows[r.id]) for r in page.items if r.id in rows]
    return views, page
