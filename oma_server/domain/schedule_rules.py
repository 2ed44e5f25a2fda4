"""The rules of a schedule firing (docs/design/scheduler.md#one-firing).

Which VMs of a schedule's groups may be dispatched (:func:`conflict_of`, with :class:`Capacity`).
Pure functions over rows; the scheduler thread (:mod:`oma_server.domain.scheduler`) applies them and
keeps the outcome in an :class:`~oma_server.domain.schedule_state.ExecutionState`.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from peewee import JOIN

from oma_server.db.models import (
    CONTEXT_REPLICATION_BLOCKED_STATUSES,
    REPLICATION_ACTIVE_STATUSES,
    ReplicationJob,
    ReplicationSchedule,
    ReplicationType,
    ScheduleExecution,
    VmGroupMembership,
    VmMachineGroup,
    VmReplicationContext,
)

REPLICATION_TYPE = {"full": ReplicationType.INITIAL, "incremental": ReplicationType.INCREMENTAL, "auto": ""}


class Conflict(StrEnum):
    """Why a VM is not dispatched (docs/design/scheduler.md#one-firing, plus the retry- and failure-only ones)."""
    SCHEDULE_DISABLED = "schedule_disabled"
    VM_DISABLED = "vm_disabled"
    VM_IN_FAILOVER = "vm_in_failover"
    SKIP_IF_RUNNING = "skip_if_running"
    ACTIVE_JOB = "active_job"
    MAX_CONCURRENT = "max_concurrent"
    GROUP_CONCURRENT = "group_concurrent"
    NOT_MEMBER = "not_member"
    GROUP_FAILED = "group_failed"


CAPACITY_CONFLICTS = (Conflict.MAX_CONCURRENT, Conflict.GROUP_CONCURRENT)


class Attempt(StrEnum):
    """``execution_details.vms[].attempts[].result``."""
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DISPATCH_FAILED = "dispatch_failed"
    SKIPPED = "skipped"
    GONE = "gone"  # the replication job was deleted before its end was seen


def iso(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds") + "Z"


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value).replace(tzinfo=None)


# --- conflict rules ------------------------------------------------------------------------------

@dataclass
class Capacity:
    schedule_jobs: int
    group_jobs: int
    max_group_jobs: int


def active_jobs() -> list[dict[str, Any]]:
    """Active replication jobs with their VM, group and (through the execution) schedule."""
    return list(
        ReplicationJob.select(ReplicationJob.id, ReplicationJob.status, ReplicationJob.vm_context.alias("context_id"),
                              ReplicationJob.vm_group.alias("group_id"), ScheduleExecution.schedule.alias("schedule_id"))
        .join(ScheduleExecution, JOIN.LEFT_OUTER, on=(ReplicationJob.schedule_execution == ScheduleExecution.id))
        .where(ReplicationJob.status.in_(REPLICATION_ACTIVE_STATUSES)).dicts())


def conflict_of(schedule: ReplicationSchedule, ctx: VmReplicationContext, job: dict[str, Any] | None,
                capacity: Capacity) -> tuple[Conflict, str] | None:
    """The first rule a VM breaks (docs/design/scheduler.md#one-firing), or None when it can be dispatched."""
    if not schedule.enabled:
        return Conflict.SCHEDULE_DISABLED, "the schedule is disabled"
    if not ctx.scheduler_enabled:
        return Conflict.VM_DISABLED, "scheduling is disabled for this VM"
    if ctx.current_status in CONTEXT_REPLICATION_BLOCKED_STATUSES:
        return Conflict.VM_IN_FAILOVER, f"the VM is {ctx.current_status}"
    if job is not None:
        kind = Conflict.SKIP_IF_RUNNING if schedule.skip_if_running else Conflict.ACTIVE_JOB
        return kind, f"replication job {job['id']} of this VM is {job['status']}"
    if capacity.schedule_jobs >= schedule.max_concurrent_jobs:
        return Conflict.MAX_CONCURRENT, (f"{capacity.schedule_jobs} jobs of this schedule are active "
                                         f"(max_concurrent_jobs {schedule.max_concurrent_jobs})")
    if capacity.group_jobs >= capacity.max_group_jobs:
        return Conflict.GROUP_CONCURRENT, (f"{capacity.group_jobs} jobs of this group are active "
                                           f"(max_concurrent_vms {capacity.max_group_jobs})")
    return None


def current_job(ctx: VmReplicationContext, by_context: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    job = by_context.get(ctx.context_id)
    if job is None and ctx.current_job_id:  # claimed by a job the active list did not see yet
        job = {"id": ctx.current_job_id, "status": "claimed"}
    return job


def members_of(schedule_id: str) -> list[tuple[VmMachineGroup, list[VmReplicationContext]]]:
    """Enabled members the schedule replicates, per group (group priority, name), each group's VMs by
    membership priority then added_at: members of the schedule's groups without another schedule
    override, and members of any group whose override is this schedule."""
    rows = (
        VmGroupMembership.select(VmGroupMembership, VmMachineGroup, VmReplicationContext)
        .join(VmMachineGroup).switch(VmGroupMembership).join(VmReplicationContext)
        .where(VmGroupMembership.enabled == True,  # noqa: E712
               ((VmMachineGroup.schedule == schedule_id) & (VmGroupMembership.schedule_override.is_null()
                                                            | (VmGroupMembership.schedule_override == schedule_id)))
               | (VmGroupMembership.schedule_override == schedule_id))
        .order_by(VmMachineGroup.priority, VmMachineGroup.name, VmMachineGroup.id, VmGroupMembership.priority,
                  VmGroupMembership.added_at, VmGroupMembership.id))
    grouped: dict[str, tuple[VmMachineGroup, list[VmReplicationContext]]] = {}
    for m in rows:
        grouped.setdefault(m.group.id, (m.group, []))[1].append(m.vm_context)
    return list(grouped.values())
