"""The terminal transitions of a replication job, each in ONE transaction with the VM context.

A job ends exactly once (a conditional update from a non-terminal status). The same transaction sets
``completed_at`` and the error, moves disks that did not finish to ``failed``, updates the context's
counters and status and clears ``current_job_id`` — so a VM is never left blocked by a dead job —
and ends the job's JobLog job. A context in a failover state keeps that state (replication
bookkeeping never overwrites ``failed_over_*``/``cleanup_required``).
"""
from __future__ import annotations

import logging
from typing import Any

from oma_server import metrics
from oma_server.db.models import (
    CONTEXT_REPLICATION_BLOCKED_STATUSES,
    REPLICATION_ACTIVE_STATUSES,
    ContextStatus,
    DiskSyncStatus,
    JobStatus,
    JobTracking,
    JobTrackingStatus,
    ReplicationJob,
    VmDisk,
    VmReplicationContext,
    utcnow,
)
from oma_server.db.transactions import run_transaction
from oma_server.domain import joblog, nbd_access

log = logging.getLogger("oma_server.replication")

FINAL_SYNC_SCHEDULER = "failover"  # replication_jobs.scheduled_by of a live failover's final sync

_JOBLOG_STATUS = {
    JobStatus.COMPLETED: JobTrackingStatus.COMPLETED,
    JobStatus.FAILED: JobTrackingStatus.FAILED,
    JobStatus.CANCELLED: JobTrackingStatus.CANCELLED,
}


def tracking_job_id(job_id: str) -> str | None:
    """The JobLog job of a replication job (its external id is the replication job id)."""
    row = (JobTracking.select(JobTracking.id).where(JobTracking.external_job_id == job_id)
           .order_by(JobTracking.started_at.desc()).first())
    return row.id if row else None


def finish(job_id: str, status: JobStatus, error: str | None = None,
           classification: str | None = None, details: str | None = None) -> bool:
    """Move a job to completed/failed/cancelled and release its VM. False when it had already ended."""
    if status not in _JOBLOG_STATUS:
        raise ValueError(f"{status} is not a terminal status")
    now = utcnow()

    # The conditional UPDATE of the job's status is the claim (of a completion, a failure and a cancel racing
    # from different OMA processes or Galera nodes, one ends the job); run_transaction retries a certification
    # conflict, and the retried attempt then finds the job ended.
    def end() -> bool:
        values: dict[Any, Any] = {ReplicationJob.status: status, ReplicationJob.completed_at: now}
        if status is JobStatus.COMPLETED:
            values.update({ReplicationJob.progress_percent: 100, ReplicationJob.current_operation: "Completed",
                           ReplicationJob.setup_progress_percent: 100})
        else:
            values[ReplicationJob.current_operation] = "Failed" if status is JobStatus.FAILED else "Cancelled"
            values[ReplicationJob.error_message] = error or status.value
        if classification:
            values[ReplicationJob.vma_error_classification] = classification
        if details:
            values[ReplicationJob.vma_error_details] = details
        ended = ReplicationJob.update(values).where(
            ReplicationJob.id == job_id, ReplicationJob.status.in_(REPLICATION_ACTIVE_STATUSES)
        ).execute()
        if not ended:
            return False
        job = ReplicationJob.get_by_id(job_id)
        if status is not JobStatus.COMPLETED:
            VmDisk.update(sync_status=DiskSyncStatus.FAILED).where(
                VmDisk.job == job_id, VmDisk.sync_status != DiskSyncStatus.COMPLETED
            ).execute()
        if job.vm_context_id:
            _release_context(job, status, now)
        tracking = tracking_job_id(job_id)
        if tracking:
            joblog.end_job(tracking, _JOBLOG_STATUS[status], error)
        return True

    if not run_transaction(end, what=f"ending replication job {job_id}"):
        return False
    metrics.REPLICATION_JOBS.labels(status=status.value).inc()
    log.info("replication job %s %s%s", job_id, status.value, f": {error}" if error else "")
    nbd_access.job_ended(job_id)  # its VMA may no longer reach the job's exports
    return True


def _release_context(job: ReplicationJob, status: JobStatus, now) -> None:
    ctx = VmReplicationContext.get_by_id(job.vm_context_id)
    values: dict[Any, Any] = {VmReplicationContext.last_status_change: now}
    if status is JobStatus.COMPLETED:
        values[VmReplicationContext.successful_jobs] = VmReplicationContext.successful_jobs + 1
        values[VmReplicationContext.last_successful_job] = job.id
        new_status = ContextStatus.READY_FOR_FAILOVER
    elif status is JobStatus.FAILED:
        values[VmReplicationContext.failed_jobs] = VmReplicationContext.failed_jobs + 1
        # A failover's final sync that fails leaves the VM ready for failover (docs/design/failover.md#compensation): its last
        # completed sync is intact as far as CBT knows (the change ids were not advanced), so the retried
        # failover's own final sync copies again everything changed since then.
        final_sync = job.scheduled_by == FINAL_SYNC_SCHEDULER and ctx.last_successful_job_id
        new_status = ContextStatus.READY_FOR_FAILOVER if final_sync else ContextStatus.FAILED
    else:  # cancelled: back to what the last finished job said
        new_status = ContextStatus.READY_FOR_FAILOVER if ctx.last_successful_job_id else ContextStatus.DISCOVERED
    if ctx.current_status not in CONTEXT_REPLICATION_BLOCKED_STATUSES:
        values[VmReplicationContext.current_status] = new_status
    # Release the VM only if this job holds it (the claim is per job).
    VmReplicationContext.update(values).where(VmReplicationContext.context_id == ctx.context_id).execute()
    VmReplicationContext.update(current_job=None).where(
        VmReplicationContext.context_id == ctx.context_id, VmReplicationContext.current_job == job.id
    ).execute()
