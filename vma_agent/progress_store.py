"""In-memory progress of the replication jobs running on this agent.

One record per job with per-disk entries. Every mutation happens under one lock and bumps the
record's ``sequence``; watchers wait on a condition and always read the latest state, so a slow
watcher can only miss intermediate states (visible as a sequence gap), never block an update.
``updated_at`` is the time of the last real update (never rewritten on read), so the OMA can tell a
stalled job from a live one. Records are evicted a while after they end.

Memory is bounded: at most ``max_jobs`` records (a new job beyond that evicts the job that ended
longest ago, or is refused with RESOURCE_EXHAUSTED while every held job still runs), at most
:data:`MAX_DISKS_PER_JOB` disks per job and the last :data:`MAX_ERRORS_PER_JOB` errors; the RPC layer
bounds every string.
"""
from __future__ import annotations

import copy
import enum
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator

from vma_agent import errors

ETA_CAP_SECONDS = 86_400
# A VMware VM has at most 256 virtual disks (4 SCSI controllers x 64 targets, less the controllers).
MAX_DISKS_PER_JOB = 256
MAX_ERRORS_PER_JOB = 100


class Stage(enum.Enum):
    UNSPECIFIED = 0
    DISCOVER = 1
    ENABLE_CBT = 2
    SNAPSHOT = 3
    TRANSFER = 4
    FINALIZE = 5
    PERSIST_CHANGE_IDS = 6


class JobStatus(enum.Enum):
    UNSPECIFIED = 0
    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5


class DiskStatus(enum.Enum):
    UNSPECIFIED = 0
    QUEUED = 1
    STREAMING = 2
    COMPLETED = 3
    FAILED = 4


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)

STAGE_LABELS = {
    Stage.DISCOVER: "Discovering VM",
    Stage.ENABLE_CBT: "Enabling CBT",
    Stage.SNAPSHOT: "Creating Snapshot",
    Stage.TRANSFER: "Transferring Data",
    Stage.FINALIZE: "Finalizing",
    Stage.PERSIST_CHANGE_IDS: "Persisting Change IDs",
}


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class DiskRecord:
    disk_id: str
    label: str = ""
    status: DiskStatus = DiskStatus.QUEUED
    sync_type: str = ""
    full_copy_reason: str = ""
    bytes_transferred: int = 0
    bytes_zeroed: int = 0
    total_bytes: int = 0
    capacity_bytes: int = 0
    percent: float = 0.0
    throughput_bps: float = 0.0
    previous_change_id: str = ""
    change_id: str = ""
    error_message: str = ""
    started_at: datetime | None = None
    completed_at: datetime | None = None
    # every planned byte below it is written and flushed on the target (resume point)
    checkpoint_offset: int = 0
    resumed_from_offset: int = 0
    resumed_at_percent: float = 0.0


@dataclass
class JobRecord:
    job_id: str
    stage: Stage = Stage.DISCOVER
    status: JobStatus = JobStatus.QUEUED
    sync_type: str = ""
    percentage: float = 0.0
    bytes_transferred: int = 0
    total_bytes: int = 0
    throughput_bps: float = 0.0
    peak_throughput_bps: float = 0.0
    started_at: datetime = field(default_factory=_now)
    updated_at: datetime = field(default_factory=_now)
    stage_started_at: datetime = field(default_factory=_now)
    transfer_started_at: datetime | None = None
    vm_name: str = ""
    vm_path: str = ""
    cbt_enabled: bool = False
    snapshot_name: str = ""
    snapshot_moref: str = ""
    resume_summary: str = ""
    errors: list[str] = field(default_factory=list)
    last_error: str = ""
    disks: dict[str, DiskRecord] = field(default_factory=dict)
    sequence: int = 0
    ended_monotonic: float | None = None

    # --- derived values (computed on read) ----------------------------------------------------
    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def current_operation(self) -> str:
        if self.status is JobStatus.SUCCEEDED:
            return "Completed"
        if self.status is JobStatus.FAILED:
            return "Failed"
        if self.status is JobStatus.CANCELLED:
            return "Cancelled"
        return STAGE_LABELS.get(self.stage, self.stage.name.title())

    @property
    def eta_seconds(self) -> int:
        remaining = self.total_bytes - self.bytes_transferred
        if self.terminal or self.percentage <= 0 or self.throughput_bps <= 0 or remaining <= 0:
            return 0
        return int(min(remaining / self.throughput_bps, ETA_CAP_SECONDS))

    @property
    def average_throughput_bps(self) -> float:
        if not self.transfer_started_at:
            return 0.0
        end = self.updated_at if self.terminal else _now()
        elapsed = (end - self.transfer_started_at).total_seconds()
        return self.bytes_transferred / elapsed if elapsed > 0 else 0.0

    @property
    def elapsed_ms(self) -> int:
        end = self.updated_at if self.terminal else _now()
        return int((end - self.started_at).total_seconds() * 1000)


