"""Following a job until it ends: what ``omactl replicate``/``watch`` and ``omactl failover ...`` show.

The server pushes the job's progress on every change (ProgressService.WatchReplicationProgress).
On a terminal the job is redrawn in place as one line for the job and a bar per disk (bytes, rate,
ETA); when stderr is a log file or a pipe, redrawing would only produce garbage, so a plain line is
written when the state changes and at most every ``PLAIN_INTERVAL_S`` otherwise. With ``--json``
every update is one JSON line on stdout instead. Watching never changes the job: stopping the watch
(Ctrl-C) leaves it running.

A failover, cleanup or rollback job (FailoverService.WatchFailoverJob) is shown by its steps: on a
terminal one line for the job and one per step, redrawn in place; otherwise one line whenever the job
or a step changes status (a handful of lines per job, so nothing is throttled).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from typing import Any, Callable, Protocol, TextIO

from omaclient import output
from omaclient.client import OmaClient

PLAIN_INTERVAL_S = 10.0
RESUBSCRIBE_PAUSE_S = 1.0
BAR_WIDTH = 24
_MIB = 1024 * 1024


def _columns(stream: TextIO) -> int:
    """Width of the terminal the stream writes to (stderr may be one while stdout is piped), less one:
    a full-width line would wrap on some terminals."""
    try:
        return os.get_terminal_size(stream.fileno()).columns - 1
    except (AttributeError, OSError, ValueError):  # not a file (StringIO), or not a terminal
        return shutil.get_terminal_size().columns - 1


class Display(Protocol):
    def update(self, progress: Any) -> None: ...


def follow(client: OmaClient, job_id: str, display: Display) -> Any:
    """Show the job's progress until it reaches a terminal state and return that last update.

    A stream that ends before the terminal update (the server bounds how long it keeps one open)
    is simply watched again.
    """
    while True:
        with contextlib.closing(client.watch_replication(job_id)) as updates:
            for progress in updates:
                display.update(progress)
                if progress.terminal:
                    return progress
        time.sleep(RESUBSCRIBE_PAUSE_S)


class JsonLinesDisplay:
    def __init__(self, stream: TextIO):
        self._stream = stream

    def update(self, progress: Any) -> None:
        self._stream.write(output.to_json(progress, compact=True) + "\n")
        self._stream.flush()


class _Redrawing:
    """Lines redrawn in place on a terminal (ANSI: cursor up over the previous drawing, clear to end)."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._lines_on_screen = 0

    def _redraw(self, lines: list[str]) -> None:
        width = _columns(self._stream)
        erase = f"\x1b[{self._lines_on_screen}F\x1b[J" if self._lines_on_screen else ""
        self._stream.write(erase + "".join(output.printable(line)[:width] + "\n" for line in lines))
        self._stream.flush()
        self._lines_on_screen = len(lines)


class TerminalDisplay(_Redrawing):
    """Redraws the job line and one bar per disk in place."""

    def update(self, progress: Any) -> None:
        self._redraw([job_line(progress), *(disk_line(d) for d in progress.disks)])


