"""Replication jobs: creation with an atomic claim of the VM, reads, change ids, terminal reports,
deletion and the consolidated progress view.

CreateReplication only validates, inserts the job (``pending``) and claims the context in one
transaction (``UPDATE … SET current_job_id=:job WHERE current_job_id IS NULL`` — one row means the
claim won, so two concurrent creates can never both start a job), then hands the job to the workflow
(:mod:`oma_server.workflows.replication`) and returns. Change ids are always keyed by
(context, disk id).
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Sequence

from peewee import fn

from oma_server.db.database import database_proxy as db
from oma_server.db.database import db_for_update
from oma_server.db.models import (
    CONTEXT_REPLICATION_BLOCKED_STATUSES,
    FAILOVER_ACTIVE_STATUSES,
    JOB_TERMINAL_STATUSES,
    LEGACY_JOB_STATUS_ALIASES,
    CbtHistory,
    CbtSyncType,
    ContextStatus,
    DiskSyncStatus,
    FailoverJob,
    JobCategory,
    JobStatus,
    JobTracking,
    JobTrackingStatus,
    JobType,
    NbdExport,
    OsseaVolume,
    ReplicationJob,
    ReplicationType,
    ScheduleExecution,
    VmDisk,
    VmMachineGroup,
    VmReplicationContext,
    utcnow,
)
from oma_server.db.prepared import PreparedSelect
from oma_server.db.transactions import run_transaction
from oma_server.domain import cloudstack_config, contexts, credentials, joblog, text_rules
from oma_server.domain.job_lifecycle import finish
from oma_server.domain.text_rules import quote
from oma_server.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound, require

CHANGE_ID_PATTERN = re.compile(r"^[0-9a-fA-F -]{8,}/\d+$")
LIVE_SECONDS = 30


def new_job_id(now: datetime | None = None) -> str:
    """``job-YYYYMMDD-HHMMSS.mmm-xxxxxx`` (UTC, millisecond precision, 6 random hex chars)."""
    now = now or utcnow()
    return f"job-{now:%Y%m%d-%H%M%S}.{now.microsecond // 1000:03d}-{secrets.token_hex(3)}"


# Reads behind GetReplication/GetReplicationProgress, compiled once (oma_server.db.prepared).
_JOB_BY_ID = PreparedSelect(lambda jid: ReplicationJob.select().where(ReplicationJob.id == jid).limit(1), str)
_JOB_DISKS = PreparedSelect(lambda jid: VmDisk.select().where(VmDisk.job == jid), str)
_JOB_CBT_HISTORY = PreparedSelect(
    lambda jid: CbtHistory.select().where(CbtHistory.job == jid).order_by(CbtHistory.id), str)


def get(job_id: str) -> ReplicationJob:
    require(job_id, "job_id is required")
    job = _JOB_BY_ID.first(job_id)
    if job is None:
        raise NotFound(f"no replication job {quote(job_id)}")
    return job


@dataclass
class CreateRequest:
    context_id: str = ""
    replication_type: str = ""
    ossea_config_id: int | None = None
    target_network: str = ""
    schedule_execution_id: str = ""
    vm_group_id: str = ""
    scheduled_by: str = ""
    # Idempotency key: a create repeated with the same key answers with the job made the first time.
    request_id: str = ""
    # The live failover whose final sync this is; any other failover in progress blocks the create.
    for_failover_job: str = ""


@dataclass
class Created:
    job: ReplicationJob
    context: VmReplicationContext
    tracking_job_id: str
    # True when an earlier create with the same request_id made this job (nothing new was started).
    repeated: bool = False


def _check_prerequisites(config: Any) -> None:
    missing = [name for name in ("oma_vm_id", "disk_offering_id", "zone") if not getattr(config, name)]
    if missing:
        raise FailedPrecondition(
            f"CloudStack prerequisites not met: configuration {quote(config.name)} has no {', '.join(missing)}"
        )


def _choose_type(requested: str, disks: Sequence[VmDisk]) -> str:
    if requested:
        if requested not in set(ReplicationType):
            raise InvalidArgument(f"replication_type must be one of {', '.join(ReplicationType)}")
        return requested
    # Incremental only when every disk has a stored change id for its current replica volume.
    if disks and all(d.disk_change_id and d.ossea_volume_id for d in disks):
        return ReplicationType.INCREMENTAL
    return ReplicationType.INITIAL


def _created_for(request_id: str, context_id: str) -> Created | None:
    """The job an earlier create with this idempotency key made (recorded in its JobLog metadata)."""
    recent = (JobTracking.select().where(JobTracking.context_id == context_id, JobTracking.operation == "replication")
              .order_by(JobTracking.started_at.desc()).limit(20))
    for tracking in recent:
        if (tracking.metadata or {}).get("request_id") == request_id and tracking.external_job_id:
            job = ReplicationJob.get_or_none(ReplicationJob.id == tracking.external_job_id)
            if job is not None:
                return Created(job, VmReplicationContext.get_by_id(context_id), tracking.id, repeated=True)
    return None


def create(request: CreateRequest, actor: str) -> Created:
    """Validate, insert the job and claim the VM atomically (see the module docstring)."""
    text_rules.fit(ReplicationJob, {"scheduled_by": request.scheduled_by})
    ctx = contexts.get(request.context_id)
    if request.request_id:
        earlier = _created_for(request.request_id, ctx.context_id)
        if earlier is not None:
            return earlier
    if ctx.current_status in CONTEXT_REPLICATION_BLOCKED_STATUSES:
        raise FailedPrecondition(
            f"VM {quote(ctx.vm_name)} is {ctx.current_status}; replication is blocked until the failover is cleaned up"
        )
    if ctx.current_job_id:
        raise FailedPrecondition(f"VM {quote(ctx.vm_name)} has an active replication job {ctx.current_job_id}")
    if request.ossea_config_id:
        config = cloudstack_config.get(request.ossea_config_id)
    else:
        config = cloudstack_config.require_active()
    _check_prerequisites(config)
    if not ctx.credential_id:
        try:
            credentials.get_default()
        except NotFound:
            raise FailedPrecondition(
                f"VM {quote(ctx.vm_name)} has no vCenter credential and no default credential is set"
            ) from None
    disks = list(VmDisk.select().where(VmDisk.vm_context == ctx.context_id))
    if not disks:
        raise FailedPrecondition(f"VM {quote(ctx.vm_name)} has no recorded disks; add it through discovery first")
    replication_type = _choose_type(request.replication_type, disks)
    if request.schedule_execution_id and not ScheduleExecution.select().where(
            ScheduleExecution.id == request.schedule_execution_id).exists():
        raise NotFound(f"no schedule execution {quote(request.schedule_execution_id)}")
    if request.vm_group_id and not VmMachineGroup.select().where(VmMachineGroup.id == request.vm_group_id).exists():
        raise NotFound(f"no machine group {quote(request.vm_group_id)}")

    job_id = new_job_id()
    now = utcnow()
    # The claim is the conditional UPDATE of the context row (compare-and-set). On a Galera cluster the FOR UPDATE
    # below locks this node only; a create through another node is stopped by certification instead (the same
    # context row is in both write sets) and run_transaction runs the loser again, which then sees the winner's job.
    def claim() -> str:
        # Lock the context row first (MariaDB: SELECT … FOR UPDATE; SQLite: the IMMEDIATE transaction
        # already serialises writers): inserting the job first would take a shared lock through the
        # foreign key and concurrent creates would deadlock upgrading it.
        locked = db_for_update(VmReplicationContext.select().where(
            VmReplicationContext.context_id == ctx.context_id)).get()
        if locked.current_job_id:
            raise FailedPrecondition(f"VM {quote(ctx.vm_name)} has an active replication job {locked.current_job_id}")
        # A failover still validating has not changed the context's status yet, but it owns the VM.
        failover = FailoverJob.select().where(
            FailoverJob.vm_context == ctx.context_id, FailoverJob.status.in_(list(FAILOVER_ACTIVE_STATUSES)),
            FailoverJob.job_id != request.for_failover_job).first()
        if failover is not None:
            raise FailedPrecondition(f"VM {quote(ctx.vm_name)} has a {failover.job_type} failover in progress "
                                     f"({failover.job_id}, {failover.status}); wait for it or cancel it")
        ReplicationJob.create(
            id=job_id, vm_context=ctx.context_id, source_vm_id=ctx.vmware_vm_id, source_vm_name=ctx.vm_name,
            source_vm_path=ctx.vm_path, vcenter_host=ctx.vcenter_host, datacenter=ctx.datacenter,
            replication_type=replication_type, target_network=request.target_network or None,
            status=JobStatus.PENDING, ossea_config=config.id, current_operation="Queued",
            schedule_execution=request.schedule_execution_id or None, vm_group=request.vm_group_id or None,
            scheduled_by=request.scheduled_by or None, created_at=now, updated_at=now,
        )
        claimed = VmReplicationContext.update(
            current_job=job_id, current_status=ContextStatus.REPLICATING,
            total_jobs_run=VmReplicationContext.total_jobs_run + 1, last_job_at=now, last_status_change=now,
            first_job_at=fn.COALESCE(VmReplicationContext.first_job_at, now),
        ).where(
            VmReplicationContext.context_id == ctx.context_id, VmReplicationContext.current_job.is_null(),
            VmReplicationContext.current_status.not_in(list(CONTEXT_REPLICATION_BLOCKED_STATUSES)),
        ).execute()
        if claimed != 1:  # another create won the claim: raising rolls this insert back
            current = VmReplicationContext.get_by_id(ctx.context_id).current_job_id
            raise FailedPrecondition(f"VM {quote(ctx.vm_name)} has an active replication job {current}")
        VmDisk.update(job=job_id, sync_status=DiskSyncStatus.PENDING, sync_progress_percent=0,
                      bytes_synced=0).where(VmDisk.vm_context == ctx.context_id).execute()
        tracking = joblog.start_job(
            JobType.MIGRATION, "replication", owner=actor, context_id=ctx.context_id, external_job_id=job_id,
            category=JobCategory.REPLICATION, expected_steps=7,
            metadata={"replication_type": replication_type, "ossea_config_id": config.id,
                      "scheduled_by": request.scheduled_by or None, "request_id": request.request_id or None},
        )
        return tracking

    try:
        tracking = run_transaction(claim, what=f"creating a replication of VM {ctx.vm_name!r}")
    except FailedPrecondition:
        # A repeated request that raced its first copy (another OMA process, another database node): the first
        # one's job is the answer, as it would have been had the repeat come a moment later.
        earlier = _created_for(request.request_id, ctx.context_id) if request.request_id else None
        if earlier is None:
            raise
        return earlier
    return Created(ReplicationJob.get_by_id(job_id), VmReplicationContext.get_by_id(ctx.context_id), tracking)


def list_jobs(*, vm_context_id: str = "", statuses: Sequence[str] = (), since: datetime | None = None):
    query = ReplicationJob.select()
    if vm_context_id:
        query = query.where(ReplicationJob.vm_context == vm_context_id)
    if statuses:
        wanted = []
        for status in statuses:
            status = LEGACY_JOB_STATUS_ALIASES.get(status, status)
            if status not in set(JobStatus):
                raise InvalidArgument(f"unknown job status {quote(status)}; one of {', '.join(JobStatus)}")
            wanted.append(status)
        query = query.where(ReplicationJob.status.in_(wanted))
    if since:
        query = query.where(ReplicationJob.created_at >= since)
    return query.order_by(ReplicationJob.created_at.desc(), ReplicationJob.id)


def job_disks(job: ReplicationJob) -> list[VmDisk]:
    return sorted(_JOB_DISKS.rows(job.id), key=contexts.disk_sort_key)


def job_cbt_history(job: ReplicationJob) -> list[CbtHistory]:
    return _JOB_CBT_HISTORY.rows(job.id)


def report_terminal(job_id: str, status: str, error_message: str) -> tuple[ReplicationJob, bool]:
    """UpdateReplication: a trusted caller reports completed|failed; applied exactly once."""
    job = get(job_id)
    if status not in (JobStatus.COMPLETED, JobStatus.FAILED):
        raise InvalidArgument("status must be 'completed' or 'failed'")
    if status == JobStatus.FAILED and not error_message:
        raise InvalidArgument("a failed status needs an error_message")
    if status == JobStatus.COMPLETED:
        missing = [d.disk_id for d in job_disks(job) if not d.disk_change_id or d.sync_status != "completed"]
        if missing and job.status not in JOB_TERMINAL_STATUSES:
            raise FailedPrecondition(f"job {job_id} cannot complete: no change id stored for {', '.join(missing)}")
    applied = finish(job_id, JobStatus(status), error_message or None,
                     classification="vma_reported_failure" if status == JobStatus.FAILED else None)
    return get(job_id), applied


# --- change ids ----------------------------------------------------------------------------------

def validate_change_id(change_id: str) -> None:
    if not CHANGE_ID_PATTERN.match(change_id or ""):
        raise InvalidArgument(f"change_id {quote(change_id)} is not of the form <uuid>/<sequence>")


def _disk_of_context(context_id: str, disk_id: str) -> VmDisk:
    require(disk_id, "disk_id is required (e.g. 'disk-2000'); change ids are stored per disk")
    disk = VmDisk.get_or_none(VmDisk.vm_context == context_id, VmDisk.disk_id == disk_id)
    if disk is None:
        raise NotFound(f"VM context {context_id} has no disk {quote(disk_id)}")
    return disk


def resolve_context_for_change_id(*, vm_context_id: str = "", job_id: str = "", vmware_vm_id: str = "",
                                  vcenter_host: str = "", vm_path: str = "") -> VmReplicationContext:
    if vm_context_id:
        return contexts.get(vm_context_id)
    if job_id:
        job = get(job_id)
        if not job.vm_context_id:
            raise NotFound(f"job {quote(job_id)} belongs to no VM context")
        return contexts.get(job.vm_context_id)
    if vmware_vm_id and vcenter_host:
        ctx = VmReplicationContext.get_or_none(VmReplicationContext.vmware_vm_id == vmware_vm_id,
                                               VmReplicationContext.vcenter_host == vcenter_host)
        if ctx is None:
            raise NotFound(f"no managed VM with VMware id {quote(vmware_vm_id)} in {quote(vcenter_host)}")
        return ctx
    if vm_path:  # legacy callers only
        found = list(VmReplicationContext.select().where(VmReplicationContext.vm_path == vm_path).limit(2))
        if len(found) == 1:
            return found[0]
        if found:
            raise FailedPrecondition(f"several managed VMs have the path {quote(vm_path)}; give vm_context_id")
        raise NotFound(f"no managed VM with path {quote(vm_path)}")
    raise InvalidArgument("give vm_context_id, job_id, vmware_vm_id + vcenter_host, or vm_path")


def usable_change_id(disk: VmDisk) -> str:
    """The stored change id, only when the disk's replica volume is the one it was produced on."""
    if not disk.disk_change_id or not disk.ossea_volume_id:
        return ""
    volume = OsseaVolume.get_or_none(OsseaVolume.id == disk.ossea_volume_id)
    return disk.disk_change_id if volume is not None else ""


