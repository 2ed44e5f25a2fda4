"""VM contexts: the managed VMs (vm_replication_contexts) and what hangs off them.

Reads answer with whole aggregates (context + current job + history + disks + CBT history) using a
fixed number of queries per request, never one per row.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from peewee import fn

from oma_server.db.database import database_proxy as db
from oma_server.db.models import (
    CONTEXT_REPLICATION_BLOCKED_STATUSES,
    FAILOVER_ACTIVE_STATUSES,
    REPLICATION_ACTIVE_STATUSES,
    CbtHistory,
    ContextStatus,
    FailoverJob,
    JobCategory,
    JobTracking,
    JobTrackingStatus,
    JobType,
    ReplicationJob,
    VmDisk,
    VmGroupMembership,
    VmMachineGroup,
    VmReplicationContext,
    VmwareCredential,
)
from oma_server.db.prepared import PreparedSelect
from oma_server.domain import joblog, paging
from oma_server.domain.step_names import friendly_step_name
from oma_server.domain.text_rules import quote
from oma_server.errors import FailedPrecondition, InvalidArgument, NotFound, require

JOB_HISTORY_LIMIT = 10
CBT_HISTORY_LIMIT = 20
RECENT_JOBS_LIMIT = 20


@dataclass
class ContextDetails:
    context: VmReplicationContext
    groups: list[dict[str, Any]]
    current_job: ReplicationJob | None
    job_history: list[ReplicationJob]
    disks: list[VmDisk]
    cbt_history: list[CbtHistory]
    last_operation: dict[str, Any] | None = field(default=None)


# The reads behind GetVMContext, compiled once (see oma_server.db.prepared): one statement each.
_CONTEXT_BY_ID = PreparedSelect(
    lambda cid: VmReplicationContext.select().where(VmReplicationContext.context_id == cid).limit(1), str)
_JOB_BY_ID = PreparedSelect(lambda jid: ReplicationJob.select().where(ReplicationJob.id == jid).limit(1), str)
_JOB_HISTORY = PreparedSelect(
    lambda cid: ReplicationJob.select().where(ReplicationJob.vm_context == cid)
    .order_by(ReplicationJob.created_at.desc(), ReplicationJob.id.desc()).limit(JOB_HISTORY_LIMIT), str)
_CBT_HISTORY = PreparedSelect(
    lambda cid: CbtHistory.select().where(CbtHistory.vm_context == cid)
    .order_by(CbtHistory.created_at.desc(), CbtHistory.id.desc()).limit(CBT_HISTORY_LIMIT), str)
_DISKS = PreparedSelect(lambda cid: VmDisk.select().where(VmDisk.vm_context == cid), str)
_GROUPS_OF_ONE = PreparedSelect(
    lambda cid: VmGroupMembership.select(VmGroupMembership, VmMachineGroup.name).join(VmMachineGroup)
    .where(VmGroupMembership.vm_context == cid).order_by(VmMachineGroup.name), str)


def get(context_id: str) -> VmReplicationContext:
    require(context_id, "context_id is required")
    ctx = _CONTEXT_BY_ID.first(context_id)
    if ctx is None:
        raise NotFound(f"no VM context {quote(context_id)}")
    return ctx


def get_by_name(vm_name: str, vcenter_host: str = "") -> VmReplicationContext:
    require(vm_name, "vm_name is required")
    query = VmReplicationContext.select().where(VmReplicationContext.vm_name == vm_name)
    if vcenter_host:
        query = query.where(VmReplicationContext.vcenter_host == vcenter_host)
    found = list(query.limit(2))
    if not found:
        where = f" in vCenter {quote(vcenter_host)}" if vcenter_host else ""
        raise NotFound(f"no managed VM named {quote(vm_name)}{where}")
    if len(found) > 1:
        hosts = sorted(c.vcenter_host for c in query)
        raise FailedPrecondition(
            f"VM name {quote(vm_name)} exists in several vCenters ({', '.join(hosts)}); give vcenter_host"
        )
    return found[0]


def groups_of(context_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Memberships of many contexts with their group names, in one joined query."""
    result: dict[str, list[dict[str, Any]]] = {cid: [] for cid in context_ids}
    if not context_ids:
        return result
    if len(context_ids) == 1:
        rows = _GROUPS_OF_ONE.rows(context_ids[0])
    else:
        rows = (
            VmGroupMembership.select(VmGroupMembership, VmMachineGroup.name)
            .join(VmMachineGroup)
            .where(VmGroupMembership.vm_context.in_(context_ids))
            .order_by(VmMachineGroup.name)
        )
    for m in rows:
        result[m.vm_context_id].append({
            "group_id": m.group_id, "group_name": m.group.name, "priority": m.priority, "enabled": m.enabled,
        })
    return result


