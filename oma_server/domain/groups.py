"""Machine groups (vm_machine_groups) and VM membership (vm_group_memberships).

A VM belongs to at most one group, so two schedules never replicate it (docs/design/scheduler.md#machine-groups): AssignVM refuses
a VM that is in another group and SetVMGroup moves it. Both check and write under a lock on the VM's
context row (``_lock_context``), so two concurrent calls for the same VM run one after the other. ``max_concurrent_vms`` limits scheduling
concurrency, not membership. Every mutation is a group-management job recorded in the same
transaction as the change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peewee import fn

from oma_server.db.database import db_for_update
from oma_server.db.models import (
    REPLICATION_ACTIVE_STATUSES,
    JobCategory,
    JobType,
    ReplicationJob,
    ReplicationSchedule,
    ScheduleExecution,
    ScheduleExecutionStatus,
    VmGroupMembership,
    VmMachineGroup,
    VmReplicationContext,
)
from oma_server.db.transactions import claim_row, run_transaction
from oma_server.domain import joblog, paging, text_rules
from oma_server.domain.text_rules import quote
from oma_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, require

MAX_CONCURRENT_RANGE = (1, 100)
PRIORITY_RANGE = (0, 100)


@dataclass
class GroupSummary:
    group: VmMachineGroup
    schedule: ReplicationSchedule | None
    total_vms: int = 0
    enabled_vms: int = 0
    active_jobs: int = 0
    last_execution: ScheduleExecution | None = None
    memberships: list[VmGroupMembership] = field(default_factory=list)

    @property
    def disabled_vms(self) -> int:
        return self.total_vms - self.enabled_vms


def _check_range(name: str, value: int, bounds: tuple[int, int]) -> int:
    low, high = bounds
    if not low <= value <= high:
        raise InvalidArgument(f"{name} must be between {low} and {high}, got {value}")
    return value


def get(group_id: str) -> VmMachineGroup:
    require(group_id, "group id is required")
    group = VmMachineGroup.get_or_none(VmMachineGroup.id == group_id)
    if group is None:
        raise NotFound(f"no machine group {quote(group_id)}")
    return group


def _schedule(schedule_id: str) -> ReplicationSchedule:
    schedule = ReplicationSchedule.get_or_none(ReplicationSchedule.id == schedule_id)
    if schedule is None:
        raise NotFound(f"no schedule {quote(schedule_id)}")
    return schedule


def _context(context_id: str) -> VmReplicationContext:
    require(context_id, "vm_context_id is required")
    ctx = VmReplicationContext.get_or_none(VmReplicationContext.context_id == context_id)
    if ctx is None:
        raise NotFound(f"no VM context {quote(context_id)}")
    return ctx


def summaries(groups: list[VmMachineGroup], include_memberships: bool = False) -> list[GroupSummary]:
    """Counts, schedule, active jobs and last execution for many groups in a fixed number of queries."""
    ids = [g.id for g in groups]
    if not ids:
        return []
    counts = {
        gid: (total, int(enabled or 0))
        for gid, total, enabled in VmGroupMembership.select(
            VmGroupMembership.group, fn.COUNT(VmGroupMembership.id),
            fn.SUM(VmGroupMembership.enabled.cast("INTEGER")),
        ).where(VmGroupMembership.group.in_(ids)).group_by(VmGroupMembership.group).tuples()
    }
    active = dict(
        ReplicationJob.select(ReplicationJob.vm_group, fn.COUNT(ReplicationJob.id))
        .where(ReplicationJob.vm_group.in_(ids), ReplicationJob.status.in_(REPLICATION_ACTIVE_STATUSES))
        .group_by(ReplicationJob.vm_group).tuples()
    )
    last: dict[str, ScheduleExecution] = {}
    for execution in ScheduleExecution.select().where(ScheduleExecution.group.in_(ids)).order_by(
        ScheduleExecution.scheduled_at.desc()
    ):
        last.setdefault(execution.group_id, execution)
    schedule_ids = {g.schedule_id for g in groups if g.schedule_id}
    schedules = {s.id: s for s in ReplicationSchedule.select().where(ReplicationSchedule.id.in_(list(schedule_ids)))} if schedule_ids else {}
    members: dict[str, list[VmGroupMembership]] = {gid: [] for gid in ids}
    if include_memberships:
        for m in membership_query().where(VmGroupMembership.group.in_(ids)):
            members[m.group_id].append(m)
    result = []
    for g in groups:
        total, enabled = counts.get(g.id, (0, 0))
        result.append(GroupSummary(
            group=g, schedule=schedules.get(g.schedule_id), total_vms=total, enabled_vms=enabled,
            active_jobs=active.get(g.id, 0), last_execution=last.get(g.id), memberships=members[g.id],
        ))
    return result


def membership_query():
    """Memberships with their context's name and VMware id and their group's name (one join)."""
    return (
        VmGroupMembership.select(VmGroupMembership, VmReplicationContext.context_id, VmReplicationContext.vm_name,
                                 VmReplicationContext.vmware_vm_id, VmMachineGroup.id, VmMachineGroup.name)
        .join(VmReplicationContext, on=(VmGroupMembership.vm_context == VmReplicationContext.context_id))
        .switch(VmGroupMembership)
        .join(VmMachineGroup, on=(VmGroupMembership.group == VmMachineGroup.id))
        .order_by(VmGroupMembership.priority, VmGroupMembership.added_at, VmGroupMembership.id)
    )


def create_group(*, name: str, description: str = "", schedule_id: str = "", max_concurrent_vms: int | None,
                 priority: int | None, created_by: str) -> GroupSummary:
    name = text_rules.name(name, VmMachineGroup.name)
    require(name, "name is required")
    description = text_rules.free_text(description, VmMachineGroup.description)
    created_by = text_rules.name(created_by, VmMachineGroup.created_by)
    max_vms = _check_range("max_concurrent_vms", 5 if max_concurrent_vms is None else max_concurrent_vms,
                           MAX_CONCURRENT_RANGE)
    prio = _check_range("priority", 0 if priority is None else priority, PRIORITY_RANGE)
    if schedule_id:
        _schedule(schedule_id)
    if VmMachineGroup.select().where(VmMachineGroup.name == name).exists():
        raise AlreadyExists(f"a machine group named {quote(name)} already exists")
    with joblog.recorded_operation(JobType.GROUP_MANAGEMENT, "create-group", owner=created_by,
                                   metadata={"name": name}, category=JobCategory.SYSTEM):
        group = VmMachineGroup.create(name=name, description=description or None, schedule=schedule_id or None,
                                      max_concurrent_vms=max_vms, priority=prio, created_by=created_by)
    return summaries([group])[0]


def list_groups(*, schedule_id: str = "", include_memberships: bool = False, page_size: int = 0,
                page_token: str = "") -> tuple[list[GroupSummary], paging.Page]:
    query = VmMachineGroup.select()
    if schedule_id:
        query = query.where(VmMachineGroup.schedule == schedule_id)
    page = paging.paginate(query.order_by(VmMachineGroup.name), page_size, page_token)
    return summaries(page.items, include_memberships), page


def get_group(group_id: str, include_memberships: bool = True) -> GroupSummary:
    return summaries([get(group_id)], include_memberships)[0]


def update_group(group_id: str, changes: dict[str, Any], actor: str) -> GroupSummary:
    group = get(group_id)
    values: dict[Any, Any] = {}
    if "name" in changes:
        name = text_rules.name(changes["name"], VmMachineGroup.name)
        require(name, "name cannot be empty")
        if name != group.name and VmMachineGroup.select().where(VmMachineGroup.name == name).exists():
            raise AlreadyExists(f"a machine group named {quote(name)} already exists")
        values[VmMachineGroup.name] = name
    if "description" in changes:
        values[VmMachineGroup.description] = text_rules.free_text(changes["description"],
                                                                  VmMachineGroup.description) or None
    if "schedule_id" in changes:
        # An explicit empty schedule_id clears the group's schedule.
        if changes["schedule_id"]:
            _schedule(changes["schedule_id"])
        values[VmMachineGroup.schedule] = changes["schedule_id"] or None
    if "max_concurrent_vms" in changes:
        values[VmMachineGroup.max_concurrent_vms] = _check_range(
            "max_concurrent_vms", changes["max_concurrent_vms"], MAX_CONCURRENT_RANGE)
    if "priority" in changes:
        values[VmMachineGroup.priority] = _check_range("priority", changes["priority"], PRIORITY_RANGE)
    if not values:
        raise InvalidArgument("no fields to update")
    with joblog.recorded_operation(JobType.GROUP_MANAGEMENT, "update-group", owner=actor,
                                   metadata={"group_id": group_id, "fields": sorted(f.name for f in values)}):
        VmMachineGroup.update(values).where(VmMachineGroup.id == group_id).execute()
    return get_group(group_id)


def delete_group(group_id: str, actor: str) -> None:
    group = get(group_id)
    members = VmGroupMembership.select().where(VmGroupMembership.group == group_id).count()
    if members:
        raise FailedPrecondition(f"cannot delete group {quote(group.name)} with {members} VMs; remove the VMs first")
    recent = ScheduleExecution.select(ScheduleExecution.status).where(ScheduleExecution.group == group_id).order_by(
        ScheduleExecution.scheduled_at.desc()).limit(10)
    if any(e.status in (ScheduleExecutionStatus.RUNNING, ScheduleExecutionStatus.SCHEDULED) for e in recent):
        raise FailedPrecondition(f"group {quote(group.name)} has a schedule execution in progress")
    with joblog.recorded_operation(JobType.GROUP_MANAGEMENT, "delete-group", owner=actor,
                                   metadata={"group_id": group_id, "name": group.name}):
        VmMachineGroup.delete().where(VmMachineGroup.id == group_id).execute()


def _lock_context(context_id: str) -> None:
    """Serialise membership changes of one VM: the caller's transaction writes the context row (claim_row), so
    the "one group per VM" check and the insert that relies on it cannot interleave with another assignment —
    on one server the write holds the row lock until commit (SQLite's IMMEDIATE transaction serialises writers
    anyway), and on a Galera cluster, where a ``FOR UPDATE`` lock is not seen by the other nodes, the competing
    transaction fails certification on that row and run_transaction runs it again.
    Taken before anything else in the transaction: the joblog insert and the membership's foreign key
    would otherwise take shared locks that two concurrent callers then deadlock upgrading."""
    claim_row(VmReplicationContext, context_id)


def _membership(group_id: str, context_id: str) -> VmGroupMembership:
    m = membership_query().where(VmGroupMembership.group == group_id,
                                 VmGroupMembership.vm_context == context_id).first()
    if m is None:
        raise NotFound(f"VM context {quote(context_id)} is not a member of group {quote(group_id)}")
    return m


def assign_vm(*, group_id: str, context_id: str, priority: int | None, enabled: bool | None,
              schedule_override_id: str = "", added_by: str) -> VmGroupMembership:
    added_by = text_rules.name(added_by, VmGroupMembership.added_by)
    group = get(group_id)
    ctx = _context(context_id)
    prio = 0 if priority is None else priority
    require(prio >= 0, "priority cannot be negative")
    if schedule_override_id:
        _schedule(schedule_override_id)
    def assign() -> VmGroupMembership:
        _lock_context(context_id)
        existing = db_for_update(VmGroupMembership.select().where(VmGroupMembership.vm_context == context_id)).first()
        if existing is not None:
            if existing.group_id == group_id:
                raise AlreadyExists(f"VM {quote(ctx.vm_name)} is already a member of group {quote(group.name)}")
            raise FailedPrecondition(
                f"VM {quote(ctx.vm_name)} already belongs to another group ({existing.group_id}); "
                "use SetVMGroup to move it"
            )
        with joblog.recorded_operation(JobType.GROUP_MANAGEMENT, "add-vm-membership", owner=added_by,
                                       context_id=context_id, metadata={"group_id": group_id}):
            VmGroupMembership.create(group=group_id, vm_context=context_id, priority=prio,
                                     enabled=True if enabled is None else enabled,
                                     schedule_override=schedule_override_id or None, added_by=added_by)
        return _membership(group_id, context_id)  # read before commit: a concurrent move may follow at once

    return run_transaction(assign, what=f"assigning VM {ctx.vm_name!r} to group {group.name!r}")


def unassign_vm(group_id: str, context_id: str, actor: str) -> None:
    get(group_id)
    _membership(group_id, context_id)
    with joblog.recorded_operation(JobType.GROUP_MANAGEMENT, "remove-vm-membership", owner=actor,
                                   context_id=context_id, metadata={"group_id": group_id}):
        VmGroupMembership.delete().where(VmGroupMembership.group == group_id,
                                         VmGroupMembership.vm_context == context_id).execute()


def update_membership(group_id: str, context_id: str, changes: dict[str, Any], actor: str) -> VmGroupMembership:
    get(group_id)
    _membership(group_id, context_id)
    values: dict[Any, Any] = {}
    if "priority" in changes:
        require(changes["priority"] >= 0, "priority cannot be negative")
        values[VmGroupMembership.priority] = changes["priority"]
    if "enabled" in changes:
        values[VmGroupMembership.enabled] = changes["enabled"]
    if "schedule_override_id" in changes:
        if changes["schedule_override_id"]:
            _schedule(changes["schedule_override_id"])
        values[VmGroupMembership.schedule_override] = changes["schedule_override_id"] or None
    if not values:
        raise InvalidArgument("no fields to update")
    with joblog.recorded_operation(JobType.GROUP_MANAGEMENT, "update-membership", owner=actor,
                                   context_id=context_id, metadata={"group_id": group_id}):
        VmGroupMembership.update(values).where(VmGroupMembership.group == group_id,
                                               VmGroupMembership.vm_context == context_id).execute()
    return _membership(group_id, context_id)


def set_vm_group(*, context_id: str, group_id: str, priority: int | None, enabled: bool | None,
                 added_by: str) -> tuple[VmGroupMembership, list[str]]:
    added_by = text_rules.name(added_by, VmGroupMembership.added_by)
    """Put a VM into exactly this group, removing it from any other (one transaction)."""
    ctx = _context(context_id)
    get(group_id)
    prio = 0 if priority is None else priority
    _check_range("priority", prio, PRIORITY_RANGE)
    def move() -> tuple[VmGroupMembership, list[str]]:
        _lock_context(context_id)
        others = [m.group_id for m in db_for_update(VmGroupMembership.select().where(
            VmGroupMembership.vm_context == context_id, VmGroupMembership.group != group_id))]
        with joblog.recorded_operation(JobType.GROUP_MANAGEMENT, "move-vm-to-group", owner=added_by,
                                       context_id=context_id,
                                       metadata={"group_id": group_id, "removed_from": others, "vm_name": ctx.vm_name}):
            VmGroupMembership.delete().where(VmGroupMembership.vm_context == context_id,
                                             VmGroupMembership.group != group_id).execute()
            current = VmGroupMembership.get_or_none(VmGroupMembership.vm_context == context_id)
            if current is None:
                VmGroupMembership.create(group=group_id, vm_context=context_id, priority=prio,
                                         enabled=True if enabled is None else enabled, added_by=added_by)
            else:
                values: dict[Any, Any] = {VmGroupMembership.priority: prio}
                if enabled is not None:
                    values[VmGroupMembership.enabled] = enabled
                VmGroupMembership.update(values).where(VmGroupMembership.id == current.id).execute()
        return _membership(group_id, context_id), others  # read before commit, as in assign_vm

    return run_transaction(move, what=f"moving VM {ctx.vm_name!r} to group {group_id}")


def group_vms(group_id: str, page_size: int = 0, page_token: str = "") -> tuple[VmMachineGroup, paging.Page]:
    group = get(group_id)
    page = paging.paginate(membership_query().where(VmGroupMembership.group == group_id), page_size, page_token)
    return group, page


def group_members(group_id: str, page_size: int = 0, page_token: str = "") -> paging.Page:
    """Enabled members with their VM facts, by name."""
    get(group_id)
    query = (
        VmReplicationContext.select(VmReplicationContext, VmGroupMembership.priority)
        .join(VmGroupMembership, on=(VmGroupMembership.vm_context == VmReplicationContext.context_id))
        .where(VmGroupMembership.group == group_id, VmGroupMembership.enabled == True)  # noqa: E712
        .order_by(VmReplicationContext.vm_name)
    )
    return paging.paginate(query, page_size, page_token)


def ungrouped_contexts() -> list[VmReplicationContext]:
    """Contexts with no membership at all (NOT EXISTS, robust to NULLs)."""
    member = VmGroupMembership.select().where(VmGroupMembership.vm_context == VmReplicationContext.context_id)
    return list(VmReplicationContext.select().where(~fn.EXISTS(member)).order_by(VmReplicationContext.vm_name))
