"""JobLog: every business operation is a job_tracking row with ordered job_steps and log_events.

Workflows (:mod:`oma_server.workflows`) are ordered lists of named steps, so a reader sees the whole
flow in one place and a failure names its step: each step (:func:`step`, :func:`skip_step`) is a job_steps
row (running → completed | failed | skipped), a failed step also writes an ERROR row to
job_execution_log (that is what ``active_jobs.error_count`` counts), and log records emitted while a
job or step is bound (see :mod:`oma_server.logs`) are stored in log_events by :class:`LogEventSink`.

Terminal job transitions are conditional updates (only from pending/running), so a job ends once.
"""
from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Iterator, Sequence

from peewee import IntegrityError, fn

from oma_server import logs
from oma_server.db.database import database_proxy as db
from oma_server.db.models import (
    JOB_TRACKING_ACTIVE_STATUSES,
    JobCategory,
    JobExecutionLog,
    JobStep,
    JobTracking,
    JobTrackingStatus,
    JobType,
    LogEvent,
    LogLevel,
    StepStatus,
    utcnow,
)
from oma_server.domain.text_rules import quote
from oma_server.errors import DomainError, InvalidArgument, NotFound

log = logging.getLogger("oma_server.joblog")

EXTERNAL_ID_MAX = 64
_seq_lock = threading.Lock()


def start_job(
    job_type: JobType | str,
    operation: str,
    *,
    owner: str | None = None,
    context_id: str | None = None,
    external_job_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    category: JobCategory | str = JobCategory.SYSTEM,
    parent_job_id: str | None = None,
    expected_steps: int | None = None,
) -> str:
    """Insert a running job and return its id."""
    if external_job_id and len(external_job_id) > EXTERNAL_ID_MAX:
        raise InvalidArgument(f"external job id longer than {EXTERNAL_ID_MAX} characters")
    meta = dict(metadata or {})
    if expected_steps:
        meta["expected_steps"] = expected_steps
    job = JobTracking.create(
        job_type=job_type, operation=operation[:100], status=JobTrackingStatus.RUNNING,
        owner=(owner or "system")[:100], context_id=context_id, external_job_id=external_job_id,
        metadata=meta or None, job_category=category, parent_job=parent_job_id,
    )
    return job.id


def end_job(job_id: str, status: JobTrackingStatus | str, error: str | None = None) -> bool:
    """Move a job to completed/failed/cancelled; False when it had already ended."""
    status = JobTrackingStatus(status)
    now = utcnow()
    values: dict[Any, Any] = {JobTracking.status: status, JobTracking.completed_at: now}
    if error:
        values[JobTracking.error_message] = error
    if status is JobTrackingStatus.CANCELLED:
        values[JobTracking.canceled_at] = now
    if status is JobTrackingStatus.COMPLETED:
        values[JobTracking.percent_complete] = 100
    return bool(
        JobTracking.update(values)
        .where(JobTracking.id == job_id, JobTracking.status.in_(JOB_TRACKING_ACTIVE_STATUSES))
        .execute()
    )


def set_percent(job_id: str, percent: float) -> None:
    JobTracking.update(percent_complete=max(0, min(100, int(percent)))).where(
        JobTracking.id == job_id
    ).execute()


def _insert_step(job_id: str, name: str, status: StepStatus, metadata: dict | None) -> JobStep:
    # seq = max(seq)+1 per job; the unique (job_id, seq) key catches a concurrent writer in another
    # process, in which case we simply take the next number.
    with _seq_lock:
        for _ in range(5):
            seq = (JobStep.select(fn.MAX(JobStep.seq)).where(JobStep.job == job_id).scalar() or 0) + 1
            try:
                with db.atomic():
                    return JobStep.create(job=job_id, name=name[:200], seq=seq, status=status, metadata=metadata)
            except IntegrityError:
                if not JobTracking.select().where(JobTracking.id == job_id).exists():
                    raise NotFound(f"job {job_id} does not exist; the step {quote(name)} cannot be recorded") from None
        raise RuntimeError(f"could not allocate a step number for job {job_id}")


def _finish_step(step: JobStep, status: StepStatus, error: str | None = None, metadata: dict | None = None) -> None:
    values: dict[Any, Any] = {JobStep.status: status, JobStep.completed_at: utcnow()}
    if error:
        values[JobStep.error_message] = error
    if metadata:
        values[JobStep.metadata] = {**(step.metadata or {}), **metadata}
    JobStep.update(values).where(JobStep.id == step.id).execute()


@dataclass
class StepHandle:
    """Passed to a running step; ``details`` are merged into the step's metadata when it ends."""

    job_id: str
    step_id: int
    name: str
    details: dict[str, Any]