def list_contexts(
    *, status: str = "", vcenter_host: str = "", name_contains: str = "", page_size: int = 0,
    page_token: str = "",
) -> tuple[paging.Page, dict[str, list[dict[str, Any]]]]:
    query = VmReplicationContext.select()
    if status:
        if status not in set(ContextStatus):
            raise InvalidArgument(f"unknown status {quote(status)}; one of {', '.join(ContextStatus)}")
        query = query.where(VmReplicationContext.current_status == status)
    if vcenter_host:
        query = query.where(VmReplicationContext.vcenter_host == vcenter_host)
    if name_contains:
        query = query.where(fn.LOWER(VmReplicationContext.vm_name).contains(name_contains.lower()))
    # Keyset paging along the unique index (vm_name, vcenter_host): every page is one index range read.
    page = paging.paginate_keyset(
        query, (VmReplicationContext.vm_name, VmReplicationContext.vcenter_host), page_size, page_token)
    return page, groups_of([c.context_id for c in page.items])


def disk_sort_key(disk: VmDisk) -> tuple[int, int, str]:
    """Unit number, then numeric device key ("disk-2000" before "disk-16000"), then the id."""
    match = re.search(r"(\d+)$", disk.disk_id or "")
    return (disk.unit_number if disk.unit_number is not None else 1 << 30,
            int(match.group(1)) if match else 1 << 30, disk.disk_id or "")


def disks(context_id: str) -> list[VmDisk]:
    get(context_id)
    return sorted(_DISKS.rows(context_id), key=disk_sort_key)


def details(ctx: VmReplicationContext) -> ContextDetails:
    """The whole aggregate in at most five statements, however many jobs, disks or CBT rows exist."""
    history = _JOB_HISTORY.rows(ctx.context_id)
    current = None
    if ctx.current_job_id:
        current = next((j for j in history if j.id == ctx.current_job_id), None) or _JOB_BY_ID.first(
            ctx.current_job_id)
    cbt = _CBT_HISTORY.rows(ctx.context_id)
    summary = ctx.last_operation_summary if isinstance(ctx.last_operation_summary, dict) else None
    return ContextDetails(
        context=ctx, groups=groups_of([ctx.context_id])[ctx.context_id], current_job=current,
        job_history=history, disks=sorted(_DISKS.rows(ctx.context_id), key=disk_sort_key), cbt_history=cbt,
        last_operation=summary,
    )


# First match wins: "test-failover-cleanup" and "enhanced-test-failover-rollback" are a cleanup and a
# rollback, not test failovers, so those needles come first.
_FAILOVER_OPERATION_TYPES = (
    ("rollback", "rollback", "Rollback"),
    ("cleanup", "cleanup", "Cleanup"),
    ("compensation", "cleanup", "Cleanup"),
    ("test-failover", "test_failover", "Test Failover"),
    ("live-failover", "live_failover", "Live Failover"),
)


def _tracking_job_kind(operation: str) -> tuple[str, str]:
    for needle, kind, label in _FAILOVER_OPERATION_TYPES:
        if needle in operation:
            return kind, label
    return "unknown", operation.replace("-", " ").title()