def previous_change_id(ctx: VmReplicationContext, disk_id: str) -> str:
    return usable_change_id(_disk_of_context(ctx.context_id, disk_id))


def store_change_id(job_id: str, disk_id: str, change_id: str, *, previous: str = "", sync_type: str = "",
                    bytes_transferred: int | None = None, duration_seconds: int | None = None) -> VmDisk:
    """Record a disk's new change id for this job: vm_disks + a cbt_history row. Idempotent per (job, disk)."""
    validate_change_id(change_id)
    job = get(job_id)
    if not job.vm_context_id:
        raise NotFound(f"job {quote(job_id)} belongs to no VM context")
    disk = _disk_of_context(job.vm_context_id, disk_id)
    kind = sync_type or (CbtSyncType.INCREMENTAL if job.replication_type == "incremental" else CbtSyncType.FULL)
    if kind not in set(CbtSyncType):
        raise InvalidArgument(f"sync_type must be one of {', '.join(CbtSyncType)}")
    with db.atomic():
        VmDisk.update(disk_change_id=change_id, sync_status=DiskSyncStatus.COMPLETED, sync_progress_percent=100,
                      **({"bytes_synced": bytes_transferred} if bytes_transferred is not None else {})).where(
            VmDisk.id == disk.id).execute()
        existing = CbtHistory.get_or_none(CbtHistory.job == job_id, CbtHistory.disk_id == disk_id,
                                          CbtHistory.change_id == change_id)
        if existing is None:
            CbtHistory.create(vm_context=job.vm_context_id, job=job_id, disk_id=disk_id, change_id=change_id,
                              previous_change_id=previous or None, sync_type=kind, sync_success=True,
                              bytes_transferred=bytes_transferred, sync_duration_seconds=duration_seconds)
    return VmDisk.get_by_id(disk.id)