class StepFailed(DomainError):
    """A workflow step failed; ``code`` is the cause's code, the message names the step."""

    def __init__(self, step: str, cause: BaseException):
        message = cause.message if isinstance(cause, DomainError) else str(cause) or type(cause).__name__
        super().__init__(f"step {quote(step)} failed: {message}")
        self.step = step
        self.cause = cause
        self.code = cause.code if isinstance(cause, DomainError) else "INTERNAL"


@contextlib.contextmanager
def step(job_id: str, name: str, metadata: dict[str, Any] | None = None) -> Iterator[StepHandle]:
    """Record one step around a block: completed on success, failed (re-raised as StepFailed) on error."""
    row = _insert_step(job_id, name, StepStatus.RUNNING, metadata)
    handle = StepHandle(job_id, row.id, name, {})
    try:
        with logs.bind(job_id=job_id, step_id=str(row.id)):
            yield handle
    except BaseException as exc:  # noqa: BLE001 - also KeyboardInterrupt/cancellation: close the step
        error = exc.message if isinstance(exc, DomainError) else (str(exc) or type(exc).__name__)
        _finish_step(row, StepStatus.FAILED, error, handle.details)
        JobExecutionLog.create(
            job=job_id, log_level=LogLevel.ERROR, message=f"{name}: {error}"[:10000],
            operation_phase=name[:100], details={"error_type": type(exc).__name__},
        )
        if isinstance(exc, StepFailed) or not isinstance(exc, Exception):
            raise
        raise StepFailed(name, exc) from exc
    else:
        _finish_step(row, StepStatus.COMPLETED, metadata=handle.details)


def skip_step(job_id: str, name: str, reason: str) -> None:
    row = _insert_step(job_id, name, StepStatus.SKIPPED, {"reason": reason})
    _finish_step(row, StepStatus.SKIPPED)


@contextlib.contextmanager
def recorded_operation(
    job_type: JobType | str, operation: str, *, owner: str, context_id: str | None = None,
    metadata: dict[str, Any] | None = None, category: JobCategory | str = JobCategory.SYSTEM,
) -> Iterator[StepHandle]:
    """A short mutation recorded as a one-step job, all in ONE transaction with the mutation itself:
    on any error nothing is written (the database stays exactly as it was) and the original error
    propagates; on success the job and its step are completed."""
    with db.atomic():
        job_id = start_job(job_type, operation, owner=owner, context_id=context_id,
                           metadata=metadata, category=category)
        try:
            with step(job_id, operation) as handle:
                yield handle
        except StepFailed as exc:
            raise exc.cause from None
        end_job(job_id, JobTrackingStatus.COMPLETED)


# --- reads -------------------------------------------------------------------------------------

def find_job(job_or_external_id: str) -> JobTracking:
    if not job_or_external_id:
        raise InvalidArgument("job_id is required")
    job = JobTracking.get_or_none(JobTracking.id == job_or_external_id)
    if job is None:
        job = (
            JobTracking.select()
            .where(JobTracking.external_job_id == job_or_external_id)
            .order_by(JobTracking.started_at.desc())
            .first()
        )
    if job is None:
        raise NotFound(f"no job with id or external id {quote(job_or_external_id)}")
    return job


def steps_of(job_ids: Iterable[str]) -> dict[str, list[JobStep]]:
    ids = list(job_ids)
    result: dict[str, list[JobStep]] = {i: [] for i in ids}
    if ids:
        for s in JobStep.select().where(JobStep.job.in_(ids)).order_by(JobStep.job, JobStep.seq):
            result[s.job_id].append(s)
    return result


def progress(job: JobTracking, steps: Sequence[JobStep]) -> dict[str, Any]:
    """One formula: (completed + skipped) / total; total = expected_steps when the workflow knows it."""
    counts = {status: sum(1 for s in steps if s.status == status) for status in StepStatus}
    total = max(len(steps), int((job.metadata or {}).get("expected_steps") or 0))
    done = counts[StepStatus.COMPLETED] + counts[StepStatus.SKIPPED]
    if job.status == JobTrackingStatus.COMPLETED:
        pct = 100.0
    else:
        pct = round(100.0 * done / total, 2) if total else 0.0
    activity = [t for s in steps for t in (s.started_at, s.completed_at) if t]
    end = job.completed_at or utcnow()
    return {
        "total_steps": total,
        "completed_steps": counts[StepStatus.COMPLETED],
        "failed_steps": counts[StepStatus.FAILED],
        "running_steps": counts[StepStatus.RUNNING],
        "skipped_steps": counts[StepStatus.SKIPPED],
        "step_completion_percentage": pct,
        "manual_completion_percentage": job.percent_complete or 0,
        "last_activity": max(activity) if activity else job.started_at,
        "runtime_seconds": int((end - job.started_at).total_seconds()) if job.started_at else 0,
    }