@dataclass
class ProgressUpdate:
    """One report. Unset (None) fields leave the record as it is."""

    job_id: str
    stage: Stage | None = None
    status: JobStatus | None = None
    disk_id: str = ""
    disk_status: DiskStatus | None = None
    disk_label: str | None = None
    bytes_transferred: int | None = None
    bytes_zeroed: int | None = None
    total_bytes: int | None = None
    capacity_bytes: int | None = None
    throughput_bps: float | None = None
    percent: float | None = None
    sync_type: str | None = None
    full_copy_reason: str | None = None
    previous_change_id: str | None = None
    change_id: str | None = None
    error_message: str | None = None
    vm_name: str | None = None
    vm_path: str | None = None
    cbt_enabled: bool | None = None
    snapshot_name: str | None = None
    snapshot_moref: str | None = None
    resume_summary: str | None = None
    checkpoint_offset: int | None = None
    resumed_from_offset: int | None = None
    resumed_at_percent: float | None = None


def _normalise_sync_type(value: str) -> str:
    value = value.strip().lower()
    return "full" if value in ("full", "initial") else "incremental" if value == "incremental" else value


class ProgressStore:
    def __init__(self, retention_seconds: float = 6 * 3600, max_jobs: int = 1000):
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._jobs: dict[str, JobRecord] = {}
        self._retention = retention_seconds
        self._max_jobs = max_jobs

    # --- writes -----------------------------------------------------------------------------
    def apply(self, update: ProgressUpdate) -> tuple[JobRecord, bool]:
        """Apply one report; returns (a copy of the record, whether it was created by this update)."""
        if not update.job_id:
            raise ValueError("job_id is required")
        with self._changed:
            self._evict_locked()
            record = self._jobs.get(update.job_id)
            created = record is None
            if created:
                self._make_room_locked()
                record = self._jobs[update.job_id] = JobRecord(job_id=update.job_id)
            elif record.terminal and update.status not in (None, *TERMINAL):
                # A job that ended stays ended; late reports from a dying worker are ignored.
                return copy.deepcopy(record), False
            if update.disk_id and update.disk_id not in record.disks and len(record.disks) >= MAX_DISKS_PER_JOB:
                raise errors.ResourceExhausted(
                    f"job {update.job_id} already has {MAX_DISKS_PER_JOB} disks, the most a VM can have")
            self._apply_locked(record, update)
            record.sequence += 1
            record.updated_at = _now()
            if record.terminal and record.ended_monotonic is None:
                record.ended_monotonic = time.monotonic()
            self._changed.notify_all()
            return copy.deepcopy(record), created

    def _apply_locked(self, record: JobRecord, u: ProgressUpdate) -> None:
        if u.stage is not None and u.stage is not Stage.UNSPECIFIED and u.stage is not record.stage:
            record.stage = u.stage
            record.stage_started_at = _now()
            if u.stage is Stage.TRANSFER and record.transfer_started_at is None:
                record.transfer_started_at = _now()
        if u.status is not None and u.status is not JobStatus.UNSPECIFIED:
            record.status = u.status
        if u.sync_type:
            record.sync_type = _normalise_sync_type(u.sync_type)
        for name in ("vm_name", "vm_path", "cbt_enabled", "snapshot_name", "snapshot_moref", "resume_summary"):
            value = getattr(u, name)
            if value is not None:
                setattr(record, name, value)
        if u.error_message:
            record.errors.append(u.error_message if not u.disk_id else f"{u.disk_id}: {u.error_message}")
            record.last_error = record.errors[-1]
            del record.errors[:-MAX_ERRORS_PER_JOB]  # the most recent ones

        if u.disk_id:
            self._apply_disk_locked(record, u)
            disks = record.disks.values()
            record.bytes_transferred = sum(d.bytes_transferred for d in disks)
            record.total_bytes = sum(d.total_bytes for d in disks)
            record.throughput_bps = sum(
                d.throughput_bps for d in disks if d.status is DiskStatus.STREAMING
            )
            record.percentage = (
                100.0 * record.bytes_transferred / record.total_bytes if record.total_bytes else 0.0
            )
            if all(d.status is DiskStatus.COMPLETED for d in disks):
                record.percentage = 100.0
        else:
            if u.bytes_transferred:
                record.bytes_transferred = u.bytes_transferred
            if u.total_bytes:
                record.total_bytes = u.total_bytes
            if u.throughput_bps is not None:
                record.throughput_bps = u.throughput_bps
            if u.percent:
                record.percentage = u.percent
            elif record.total_bytes:
                record.percentage = 100.0 * record.bytes_transferred / record.total_bytes
        if record.status is JobStatus.SUCCEEDED:
            record.percentage = 100.0
            record.throughput_bps = 0.0
        record.peak_throughput_bps = max(record.peak_throughput_bps, record.throughput_bps)
        if record.throughput_bps > 0 and record.transfer_started_at is None:
            record.transfer_started_at = _now()

    @staticmethod
    def _apply_disk_locked(record: JobRecord, u: ProgressUpdate) -> None:
        disk = record.disks.get(u.disk_id)
        if disk is None:
            disk = record.disks[u.disk_id] = DiskRecord(
                disk_id=u.disk_id, label=f"Disk {u.disk_id}", status=DiskStatus.STREAMING,
                started_at=_now(),
            )
        if u.disk_label:
            disk.label = u.disk_label
        if u.disk_status is not None and u.disk_status is not DiskStatus.UNSPECIFIED:
            if u.disk_status is DiskStatus.STREAMING and disk.started_at is None:
                disk.started_at = _now()
            disk.status = u.disk_status
            if u.disk_status in (DiskStatus.COMPLETED, DiskStatus.FAILED):
                disk.completed_at = _now()
                disk.throughput_bps = 0.0
        if u.bytes_transferred:
            disk.bytes_transferred = u.bytes_transferred
        if u.bytes_zeroed:
            disk.bytes_zeroed = u.bytes_zeroed
        if u.checkpoint_offset is not None:
            disk.checkpoint_offset = max(disk.checkpoint_offset, u.checkpoint_offset)
        if u.total_bytes:
            disk.total_bytes = u.total_bytes
        if u.capacity_bytes:
            disk.capacity_bytes = u.capacity_bytes
        if u.throughput_bps is not None and disk.status is DiskStatus.STREAMING:
            disk.throughput_bps = u.throughput_bps
        if u.sync_type:
            disk.sync_type = _normalise_sync_type(u.sync_type)
        for name in ("full_copy_reason", "previous_change_id", "change_id", "resumed_from_offset",
                     "resumed_at_percent"):
            value = getattr(u, name)
            if value is not None:
                setattr(disk, name, value)
        if u.error_message:
            disk.error_message = u.error_message
        if u.percent:
            disk.percent = u.percent
        elif disk.total_bytes:
            disk.percent = 100.0 * disk.bytes_transferred / disk.total_bytes
        if disk.status is DiskStatus.COMPLETED:
            disk.percent = 100.0

    # --- reads ------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            self._evict_locked()
            record = self._jobs.get(job_id)
            return copy.deepcopy(record) if record else None

    def jobs(self) -> list[JobRecord]:
        with self._lock:
            return [copy.deepcopy(r) for r in self._jobs.values()]

    def discard(self, job_id: str) -> None:
        """Forget a job's record (a resumed run of a job that ended here starts a fresh one)."""
        with self._changed:
            self._jobs.pop(job_id, None)
            self._changed.notify_all()

    def watch(
        self, job_id: str, is_active=lambda: True, poll_seconds: float = 1.0
    ) -> Iterator[JobRecord]:
        """Yield the current record at once, then the latest record after every change; stop after
        yielding a terminal record, when the job disappears, or when ``is_active()`` turns false."""
        last_sequence = -1
        while is_active():
            with self._changed:
                record = self._jobs.get(job_id)
                if record is None:
                    return
                if record.sequence == last_sequence:
                    self._changed.wait(poll_seconds)
                    record = self._jobs.get(job_id)
                    if record is None or record.sequence == last_sequence:
                        continue
                snapshot = copy.deepcopy(record)
            last_sequence = snapshot.sequence
            yield snapshot
            if snapshot.terminal:
                return

    def _make_room_locked(self) -> None:
        """Room for one more record: evict the job that ended longest ago, or refuse when none has ended."""
        if len(self._jobs) < self._max_jobs:
            return
        ended = [r for r in self._jobs.values() if r.ended_monotonic is not None]
        if not ended:
            raise errors.ResourceExhausted(
                f"this agent already tracks {len(self._jobs)} running jobs (progress_max_jobs); wait for one "
                f"to end")
        oldest = min(ended, key=lambda r: r.ended_monotonic)
        del self._jobs[oldest.job_id]
        self._changed.notify_all()  # a watcher of the evicted job sees it gone and ends

    def _evict_locked(self) -> None:
        now = time.monotonic()
        expired = [
            job_id for job_id, r in self._jobs.items()
            if r.ended_monotonic is not None and now - r.ended_monotonic > self._retention
        ]
        for job_id in expired:
            del self._jobs[job_id]

