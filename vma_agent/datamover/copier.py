"""The copy engine: moves extents of a disk from a source NBD export to a target one.

Pure Python on top of :mod:`vma_agent.integrations.nbd_client` (no gRPC, no VMware).

Shape of a copy
---------------
* The caller says *what* to copy: ``data_extents`` (read from the source, written to
  the target) and ``zero_extents`` (written as NBD WRITE_ZEROES, nothing is read).
  For a full copy, :func:`plan_full_copy` turns VMware's "allocated areas" plus the disk
  size into both lists (everything unallocated must be zeroed: a reused target volume
  may hold stale data). For an incremental copy, the changed areas are the data
  extents and there are no zero extents (:func:`plan_incremental_copy`).
* Extents are normalised (sorted, clipped, merged) and cut into chunks of at most
  ``request_size`` bytes on ``request_size``-aligned boundaries (zero extents into
  chunks of at most ``zero_request_size``), produced lazily and shared by all workers.
* ``connections`` workers each own one source and one target connection and run
  their own event loop in a thread: libnbd's asynchronous API with completion
  callbacks, one ``select.poll`` over both sockets (libnbd and ``poll`` release the
  GIL, so the byte shuffling of the workers overlaps), up to ``queue_depth`` chunks and
  ``max_in_flight`` bytes in flight per connection pair. A chunk is read into a reused
  buffer (anonymous mmap: only touched pages cost memory) and written from that same
  buffer, never copied in Python.
* A data chunk read from the source that is entirely zero is written as
  WRITE_ZEROES; with ``zero_granularity`` set, zero runs inside a chunk (at that
  granularity) are also split off as WRITE_ZEROES.
* Every NBD command is retried under :class:`RetryPolicy` (3 tries, exponential
  back-off) unless its error is permanent (EINVAL, EROFS, ENOSPC, ...); a connection
  that died is re-opened before the retry. Failures raise :class:`CopyError` naming
  the operation and the offset. ``cancel_event`` stops the copy within
  ``poll_interval`` and raises :class:`CopyCancelled`.
* At the end the target is flushed (once if it advertises multi-conn, else on every
  connection).
* Checkpoints: every half ``checkpoint_bytes`` (or ``checkpoint_seconds``) the completed
  prefix of the work order is noted, every worker flushes its target connection, and the
  prefix becomes ``CopyProgress.durable_offset`` (every planned byte below it is written and
  flushed). Workers never write further than ``checkpoint_bytes`` beyond it, which bounds what
  a crash costs. ``start_offset`` resumes a copy at a checkpoint of an earlier run; with
  ``stall_seconds`` a copy whose connections stay lost restarts from its last checkpoint and
  fails only after no progress for that long (docs/design/resume.md).
* Progress: ``on_progress(CopyProgress)`` from the calling thread at most every
  ``progress_interval`` seconds, and once at the end. ``bytes_copied`` counts data
  written, ``bytes_zeroed`` zeroes written (zero extents and zero-detected data).

Modules: :mod:`.extents` (planning, pure), :mod:`.worker` (the copy loop), :mod:`.progress`
(accounting), :mod:`.failures` (retries and errors); this one opens the connections, runs the
workers, flushes and reports.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from vma_agent.datamover.extents import (
    Extent,
    MiB,
    bytes_below,
    clip_from,
    extents_total,
    normalize_extents,
    plan_full_copy,
    plan_incremental_copy,
    work_order,
)
from vma_agent.datamover.failures import CopyCancelled, CopyError, RetryPolicy, is_permanent
from vma_agent.datamover.progress import CopyProgress, CopyResult, progress_of
from vma_agent.datamover.worker import FLUSH, READ, WRITE, CopySettings, Worker, WorkQueue
from vma_agent.integrations.nbd_client import MAX_REQUEST, MAX_ZERO_REQUEST, NbdConnection, NbdError, strerror

# The copy engine's API is this module (names from .extents, .progress and .failures included).
__all__ = [
    "CopyCancelled",
    "CopyError",
    "CopyProgress",
    "CopyResult",
    "RetryPolicy",
    "copy_disk",
    "default_connections",
    "extents_total",
    "normalize_extents",
    "plan_full_copy",
    "plan_full_copy_from_block_status",
    "plan_incremental_copy",
]

log = logging.getLogger(__name__)


def plan_full_copy_from_block_status(source_uri: str, *, step: int = 1024 * MiB,
                                     merge_gap: int = 0) -> tuple[list[Extent], list[Extent]]:
    """``(data_extents, zero_extents)`` for a full copy from the source's own NBD block
    status (``base:allocation``): what reads as zeroes is zeroed, the rest copied. A
    fallback when VMware CBT cannot say which areas are allocated; a server without
    block status yields one data extent covering the disk."""
    data: list[Extent] = []
    with NbdConnection(source_uri, name=f"source {source_uri}") as conn:
        size = conn.size
        pos = 0
        while pos < size:
            got = conn.block_status(min(step, size - pos), pos)
            if not got:
                raise CopyError(f"block status at offset {pos} returned nothing", offset=pos)
            for e in got:
                if not e.zero:
                    data.append((e.offset, e.length))
            pos = got[-1].end
    return plan_full_copy(data, size, merge_gap=merge_gap)


def _open_pair(cfg: CopySettings, cancel: threading.Event | None) -> tuple[NbdConnection, NbdConnection]:
    """First source + target connections, retried under the retry policy."""
    failures = 0
    while True:
        src = None
        try:
            src = NbdConnection(cfg.source_uri, name=f"source {cfg.source_uri}")
            dst = NbdConnection(cfg.target_uri, name=f"target {cfg.target_uri}", write=True)
            return src, dst
        except NbdError as exc:
            if src is not None:
                src.close()
            failures += 1
            if cfg.retry.gives_up(exc.errno, failures):
                raise CopyError(str(exc), errno=exc.errno) from None
            delay = cfg.retry.delay(failures)
            log.warning("%s; retry %d/%d in %.1fs", exc, failures, cfg.retry.tries - 1, delay)
            if cancel is not None:
                if cancel.wait(delay):
                    raise CopyCancelled() from None
            else:
                time.sleep(delay)


def _flush(workers: Sequence[Worker], cfg: CopySettings, cancel: threading.Event | None) -> None:
    """Flush the target. With multi-conn one flush covers every connection's writes (and
    may be sent on a fresh connection if ours died); without it, each connection that
    wrote is flushed, and losing one before its flush is an error."""
    retry = cfg.retry
    conns = [w.dst for w in workers if w.dst is not None]
    if not conns:
        return
    multi = conns[0].can_multi_conn
    if multi:
        live = [c for c in conns if not c.is_dead()]
        conns = live[:1] or [None]
    for conn in conns:
        failures = 0
        while True:
            try:
                if conn is None or conn.is_dead():
                    if not multi:
                        raise NbdError(f"{conns[0].name}: connection lost before flush", errno.ENOTCONN)
                    if conn is not None:
                        conn.close()
                    conn = NbdConnection(cfg.target_uri, name=f"target {cfg.target_uri}", write=True)
                    workers[0].extra_conns.append(conn)
                _flush_one(conn, cfg, cancel)
                break
            except NbdError as exc:
                failures += 1
                if retry.gives_up(exc.errno, failures) or (not multi and conn.is_dead()):
                    raise CopyError(f"flush of the target failed: {exc}", operation=FLUSH,
                                    errno=exc.errno) from None
                if cancel is not None and cancel.wait(retry.delay(failures)):
                    raise CopyCancelled("copy cancelled during flush") from None
                if cancel is None:
                    time.sleep(retry.delay(failures))


def _flush_one(conn: NbdConnection, cfg: CopySettings, cancel: threading.Event | None) -> None:
    """Asynchronous flush polled with cancellation checks (a big flush can take minutes)."""
    if not conn.can_flush:
        return
    result: list[int] = []
    conn.aio_flush(result.append)
    while not result:
        if cancel is not None and cancel.is_set():
            raise CopyCancelled("copy cancelled during flush")
        conn.poll(max(1, int(cfg.poll_interval * 1000)))
        if not result and conn.is_dead():
            raise NbdError(f"{conn.name}: connection lost during flush", errno.ENOTCONN)
    if result[0]:
        raise NbdError(f"{conn.name}: flush failed: {strerror(result[0])}", result[0])


# ============================================================== entry point
def default_connections() -> int:
    """Connection pairs per copy when not given: one per two CPUs, between 1 and 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus // 2))


