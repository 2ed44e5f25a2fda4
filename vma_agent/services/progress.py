"""ProgressService: read, watch and (for callers other than this agent's data mover) report job progress."""
from __future__ import annotations

from typing import Callable

from vma.v1 import progress_pb2, progress_pb2_grpc

from vma_agent import errors, validation
from vma_agent.progress_store import (
    DiskStatus,
    JobRecord,
    JobStatus,
    ProgressStore,
    ProgressUpdate,
    Stage,
)
from vma_agent.services import timestamp

_MIB = 1024 * 1024


def job_progress_message(r: JobRecord) -> progress_pb2.JobProgress:
    """The wire form of a progress record (shared by Get and Watch)."""
    msg = progress_pb2.JobProgress(
        job_id=r.job_id, stage=r.stage.value, status=r.status.value, sync_type=r.sync_type,
        percentage=r.percentage, current_operation=r.current_operation,
        bytes_transferred=r.bytes_transferred, total_bytes=r.total_bytes,
        throughput=progress_pb2.Throughput(
            current_mbps=r.throughput_bps / _MIB, average_mbps=r.average_throughput_bps / _MIB,
            peak_mbps=r.peak_throughput_bps / _MIB,
        ),
        started_at=timestamp(r.started_at), updated_at=timestamp(r.updated_at),
        stage_started_at=timestamp(r.stage_started_at), elapsed_ms=r.elapsed_ms,
        eta_seconds=r.eta_seconds,
        vm_info=progress_pb2.VMInfo(
            name=r.vm_name, path=r.vm_path, cbt_enabled=r.cbt_enabled,
            disk_size_bytes=sum(d.capacity_bytes for d in r.disks.values()),
        ),
        errors=r.errors, last_error=r.last_error, sequence=r.sequence, snapshot_name=r.snapshot_name,
        snapshot_moref=r.snapshot_moref, resume_summary=r.resume_summary,
    )
    for d in r.disks.values():
        disk = msg.disks.add(
            disk_id=d.disk_id, label=d.label, status=d.status.value, sync_type=d.sync_type,
            full_copy_reason=d.full_copy_reason, bytes_transferred=d.bytes_transferred,
            bytes_zeroed=d.bytes_zeroed, total_bytes=d.total_bytes, capacity_bytes=d.capacity_bytes,
            percent=d.percent, throughput_mbps=d.throughput_bps / _MIB,
            previous_change_id=d.previous_change_id, change_id=d.change_id,
            error_message=d.error_message, checkpoint_offset=d.checkpoint_offset,
            resumed_from_offset=d.resumed_from_offset, resumed_at_percent=d.resumed_at_percent,
        )
        if d.started_at:
            disk.started_at.CopyFrom(timestamp(d.started_at))
        if d.completed_at:
            disk.completed_at.CopyFrom(timestamp(d.completed_at))
    return msg


class ProgressServicer(progress_pb2_grpc.ProgressServiceServicer):
    def __init__(self, store: ProgressStore, runs_job: Callable[[str], bool] = lambda job_id: False):
        self._store = store
        self._runs_job = runs_job  # whether this agent's own data mover runs the job

    def GetProgress(self, request, context):
        validation.identifier("job_id", request.job_id)
        record = self._store.get(request.job_id)
        if record is None:
            raise errors.NotFound(f"job {request.job_id} is not known to this agent")
        return progress_pb2.GetProgressResponse(progress=job_progress_message(record))

    def UpdateProgress(self, request, context):
        validation.identifier("job_id", request.job_id)
        if request.disk_id:
            validation.identifier("disk_id", request.disk_id)
        validation.text("sync_type", request.sync_type, 32)
        validation.text("change_id", request.change_id, 1_024)
        if self._runs_job(request.job_id):
            raise errors.FailedPrecondition(
                f"job {request.job_id} is run by this agent's data mover; only it reports the job's progress")
        if request.percent < 0 or request.percent > 100:
            raise errors.InvalidArgument("percent must be between 0 and 100")
        if request.bytes_transferred < 0 or request.total_bytes < 0:
            raise errors.InvalidArgument("byte counts cannot be negative")
        _, created = self._store.apply(ProgressUpdate(
            job_id=request.job_id,
            stage=Stage(request.stage) if request.stage else None,
            status=JobStatus(request.status) if request.status else None,
            disk_id=request.disk_id,
            disk_status=DiskStatus(request.disk_status) if request.disk_status else None,
            bytes_transferred=request.bytes_transferred or None,
            total_bytes=request.total_bytes or None,
            throughput_bps=request.throughput_bps,
            percent=request.percent or None,
            sync_type=request.sync_type or None,
            error_message=request.error_message or None,
            change_id=request.change_id or None,
        ))
        return progress_pb2.UpdateProgressResponse(job_id=request.job_id, auto_initialized=created)

    def WatchProgress(self, request, context):
        validation.identifier("job_id", request.job_id)
        if self._store.get(request.job_id) is None:
            raise errors.NotFound(f"job {request.job_id} is not known to this agent")
        for record in self._store.watch(request.job_id, is_active=context.is_active):
            yield progress_pb2.WatchProgressResponse(progress=job_progress_message(record))