class PlainDisplay:
    """One timestamped line per state change, and at most every ``interval`` seconds otherwise."""

    def __init__(self, stream: TextIO, interval: float = PLAIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self._stream, self._interval, self._clock = stream, interval, clock
        self._last_state: tuple[str, str] | None = None
        self._last_written = float("-inf")

    def update(self, progress: Any) -> None:
        state = (progress.status, progress.current_operation)
        now = self._clock()
        if state == self._last_state and not progress.terminal and now - self._last_written < self._interval:
            return
        self._last_state, self._last_written = state, now
        self._stream.write(f"{time.strftime('%H:%M:%S')} {output.printable(job_line(progress))}\n")
        self._stream.flush()


def job_line(p: Any) -> str:
    kind = f" ({p.replication_type})" if p.replication_type else ""
    parts = [p.vm_name or p.vm_context_id, f"job {p.job_id}", f"{p.status}{kind}", output.percent(p.progress_percent)]
    if p.total_bytes:
        parts.append(f"{output.size(p.bytes_transferred)} of {output.size(p.total_bytes)}")
    if not p.terminal:
        parts += [output.rate(p.transfer_speed_bps), f"ETA {output.duration(_job_eta(p))}"]
    if p.current_operation:
        parts.append(p.current_operation)
    if p.error_message:
        parts.append(f"error: {p.error_message}")
    return "  ".join(parts)


def disk_line(d: Any) -> str:
    bytes_per_second = d.throughput_mbps * _MIB
    remaining = max(d.total_bytes - d.bytes_synced, 0)
    eta = remaining / bytes_per_second if bytes_per_second > 0 and d.sync_status == "syncing" else 0
    parts = [f"  {d.label or d.disk_id}", bar(d.sync_progress_percent), output.percent(d.sync_progress_percent),
             f"{output.size(d.bytes_synced)} of {output.size(d.total_bytes)}", output.rate(bytes_per_second),
             f"ETA {output.duration(eta)}", d.sync_status]
    if d.error_message:
        parts.append(f"error: {d.error_message}")
    return "  ".join(parts)


def bar(percent: float, width: int = BAR_WIDTH) -> str:
    filled = round(max(0.0, min(percent, 100.0)) / 100 * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _job_eta(p: Any) -> float:
    if p.vma_progress.eta_seconds > 0:
        return p.vma_progress.eta_seconds
    remaining = max(p.total_bytes - p.bytes_transferred, 0)
    return remaining / p.transfer_speed_bps if p.transfer_speed_bps > 0 else 0


# --- failover, cleanup and rollback jobs ------------------------------------------------------------
_STEP_MARKS = {"completed": "done", "running": "...", "failed": "FAILED", "skipped": "skipped", "pending": "pending"}


def follow_failover(client: OmaClient, job_id: str, display: Display) -> Any:
    """Show the job's steps until it is terminal and return that last WatchFailoverJobResponse
    (a stream that ends early is watched again, like :func:`follow`)."""
    while True:
        with contextlib.closing(client.watch_failover(job_id)) as updates:
            for update in updates:
                display.update(update)
                if update.terminal:
                    return update
        time.sleep(RESUBSCRIBE_PAUSE_S)


def failover_job_line(update: Any) -> str:
    job, record = update.job, update.failover_job if update.HasField("failover_job") else None
    total, done = output.expected_steps(job), job.completed_steps + job.skipped_steps
    parts = [output.failover_vm_name(job, record) or job.context_id, job.operation or job.job_type,
             f"job {job.job_id}", job.status]
    # Without the workflow's step count a percentage would only say how many of the steps so far are done.
    parts += [f"{job.progress_percent}%", f"{done}/{total} steps"] if total else [f"{done} step{'' if done == 1 else 's'} done"]
    if record is not None and record.status and record.job_id == job.job_id:
        parts.append(f"failover {record.status}")
    if job.error_message:
        parts.append(f"error: {job.error_message}")
    return "  ".join(parts)


def step_line(step: Any, total: int) -> str:
    mark = _STEP_MARKS.get(step.status, step.status)
    number = f"{step.seq:>2}/{total}" if total else f"{step.seq:>2}"
    parts = [f"  [{number}] {step.display_name or step.name}", mark]
    if step.completed_at.seconds:
        parts.append(output.elapsed(step.started_at, step.completed_at))
    if step.error_message:
        parts.append(f"error: {step.error_message}")
    return "  ".join(parts)


class FailoverTerminalDisplay(_Redrawing):
    """The job line and one line per step, redrawn in place."""

    def update(self, update: Any) -> None:
        total = output.expected_steps(update.job)
        self._redraw([failover_job_line(update), *(step_line(s, total) for s in update.job.steps)])


class FailoverPlainDisplay:
    """A timestamped line when the job's status changes and whenever a step starts or ends."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._job_status = ""
        self._steps: dict[int, str] = {}

    def update(self, update: Any) -> None:
        job, lines = update.job, []
        total = output.expected_steps(job)
        for step in job.steps:
            if self._steps.get(step.seq) != step.status:
                self._steps[step.seq] = step.status
                lines.append(step_line(step, total))
        if job.status != self._job_status:  # the job's line before its first steps, after its last ones
            self._job_status = job.status
            lines.insert(len(lines) if update.terminal else 0, failover_job_line(update))
        stamp = time.strftime("%H:%M:%S")
        self._stream.write("".join(f"{stamp} {output.printable(line)}\n" for line in lines))
        self._stream.flush()
