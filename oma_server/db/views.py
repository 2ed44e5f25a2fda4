"""Readers for the five SQL views (docs/design/data-model.md#views; the views themselves are created by the migrations).

The SQL lives in the migrations because a view definition is schema: ``0001_initial`` creates them on both backends
and a later change is a new migration that recreates the view.  Here each view has a read-only model, so rows come
back with the same Python types on SQLite and MariaDB (datetimes, bools, ints, floats), and one small function per
view returns them as dicts in the documented order.

Computed columns and the choices made where the original left one open or was wrong:

* ``active_jobs`` — ``job_tracking`` rows with status ``pending``/``running``, oldest ``started_at`` first.
  ``running_seconds`` = whole seconds from ``started_at`` to now (UTC).  ``error_count`` = number of
  ``job_execution_log`` rows of the job with ``log_level='ERROR'``; the JobLog writer adds such a row whenever a
  step fails, so the count is the number of failed steps/phases so far.
* ``job_tracking_hierarchy`` — every job with ``job_level`` (``root``/``child``), ``child_count`` (direct children)
  and ``duration_seconds`` (``completed_at - started_at`` when ``completed_at`` is set, else NULL).
* ``active_schedules`` — enabled schedules with ``group_count`` (groups using the schedule), ``vm_count`` (distinct
  contexts among *enabled* memberships of those groups) and ``last_execution`` (latest execution ``started_at``).
  ``next_execution`` is NULL in SQL: the real next fire time needs the cron expression and time zone and is
  computed by the application (pass ``next_execution=`` to :func:`active_schedules`); the original's "now + 1 hour"
  placeholder is not reproduced.
* ``schedule_execution_summary`` — executions with their ``schedule_name``, newest ``scheduled_at`` first;
  ``success_rate_percent`` = round(jobs_completed / jobs_created × 100, 2), 0 when no job was created.
* ``vm_schedule_status`` — contexts with ``scheduler_enabled``, one row per group membership (one row with NULL
  group columns for a VM in no group).  Required fix: the schedule is the membership's override if set, else the
  group's schedule (the original joined both and duplicated rows).  ``has_active_job``/``active_job_id``/
  ``job_status``/``progress_percent`` describe the context's ``current_job_id`` job when it is non-terminal
  (the meaning of "active" in docs/design/data-model.md#replication-job-status), not only when it is ``replicating``/``provisioning``.
"""
from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from peewee import BooleanField, CharField, FloatField, IntegerField, Model

from oma_server.db.database import database_proxy
from oma_server.db.fields import UtcDateTimeField

VIEW_NAMES = ("active_jobs", "job_tracking_hierarchy", "active_schedules", "schedule_execution_summary",
              "vm_schedule_status")


class _ViewModel(Model):
    class Meta:
        database = database_proxy
        primary_key = False


class ActiveJobRow(_ViewModel):
    id = CharField()
    job_type = CharField(null=True)
    operation = CharField()
    status = CharField(null=True)
    parent_job_id = CharField(null=True)
    started_at = UtcDateTimeField()
    running_seconds = IntegerField()
    error_count = IntegerField()

    class Meta:
        table_name = "active_jobs"


class JobTrackingHierarchyRow(_ViewModel):
    id = CharField()
    parent_job_id = CharField(null=True)
    job_type = CharField(null=True)
    job_category = CharField()
    operation = CharField()
    status = CharField(null=True)
    context_id = CharField(null=True)
    external_job_id = CharField(null=True)
    owner = CharField(null=True)
    started_at = UtcDateTimeField()
    completed_at = UtcDateTimeField(null=True)
    job_level = CharField()
    child_count = IntegerField()
    duration_seconds = IntegerField(null=True)

    class Meta:
        table_name = "job_tracking_hierarchy"


class ActiveScheduleRow(_ViewModel):
    id = CharField()
    name = CharField()
    description = CharField(null=True)
    cron_expression = CharField()
    schedule_type = CharField()
    timezone = CharField()
    replication_type = CharField()
    max_concurrent_jobs = IntegerField()
    skip_if_running = BooleanField()
    enabled = BooleanField()
    group_count = IntegerField()
    vm_count = IntegerField()
    next_execution = UtcDateTimeField(null=True)
    last_execution = UtcDateTimeField(null=True)

    class Meta:
        table_name = "active_schedules"