def copy_disk(
    source_uri: str,
    target_uri: str,
    data_extents: Iterable[Sequence[int]],
    zero_extents: Iterable[Sequence[int]] = (),
    *,
    on_progress: Callable[[CopyProgress], None] | None = None,
    cancel_event: threading.Event | None = None,
    connections: int | None = None,
    queue_depth: int = 64,
    max_in_flight: int = 16 * MiB,
    request_size: int = 2 * MiB,
    zero_request_size: int = 256 * MiB,
    detect_zeroes: bool = True,
    zero_granularity: int = 64 * 1024,
    punch_holes: bool = True,
    fast_zero: bool = False,
    flush: bool = True,
    retry: RetryPolicy = RetryPolicy(),
    progress_interval: float = 1.0,
    poll_interval: float = 0.1,
    start_offset: int = 0,
    checkpoint_bytes: int = 256 * MiB,
    checkpoint_seconds: float = 5.0,
    stall_seconds: float | None = None,
) -> CopyResult:
    """Copy ``data_extents`` from ``source_uri`` to ``target_uri`` and zero ``zero_extents``
    on the target. Extents are ``(offset, length)`` pairs; overlaps are merged.

    * ``on_progress(CopyProgress)``: called from this thread at most every
      ``progress_interval`` s while copying, at once when a checkpoint is taken, and once at
      the end (100 %).
    * ``cancel_event``: set it to stop; :class:`CopyCancelled` is raised within about
      ``poll_interval`` s (in-flight commands are abandoned, no flush).
    * ``connections``: source+target connection pairs, each driven by its own thread;
      default :func:`default_connections` (one per two CPUs, 1..4: on a small machine more
      pairs only add threads competing with the NBD servers for the same cores, while one
      pair already keeps ``queue_depth`` requests in flight).
    * ``queue_depth`` / ``max_in_flight``: per connection pair, at most that many chunks
      and that many data bytes in flight (deep queues for small incremental extents,
      bounded memory for big ones).
    * ``request_size``: largest read/write (data extents are cut at multiples of it);
      ``zero_request_size``: largest WRITE_ZEROES.
    * ``detect_zeroes``: data read as all-zero is written as WRITE_ZEROES (per chunk, and
      per ``zero_granularity`` run inside a chunk; 0 disables the finer split).
    * ``punch_holes``: let WRITE_ZEROES deallocate (thin targets); ``fast_zero``: send
      NBD_CMD_FLAG_FAST_ZERO when the target supports it (falls back on ENOTSUP).
    * ``flush``: flush the target at the end (keep it on; durability is the point).
    * ``retry``: per-command :class:`RetryPolicy`.
    * ``start_offset``: resume a copy whose planned bytes below this offset are already on the
      target (a checkpoint of an earlier run): only the plan at/after it is copied;
      ``CopyProgress.bytes_resumed`` counts the rest as done.
    * ``checkpoint_bytes`` / ``checkpoint_seconds``: take a checkpoint (flush every target
      connection, then publish ``CopyProgress.durable_offset``) after that many bytes or
      seconds, whichever comes first (0 disables that trigger).
    * ``stall_seconds``: when set, the copy survives lost connections: an attempt that fails
      with an error another attempt may fix restarts from the last checkpoint (back-off as
      ``retry``), and the copy gives up only after no byte was written for this long (also
      inside an attempt: a hung server counts as a stall). Unset: one attempt.

    Raises :class:`CopyError` (I/O failure after retries, target too small, stall, ...) or
    :class:`CopyCancelled`; both carry ``progress`` (with the last ``durable_offset``).
    Returns :class:`CopyResult`.
    """
    if request_size <= 0 or request_size > MAX_REQUEST:
        raise ValueError(f"request_size must be in (0, {MAX_REQUEST}]")
    if not 0 < zero_request_size <= MAX_ZERO_REQUEST:
        raise ValueError(f"zero_request_size must be in (0, {MAX_ZERO_REQUEST}]")
    if connections is None:
        connections = default_connections()
    if connections < 1 or queue_depth < 1:
        raise ValueError("connections and queue_depth must be >= 1")
    if start_offset < 0:
        raise ValueError("start_offset must be >= 0")
    max_in_flight = max(max_in_flight, request_size)
    if checkpoint_bytes > 0:
        # A zero piece is done in one command however long it is; one longer than a fraction of the
        # checkpoint interval would put that much written-but-not-checkpointed behind a slow read.
        zero_request_size = min(zero_request_size, max(request_size, checkpoint_bytes // 4))
    data = normalize_extents(data_extents)
    zero = normalize_extents(zero_extents)
    total = extents_total(data) + extents_total(zero)
    cfg = CopySettings(source_uri, target_uri, request_size, zero_request_size, queue_depth, max_in_flight,
                       detect_zeroes, zero_granularity, punch_holes, fast_zero, retry, poll_interval,
                       rewind_on_target_loss=stall_seconds is not None,
                       max_ahead=max(checkpoint_bytes, 2 * request_size) if checkpoint_bytes > 0 else 0)
    run = _Run(cfg, data, zero, total, connections, on_progress, cancel_event, flush, progress_interval,
               checkpoint_bytes, checkpoint_seconds, stall_seconds)
    run.durable = start_offset
    run.result.resumed_from = start_offset
    run.result.bytes_resumed = bytes_below(data, start_offset) + bytes_below(zero, start_offset)
    failures = 0
    while True:
        try:
            run.attempt()
            break
        except CopyError as exc:
            if stall_seconds is None or is_permanent(exc.errno):
                raise
            if cancel_event is not None and cancel_event.is_set():
                raise CopyCancelled(progress=exc.progress) from None
            idle = time.monotonic() - run.last_activity
            if idle >= stall_seconds:
                raise CopyError(f"{exc} (no progress for {idle:.0f} s; giving up)", offset=exc.offset,
                                length=exc.length, operation=exc.operation, errno=exc.errno) from exc
            failures += 1
            delay = retry.delay(failures)
            log.warning("copy attempt %d failed (%s); resuming from the checkpoint at offset %d in %.1fs",
                        run.result.attempts, exc, run.durable, delay)
            if cancel_event is not None:
                if cancel_event.wait(delay):
                    raise CopyCancelled(progress=exc.progress) from None
            else:
                time.sleep(delay)
    result = run.result
    result.bytes_total = total
    result.elapsed = time.monotonic() - run.started
    if on_progress is not None:
        on_progress(CopyProgress(result.bytes_copied, result.bytes_zeroed, total, result.elapsed,
                                 _resumed_at_end(result, total), run.durable))
    return result


def _resumed_at_end(result: CopyResult, total: int) -> int:
    """At the end every planned byte is on the target: what this run did not write itself was
    there before (resumed or rewound-and-skipped)."""
    return max(0, total - result.bytes_copied - result.bytes_zeroed)


class _Run:
    """One copy: its attempts (each with fresh connections and workers) and its checkpoints."""

    def __init__(self, cfg: CopySettings, data: list[Extent], zero: list[Extent], total: int, connections: int,
                 on_progress: Callable[[CopyProgress], None] | None, cancel: threading.Event | None, flush: bool,
                 progress_interval: float, checkpoint_bytes: int, checkpoint_seconds: float,
                 stall_seconds: float | None):
        self.cfg, self.data, self.zero, self.total = cfg, data, zero, total
        self.connections, self.on_progress, self.cancel, self.flush = connections, on_progress, cancel, flush
        self.progress_interval = progress_interval
        self.checkpoint_bytes, self.checkpoint_seconds = checkpoint_bytes, checkpoint_seconds
        self.stall_seconds = stall_seconds
        self.started = time.monotonic()
        self.last_activity = self.started
        self.durable = 0
        self.plan_end = max((off + n for off, n in (*data[-1:], *zero[-1:])), default=0)
        self.result = CopyResult(bytes_total=total)

    def attempt(self) -> None:
        cfg, cancel = self.cfg, self.cancel
        start = self.durable
        data, zero = clip_from(self.data, start), clip_from(self.zero, start)
        resumed = bytes_below(self.data, start) + bytes_below(self.zero, start)
        self.result.attempts += 1
        workers: list[Worker] = []

        def progress() -> CopyProgress:
            return progress_of((w.stats for w in workers), self.total, time.monotonic() - self.started,
                               resumed=resumed, durable_offset=self.durable)

        if cancel is not None and cancel.is_set():
            raise CopyCancelled(progress=progress())
        try:
            src, dst = _open_pair(cfg, cancel)
        except (CopyError, CopyCancelled) as exc:
            exc.progress = progress()
            raise
        try:
            _check_sizes(src, dst, data, zero)
        except BaseException:
            src.close()
            dst.close()
            raise
        shared = WorkQueue(work_order(data, zero, cfg.request_size, cfg.zero_request_size), cancel, start=start)
        remaining = extents_total(data) + extents_total(zero)
        workers = [Worker(i, shared, cfg, *((src, dst) if i == 0 else (None, None)))
                   for i in range(self.connections if remaining else 1)]
        checkpoint = _Checkpointer(self, shared, workers)
        try:
            for w in workers:
                w.start()
            last = time.monotonic()
            last_done = -1
            while True:
                alive = [w for w in workers if w.is_alive()]
                if not alive:
                    break
                # while a checkpoint flush is out, look often: the workers may be waiting for it
                # woken early when a worker waits for a checkpoint, a flush completed or a worker ended
                shared.wake.wait(max(0.01, min(self.progress_interval, cfg.poll_interval)))
                shared.wake.clear()
                if cancel is not None and cancel.is_set():
                    shared.stop.set()
                now = time.monotonic()
                current = progress()
                if current.bytes_done != last_done:
                    last_done = current.bytes_done
                    self.last_activity = now
                elif self.stall_seconds is not None and now - self.last_activity >= self.stall_seconds:
                    shared.fail(CopyError(f"no progress for {now - self.last_activity:.0f} s (stalled)",
                                          errno=errno.ETIMEDOUT))
                    continue
                advanced = checkpoint.step(current.bytes_done, now)
                if self.on_progress is not None and not shared.stop.is_set() and (
                        advanced or now - last >= self.progress_interval):
                    last = now
                    self.on_progress(progress())
            if shared.error is not None:
                raise shared.error
            if cancel is not None and cancel.is_set():
                raise CopyCancelled(progress=progress())
            if self.flush and remaining:
                _flush(workers, cfg, cancel)
                self.result.flushed = True
            self.durable = max(self.durable, self.plan_end)
        except (CopyError, CopyCancelled) as exc:
            exc.progress = progress()
            raise
        except NbdError as exc:
            err = CopyError(str(exc), errno=exc.errno)
            err.progress = progress()
            raise err from None
        finally:
            shared.stop.set()
            for w in workers:
                w.join()
            for w in workers:
                w.close()
            for w in workers:
                self.result.add_counts(w.stats)
            self.result.connections = max(self.result.connections, len(workers))


class _Checkpointer:
    """Takes the checkpoints of one attempt: every ``checkpoint_bytes`` or ``checkpoint_seconds``
    it notes the completed prefix, asks every worker to flush its target connection, and once
    all flushes succeeded publishes the prefix as the run's durable offset."""

    def __init__(self, run: _Run, shared: WorkQueue, workers: list[Worker]):
        self.run, self.shared, self.workers = run, shared, workers
        self.generation = 0
        self.candidate = 0
        self.last_time = time.monotonic()
        self.last_bytes = 0

    def _due(self, bytes_done: int, now: float) -> bool:
        run = self.run
        # every half interval: the copy may run one interval ahead, so it goes on during the flush
        half = run.checkpoint_bytes // 2
        return ((run.checkpoint_bytes > 0 and (bytes_done - self.last_bytes >= half
                                               or self.shared.completed_prefix() - run.durable >= half))
                or (run.checkpoint_seconds > 0 and now - self.last_time >= run.checkpoint_seconds))

    def step(self, bytes_done: int, now: float) -> bool:
        """Advance the checkpoint state machine; True when a new checkpoint was published."""
        shared = self.shared
        if self.generation and self.generation == shared.flush_generation:
            return self._collect()
        if not self._due(bytes_done, now):
            return False
        self.last_time, self.last_bytes = now, bytes_done
        candidate = shared.completed_prefix()
        if candidate <= self.run.durable:
            return False
        self.candidate = candidate
        self.generation = shared.flush_generation + 1
        shared.flush_generation = self.generation  # the workers see it at the top of their loop
        return False

    def _collect(self) -> bool:
        gen = self.generation
        for w in self.workers:
            if w.flush_failed_generation >= gen:
                self.generation = 0  # try again at the next interval
                return False
            if w.flushed_generation >= gen:
                continue
            if w.is_alive():
                return False  # still flushing
            # The worker finished its share and left: its connection is ours to flush now.
            if w.dst is not None and not w.dst.is_dead():
                try:
                    w.dst.flush()
                except NbdError:
                    self.generation = 0
                    return False
            w.flushed_generation = gen
        self.generation = 0
        self.run.durable = max(self.run.durable, self.candidate)
        self.shared.durable = self.run.durable
        self.shared.window_blocked = False
        self.run.result.checkpoints += 1
        return True


def _check_sizes(src: NbdConnection, dst: NbdConnection, data: Sequence[Extent],
                 zero: Sequence[Extent]) -> None:
    data_end = data[-1][0] + data[-1][1] if data else 0
    end = max(data_end, zero[-1][0] + zero[-1][1] if zero else 0)
    if data_end > src.size:
        raise CopyError(f"data extent ends at offset {data_end}, beyond the source size {src.size}",
                        offset=src.size, operation=READ, errno=errno.EINVAL)
    if end > dst.size:
        raise CopyError(f"target export is too small: {dst.size} bytes, the copy needs {end} "
                        f"(source size {src.size})", offset=dst.size, operation=WRITE, errno=errno.ENOSPC)