# --- delete --------------------------------------------------------------------------------------

def _check_deletable(job: ReplicationJob) -> None:
    if job.status not in JOB_TERMINAL_STATUSES:
        raise FailedPrecondition(f"job {job.id} is {job.status}; cancel it before deleting it")
    if FailoverJob.select().where(FailoverJob.replication_job_id == job.id,
                                  FailoverJob.status.in_(list(FAILOVER_ACTIVE_STATUSES))).exists():
        raise FailedPrecondition(f"job {job.id} is used by a failover in progress")


def job_volumes(job: ReplicationJob) -> list[OsseaVolume]:
    """The replica volumes this job wrote to (through its disks)."""
    ids = [d.ossea_volume_id for d in VmDisk.select(VmDisk.ossea_volume_id).where(VmDisk.job == job.id)
           if d.ossea_volume_id]
    return list(OsseaVolume.select().where(OsseaVolume.id.in_(ids))) if ids else []


def delete(job_id: str, *, actor: str, remove_volume: Callable[[OsseaVolume], None] | None) -> dict[str, Any]:
    """DeleteReplication as a cleanup job with named steps. Disk rows and their change ids are kept
    (vm_disks.job_id is set NULL) unless their replica volume is deleted too."""
    job = get(job_id)
    _check_deletable(job)
    tracking = joblog.start_job(JobType.CLEANUP, "delete-replication-job", owner=actor, context_id=job.vm_context_id,
                                metadata={"target_job_id": job_id, "delete_volumes": remove_volume is not None})
    deleted: list[int] = []
    warning = ""
    try:
        with joblog.step(tracking, "delete-volumes") as step:
            for volume in (job_volumes(job) if remove_volume else []):
                try:
                    remove_volume(volume)
                    deleted.append(volume.id)
                except DomainError as exc:
                    warning = f"volume {volume.volume_id} was not deleted: {exc.message}"
                    break
            step.details.update(deleted=len(deleted), warning=warning or None)
        with joblog.step(tracking, "database-cleanup") as step:
            exports = _delete_rows(job, deleted)
            step.details["nbd_exports_removed"] = exports
    except joblog.StepFailed as exc:
        joblog.end_job(tracking, JobTrackingStatus.FAILED, exc.message)
        raise exc.cause from None
    joblog.end_job(tracking, JobTrackingStatus.COMPLETED)
    return {"job_id": job_id, "deletion_tracking_id": tracking, "volumes_deleted": len(deleted),
            "nbd_exports_removed": exports, "volume_deletion_warning": warning}