def recent_jobs(context_id: str) -> list[dict[str, Any]]:
    """Replication jobs and failover/cleanup JobLog jobs of a context, newest first, at most 20."""
    get(context_id)
    items: list[dict[str, Any]] = []
    for job in (
        ReplicationJob.select().where(ReplicationJob.vm_context == context_id)
        .order_by(ReplicationJob.created_at.desc()).limit(JOB_HISTORY_LIMIT)
    ):
        if job.status == "completed":
            name = "Replication Completed"
        else:
            name = "Incremental Replication" if job.replication_type == "incremental" else "Initial Replication"
        items.append({
            "job_id": job.id, "job_type": "replication", "status": job.status,
            "progress": job.progress_percent, "started_at": job.created_at, "completed_at": job.completed_at,
            "display_name": name, "current_step": job.current_operation or "",
            "error_message": job.error_message or "", "data_source": "replication_jobs",
            "duration_seconds": int((job.completed_at - job.created_at).total_seconds())
            if job.completed_at and job.created_at else 0,
        })
    tracked = list(
        JobTracking.select().where(
            JobTracking.context_id == context_id,
            JobTracking.job_type.in_([JobType.FAILOVER, JobType.CLEANUP]),
        ).order_by(JobTracking.started_at.desc()).limit(RECENT_JOBS_LIMIT)
    )
    steps = joblog.steps_of(j.id for j in tracked)
    for job in tracked:
        job_steps = steps[job.id]
        prog = joblog.progress(job, job_steps)
        running = [s for s in job_steps if s.status == "running"]
        done = [s for s in job_steps if s.status == "completed"]
        failed = [s for s in job_steps if s.status == "failed"]
        current = running[-1] if running else (done[-1] if done else None)
        kind, label = _tracking_job_kind(job.operation)
        items.append({
            "job_id": job.id, "job_type": kind, "status": job.status,
            "progress": prog["step_completion_percentage"], "started_at": job.started_at,
            "completed_at": job.completed_at, "display_name": label,
            "current_step": friendly_step_name(current.name) if current else "",
            "error_message": (failed[0].error_message if failed else job.error_message) or "",
            "external_job_id": job.external_job_id or "", "data_source": "job_tracking",
            "duration_seconds": prog["runtime_seconds"],
        })
    items.sort(key=lambda i: i["started_at"], reverse=True)
    return items[:RECENT_JOBS_LIMIT]


def update(context_id: str, *, scheduler_enabled: bool | None = None, credential_id: int | None = None) -> VmReplicationContext:
    with db.atomic():
        ctx = get(context_id)
        values: dict[Any, Any] = {}
        if scheduler_enabled is not None:
            values[VmReplicationContext.scheduler_enabled] = scheduler_enabled
        if credential_id is not None:
            if credential_id == 0:
                values[VmReplicationContext.credential] = None
            else:
                cred = VmwareCredential.get_or_none(VmwareCredential.id == credential_id)
                if cred is None:
                    raise NotFound(f"no VMware credential with id {credential_id}")
                if cred.vcenter_host != ctx.vcenter_host:
                    raise FailedPrecondition(
                        f"credential {quote(cred.credential_name)} is for vCenter {quote(cred.vcenter_host)}, "
                        f"but the VM is in {quote(ctx.vcenter_host)}"
                    )
                values[VmReplicationContext.credential] = credential_id
        if values:
            VmReplicationContext.update(values).where(VmReplicationContext.context_id == context_id).execute()
    return get(context_id)


def delete(context_id: str, requested_by: str) -> str:
    """Remove a VM from management (cascades). Returns the JobLog job id that recorded it."""
    ctx = get(context_id)
    if ctx.current_status in CONTEXT_REPLICATION_BLOCKED_STATUSES:
        raise FailedPrecondition(
            f"VM {quote(ctx.vm_name)} is {ctx.current_status}; end or clean up the failover before removing it"
        )
    active_job = ReplicationJob.get_or_none(
        ReplicationJob.vm_context == context_id, ReplicationJob.status.in_(REPLICATION_ACTIVE_STATUSES)
    )
    if ctx.current_job_id or active_job:
        raise FailedPrecondition(
            f"VM {quote(ctx.vm_name)} has an active replication job "
            f"({ctx.current_job_id or active_job.id}); cancel it first"
        )
    if FailoverJob.select().where(
        FailoverJob.vm_context == context_id, FailoverJob.status.in_(FAILOVER_ACTIVE_STATUSES)
    ).exists():
        raise FailedPrecondition(f"VM {quote(ctx.vm_name)} has a failover in progress")
    job_id = joblog.start_job(
        JobType.CLEANUP, "delete-vm-context", owner=requested_by, context_id=context_id,
        category=JobCategory.SYSTEM, metadata={"vm_name": ctx.vm_name, "vcenter_host": ctx.vcenter_host},
    )
    try:
        with joblog.step(job_id, "delete-context-rows") as step:
            with db.atomic():
                # The context row cascades to its jobs, disks, CBT history, exports, volume rows,
                # device mappings, network mappings, failover jobs and memberships.
                deleted = VmReplicationContext.delete().where(
                    VmReplicationContext.context_id == context_id,
                    VmReplicationContext.current_job.is_null(),
                ).execute()
                if not deleted:
                    raise FailedPrecondition(f"VM {quote(ctx.vm_name)} started a job meanwhile; try again later")
            step.details["vm_name"] = ctx.vm_name
    except joblog.StepFailed as exc:
        joblog.end_job(job_id, JobTrackingStatus.FAILED, exc.message)
        raise exc.cause from None
    joblog.end_job(job_id, JobTrackingStatus.COMPLETED)
    return job_id