def list_jobs(
    *, context_id: str = "", statuses: Sequence[str] = (), job_type: str = "", category: str = "",
    since: datetime | None = None,
):
    query = JobTracking.select()
    if context_id:
        query = query.where(JobTracking.context_id == context_id)
    if statuses:
        for s in statuses:
            if s not in set(JobTrackingStatus):
                raise InvalidArgument(f"unknown job status {quote(s)}; one of {', '.join(JobTrackingStatus)}")
        query = query.where(JobTracking.status.in_(list(statuses)))
    if job_type:
        if job_type not in set(JobType):
            raise InvalidArgument(f"unknown job type {quote(job_type)}")
        query = query.where(JobTracking.job_type == job_type)
    if category:
        if category not in set(JobCategory):
            raise InvalidArgument(f"unknown job category {quote(category)}")
        query = query.where(JobTracking.job_category == category)
    if since:
        query = query.where(JobTracking.started_at >= since)
    return query.order_by(JobTracking.started_at.desc(), JobTracking.id)


_LEVEL_ORDER = {LogLevel.DEBUG: 0, LogLevel.INFO: 1, LogLevel.WARN: 2, LogLevel.ERROR: 3}


def job_logs(job_id: str, *, step_id: int = 0, min_level: str = "INFO", limit: int = 500) -> list[LogEvent]:
    job = find_job(job_id)
    try:
        floor = _LEVEL_ORDER[LogLevel(min_level.upper() or "INFO")]
    except ValueError:
        raise InvalidArgument(f"unknown log level {quote(min_level)}; one of DEBUG, INFO, WARN, ERROR") from None
    levels = [lvl for lvl, order in _LEVEL_ORDER.items() if order >= floor]
    query = LogEvent.select().where(LogEvent.job == job.id, LogEvent.level.in_(levels))
    if step_id:
        query = query.where(LogEvent.step == step_id)
    return list(query.order_by(LogEvent.ts, LogEvent.id).limit(max(1, min(limit or 500, 5000))))


# --- the log sink ------------------------------------------------------------------------------

_PY_TO_LEVEL = {logging.DEBUG: LogLevel.DEBUG, logging.INFO: LogLevel.INFO,
                logging.WARNING: LogLevel.WARN, logging.ERROR: LogLevel.ERROR, logging.CRITICAL: LogLevel.ERROR}


class LogEventSink(logging.Handler):
    """Stores log records (INFO+) that carry a bound job id in log_events.

    One process-wide handler with a bounded queue and one writer thread that inserts in batches; when
    the queue is full new records are dropped and counted (``dropped``), never blocking the caller.
    """

    def __init__(self, capacity: int = 10_000, batch: int = 100, flush_seconds: float = 0.5):
        super().__init__(level=logging.INFO)
        self._queue: queue.Queue = queue.Queue(capacity)
        self._batch, self._flush = batch, flush_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-events", daemon=True)
        self.dropped = 0

    def start(self) -> None:
        logging.getLogger().addHandler(self)
        # The job log needs the server's INFO records even when the console shows only warnings.
        server_logger = logging.getLogger("oma_server")
        if server_logger.getEffectiveLevel() > logging.INFO:
            server_logger.setLevel(logging.INFO)
        self._thread.start()

    def stop(self) -> None:
        logging.getLogger().removeHandler(self)
        self._stop.set()
        self._thread.join(timeout=5)

    def emit(self, record: logging.LogRecord) -> None:
        ids = logs.current_ids()
        if "job_id" not in ids or record.name.startswith("peewee"):
            return
        row = {
            "job": ids["job_id"],
            "step": int(ids["step_id"]) if ids.get("step_id") else None,
            "level": _PY_TO_LEVEL.get(record.levelno, LogLevel.INFO),
            "message": record.getMessage()[:60000],
            "attrs": {k: v for k, v in ids.items() if k not in ("job_id", "step_id")} or None,
            "ts": utcnow(),
            "external_job_id": ids.get("external_job_id"),
        }
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self.dropped += 1

    def flush(self) -> None:
        self._drain()

    def _drain(self) -> None:
        rows = []
        while len(rows) < self._batch:
            try:
                rows.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if not rows:
            return
        try:
            with db.connection_context():
                LogEvent.insert_many(rows).execute()
        except Exception:  # noqa: BLE001 - a job deleted meanwhile, DB down: logs are best effort
            with db.connection_context():
                for row in rows:
                    with contextlib.suppress(Exception):
                        LogEvent.insert(**{**row, "job": None, "step": None,
                                           "attrs": {**(row["attrs"] or {}), "job_id": row["job"]}}).execute()

    def _run(self) -> None:
        while not self._stop.wait(self._flush):
            while not self._queue.empty():
                self._drain()
        while not self._queue.empty():
            self._drain()


def metadata_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str) if value else ""