def _delete_rows(job: ReplicationJob, volumes_deleted: Sequence[int]) -> int:
    with db.atomic():
        exports = NbdExport.select().where(NbdExport.job == job.id).count()
        FailoverJob.update(replication_job_id=None).where(FailoverJob.replication_job_id == job.id).execute()
        if volumes_deleted:
            VmDisk.update(disk_change_id=None, ossea_volume_id=None).where(
                VmDisk.ossea_volume_id.in_(list(volumes_deleted))).execute()
        ReplicationJob.delete().where(ReplicationJob.id == job.id).execute()
        # The context's counters are history and stay; a deleted last success is replaced by the newest other one.
        if job.vm_context_id and job.status == JobStatus.COMPLETED:
            newest = (ReplicationJob.select(ReplicationJob.id)
                      .where(ReplicationJob.vm_context == job.vm_context_id, ReplicationJob.status == JobStatus.COMPLETED)
                      .order_by(ReplicationJob.created_at.desc()).first())
            VmReplicationContext.update(last_successful_job=newest.id if newest else None).where(
                VmReplicationContext.context_id == job.vm_context_id,
                VmReplicationContext.last_successful_job.is_null()).execute()
    return exports


# --- progress ------------------------------------------------------------------------------------

def format_duration(seconds: int) -> str:
    if seconds <= 0:
        return ""
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes or hours else "") + f"{secs}s"