class ScheduleExecutionSummaryRow(_ViewModel):
    id = CharField()
    schedule_id = CharField()
    schedule_name = CharField()
    group_id = CharField(null=True)
    status = CharField()
    scheduled_at = UtcDateTimeField()
    started_at = UtcDateTimeField(null=True)
    completed_at = UtcDateTimeField(null=True)
    execution_duration_seconds = IntegerField(null=True)
    vms_eligible = IntegerField()
    jobs_created = IntegerField()
    jobs_completed = IntegerField()
    jobs_failed = IntegerField()
    jobs_skipped = IntegerField()
    success_rate_percent = FloatField()
    error_message = CharField(null=True)
    triggered_by = CharField()

    class Meta:
        table_name = "schedule_execution_summary"


class VmScheduleStatusRow(_ViewModel):
    context_id = CharField()
    vm_name = CharField()
    vm_status = CharField()
    next_scheduled_at = UtcDateTimeField(null=True)
    scheduler_enabled = BooleanField()
    group_id = CharField(null=True)
    group_name = CharField(null=True)
    group_priority = IntegerField(null=True)
    vm_priority = IntegerField(null=True)
    membership_enabled = BooleanField(null=True)
    schedule_id = CharField(null=True)
    schedule_name = CharField(null=True)
    cron_expression = CharField(null=True)
    schedule_enabled = BooleanField(null=True)
    has_active_job = BooleanField()
    active_job_id = CharField(null=True)
    job_status = CharField(null=True)
    progress_percent = FloatField(null=True)

    class Meta:
        table_name = "vm_schedule_status"


def active_jobs() -> list[dict[str, Any]]:
    """Pending/running JobLog jobs, oldest first, with ``running_seconds`` and ``error_count``."""
    return list(ActiveJobRow.select().order_by(ActiveJobRow.started_at, ActiveJobRow.id).dicts())


def job_tracking_hierarchy(parent_job_id: str | None = None) -> list[dict[str, Any]]:
    """Every JobLog job (or the children of ``parent_job_id``) with job_level, child_count and duration_seconds."""
    row = JobTrackingHierarchyRow
    query = row.select().order_by(row.started_at, row.id)
    if parent_job_id is not None:
        query = query.where(row.parent_job_id == parent_job_id)
    return list(query.dicts())


def active_schedules(
        next_execution: Callable[[str, str], datetime | None] | None = None) -> list[dict[str, Any]]:
    """Enabled schedules by name; ``next_execution(cron_expression, timezone)`` fills the column the SQL leaves NULL."""
    rows = list(ActiveScheduleRow.select().order_by(ActiveScheduleRow.name).dicts())
    if next_execution is not None:
        for row in rows:
            row["next_execution"] = next_execution(row["cron_expression"], row["timezone"])
    return rows


def schedule_execution_summary(schedule_id: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Executions newest ``scheduled_at`` first (optionally of one schedule), with ``success_rate_percent``."""
    query = ScheduleExecutionSummaryRow.select().order_by(
        ScheduleExecutionSummaryRow.scheduled_at.desc(), ScheduleExecutionSummaryRow.id)
    if schedule_id is not None:
        query = query.where(ScheduleExecutionSummaryRow.schedule_id == schedule_id)
    if limit is not None:
        query = query.limit(limit)
    return list(query.dicts())


def vm_schedule_status(context_id: str | None = None) -> list[dict[str, Any]]:
    """Scheduler view of every scheduler-enabled VM (optionally one context): group, effective schedule, active job."""
    query = VmScheduleStatusRow.select().order_by(
        VmScheduleStatusRow.vm_name, VmScheduleStatusRow.context_id, VmScheduleStatusRow.group_name)
    if context_id is not None:
        query = query.where(VmScheduleStatusRow.context_id == context_id)
    return list(query.dicts())