def progress_view(job: ReplicationJob, disks: Sequence[VmDisk] | None = None,
                  cbt_history: Sequence[CbtHistory] | None = None) -> dict[str, Any]:
    """Everything an operator sees about a job's progress, from the database (no VMA call). A caller that has
    already read the job's disks and CBT history passes them, so they are not read twice."""
    now = utcnow()
    disks = job_disks(job) if disks is None else disks
    history = {c.disk_id: c for c in (job_cbt_history(job) if cbt_history is None else cbt_history)}
    live = bool(job.vma_last_poll_at and now - job.vma_last_poll_at < timedelta(seconds=LIVE_SECONDS))
    return {
        "job": job,
        "vma": {
            "sync_type": job.vma_sync_type or "", "current_phase": job.vma_current_phase or "",
            "throughput_mbps": float(job.vma_throughput_mbps or 0), "eta_seconds": job.vma_eta_seconds or 0,
            "eta_formatted": format_duration(job.vma_eta_seconds or 0), "last_polled": job.vma_last_poll_at,
            "error_classification": job.vma_error_classification or "", "error_details": job.vma_error_details or "",
            "is_live": live and job.status not in JOB_TERMINAL_STATUSES,
        },
        "disks": [{
            "disk_id": d.disk_id, "label": d.label or "", "sync_status": d.sync_status,
            "sync_progress_percent": d.sync_progress_percent, "bytes_synced": d.bytes_synced,
            "total_bytes": d.capacity_bytes or 0,
            "change_id": d.disk_change_id if d.disk_id in history else "",
            "sync_type": history[d.disk_id].sync_type if d.disk_id in history else "",
        } for d in disks],
        "terminal": job.status in JOB_TERMINAL_STATUSES,
    }

