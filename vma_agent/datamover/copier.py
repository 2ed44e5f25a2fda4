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
* Progress: ``on_progress(CopyProgress)`` from the calling thread at most every
  ``progress_interval`` seconds, and once at the end. ``bytes_copied`` counts data
  written, ``bytes_zeroed`` zeroes written (zero extents and zero-detected data).
"""
from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from vma_agent.integrations.nbd_client import (
    DIR_READ,
    DIR_WRITE,
    MAX_REQUEST,
    MAX_ZERO_REQUEST,
    IoBuffer,
    NbdConnection,
    NbdError,
    strerror,
)

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

MiB = 1024 * 1024
Extent = tuple[int, int]  # (offset, length)

#: Errors that another attempt cannot fix.
PERMANENT_ERRNOS = frozenset({errno.EINVAL, errno.EROFS, errno.EPERM, errno.EACCES, errno.ENOSPC,
                              errno.EFBIG, errno.EOVERFLOW, errno.ENOTSUP, errno.EDQUOT})


# ============================================================== extents / plans
def normalize_extents(extents: Iterable[Sequence[int]], *, size: int | None = None,
                      merge_gap: int = 0) -> list[Extent]:
    """Sort, drop empty, clip to ``[0, size)`` and merge overlapping/adjacent extents
    (and those at most ``merge_gap`` bytes apart: the gap is then copied too)."""
    items = sorted((int(o), int(n)) for o, n in extents if n > 0)
    out: list[list[int]] = []
    for off, n in items:
        if off < 0:
            raise ValueError(f"negative extent offset {off}")
        end = off + n
        if size is not None:
            if off >= size:
                continue
            end = min(end, size)
        if out and off <= out[-1][1] + merge_gap:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([off, end])
    return [(a, b - a) for a, b in out]


def extents_total(extents: Iterable[Sequence[int]]) -> int:
    return sum(n for _, n in extents)


def _complement(extents: Sequence[Extent], size: int) -> list[Extent]:
    out: list[Extent] = []
    pos = 0
    for off, n in extents:
        if off > pos:
            out.append((pos, off - pos))
        pos = max(pos, off + n)
    if pos < size:
        out.append((pos, size - pos))
    return out


def plan_full_copy(allocated: Iterable[Sequence[int]], disk_size: int, *,
                   merge_gap: int = 0) -> tuple[list[Extent], list[Extent]]:
    """``(data_extents, zero_extents)`` for a full copy: the allocated areas (clipped to
    the disk size) are copied, every other byte of the disk is zeroed."""
    if disk_size < 0:
        raise ValueError("disk size must be >= 0")
    data = normalize_extents(allocated, size=disk_size, merge_gap=merge_gap)
    return data, _complement(data, disk_size)


def plan_incremental_copy(changed: Iterable[Sequence[int]], disk_size: int, *,
                          merge_gap: int = 0) -> tuple[list[Extent], list[Extent]]:
    """``(data_extents, [])`` for an incremental copy of the changed areas."""
    return normalize_extents(changed, size=disk_size, merge_gap=merge_gap), []


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


# ============================================================== public types
@dataclass(frozen=True)
class RetryPolicy:
    """Per-command retries: ``tries`` attempts in all, waiting ``initial_delay``,
    then ``initial_delay*factor``, ... (at most ``max_delay``) between them."""

    tries: int = 3
    initial_delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 30.0

    def delay(self, failures: int) -> float:
        return min(self.max_delay, self.initial_delay * self.factor ** max(0, failures - 1))


@dataclass(frozen=True)
class CopyProgress:
    bytes_copied: int
    bytes_zeroed: int
    bytes_total: int
    elapsed: float

    @property
    def bytes_done(self) -> int:
        return self.bytes_copied + self.bytes_zeroed

    @property
    def percent(self) -> float:
        return 100.0 if self.bytes_total <= 0 else min(100.0, 100.0 * self.bytes_done / self.bytes_total)

    @property
    def throughput_bps(self) -> float:
        return self.bytes_done / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class CopyResult:
    bytes_copied: int = 0          # data written to the target
    bytes_zeroed: int = 0          # zeroes written (zero extents + zero-detected data)
    bytes_read: int = 0            # data read from the source
    bytes_total: int = 0           # planned: data extents + zero extents
    zero_detected: int = 0         # of bytes_zeroed: read from a data extent, found zero
    elapsed: float = 0.0
    reads: int = 0
    writes: int = 0
    zeroes: int = 0
    retries: int = 0
    reconnects: int = 0
    connections: int = 0
    flushed: bool = False

    @property
    def bytes_done(self) -> int:
        return self.bytes_copied + self.bytes_zeroed

    @property
    def throughput_bps(self) -> float:
        return self.bytes_done / self.elapsed if self.elapsed > 0 else 0.0


class CopyError(Exception):
    """A copy failed. ``offset``/``length``/``operation`` locate the failing command
    (``None`` for failures not tied to one, e.g. a size mismatch)."""

    def __init__(self, message: str, *, offset: int | None = None, length: int | None = None,
                 operation: str | None = None, errno: int | None = None):
        super().__init__(message)
        self.offset = offset
        self.length = length
        self.operation = operation
        self.errno = errno
        self.progress: CopyProgress | None = None


class CopyCancelled(Exception):
    """The copy was cancelled through ``cancel_event``; ``progress`` says how far it got."""

    def __init__(self, message: str = "copy cancelled", progress: CopyProgress | None = None):
        super().__init__(message)
        self.progress = progress


# ============================================================== internals
_READ, _WRITE, _ZERO, _FLUSH = "read", "write", "write-zeroes", "flush"


class _Chunk:
    """A piece of the disk: one read, then one or more write/zero commands."""

    __slots__ = ("buf", "length", "offset", "pending")

    def __init__(self, offset: int, length: int):
        self.offset = offset
        self.length = length
        self.buf: IoBuffer | None = None
        self.pending = 0


class _Op:
    """One NBD command (retried as a unit)."""

    __slots__ = (
        "at",
        "buf",
        "chunk",
        "conn",
        "detected",
        "failures",
        "fast",
        "inflight",
        "kind",
        "length",
        "offset",
        "zero",
    )

    def __init__(self, chunk: _Chunk, kind: str, offset: int, length: int, *,
                 buf: IoBuffer | None = None, at: int = 0, zero: bool = False, detected: bool = False):
        self.chunk = chunk
        self.kind = kind
        self.offset = offset
        self.length = length
        self.buf = buf            # read into / write from
        self.at = at              # offset inside buf
        self.zero = zero          # counts as zeroed (write-zeroes, or zeroes written as data)
        self.detected = detected  # the zeroes were found in source data
        self.failures = 0
        self.fast = False         # sent with NBD_CMD_FLAG_FAST_ZERO
        self.inflight = False
        self.conn: NbdConnection | None = None


def _split(extents: Sequence[Extent], step: int) -> Iterator[tuple[int, int]]:
    """Cut extents at multiples of ``step``."""
    for off, n in extents:
        end = off + n
        while off < end:
            nxt = min(end, (off // step + 1) * step)
            yield off, nxt - off
            off = nxt


def _work(data: Sequence[Extent], zero: Sequence[Extent], request_size: int,
          zero_request_size: int) -> Iterator[tuple[bool, int, int]]:
    """``(is_zero, offset, length)`` in disk order."""
    d = ((False, o, n) for o, n in _split(data, request_size))
    z = ((True, o, n) for o, n in _split(zero, zero_request_size))
    return heapq.merge(d, z, key=lambda t: t[1])


class _Shared:
    """State shared by the workers and the supervising thread."""

    def __init__(self, work: Iterator[tuple[bool, int, int]], cancel: threading.Event | None):
        self._work = work
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.cancel = cancel
        self.error: BaseException | None = None
        self.exhausted = False

    def next_work(self) -> tuple[bool, int, int] | None:
        if self.exhausted:
            return None
        with self._lock:
            item = next(self._work, None)
            if item is None:
                self.exhausted = True
            return item

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.stop.set()

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


@dataclass
class _Settings:
    source_uri: str
    target_uri: str
    request_size: int
    zero_request_size: int
    queue_depth: int
    max_in_flight: int
    detect_zeroes: bool
    zero_granularity: int
    punch_holes: bool
    fast_zero: bool
    retry: RetryPolicy
    poll_interval: float


class _Worker(threading.Thread):
    """One source + one target connection driven by one event loop."""

    def __init__(self, index: int, shared: _Shared, cfg: _Settings,
                 src: NbdConnection | None = None, dst: NbdConnection | None = None):
        super().__init__(name=f"datamover-{index}", daemon=True)
        self.index = index
        self.shared = shared
        self.cfg = cfg
        self.src = src
        self.dst = dst
        self.stats = CopyResult()
        self._events: deque[tuple[_Op, int]] = deque()
        self._delayed: list[tuple[float, int, _Op]] = []
        self._seq = itertools.count()
        self._inflight: set[_Op] = set()
        self._buffers: list[IoBuffer] = []
        self._zero_buf: IoBuffer | None = None
        self._fast_zero_ok = True
        self._suspect: set[str] = set()  # sides whose connection may have died
        self._open = 0                     # chunks taken and not finished
        self._open_bytes = 0               # bytes of those holding a buffer
        self.extra_conns: list[NbdConnection] = []
        self.ok = False

    # ------------------------------------------------------------ connections
    def _connect(self, which: str) -> NbdConnection:
        conn = self.src if which == "source" else self.dst
        if conn is not None and (which not in self._suspect or not conn.is_dead()):
            self._suspect.discard(which)
            return conn
        self._suspect.discard(which)
        if conn is not None:
            self._fail_inflight(conn)
            conn.close()
            if which == "source":
                self.src = None
            else:
                self.dst = None
            self.stats.reconnects += 1
        uri = self.cfg.source_uri if which == "source" else self.cfg.target_uri
        conn = NbdConnection(uri, name=f"{which} {uri}", write=(which == "target"))
        if which == "source":
            self.src = conn
        else:
            self.dst = conn
        return conn

    def _fail_inflight(self, conn: NbdConnection) -> None:
        for op in [op for op in self._inflight if op.conn is conn]:
            self._inflight.discard(op)
            op.inflight = False
            self._events.append((op, errno.ENOTCONN))

    def close(self) -> None:
        for c in (self.src, self.dst, *self.extra_conns):
            if c is not None:
                c.close()

    # ------------------------------------------------------------------ issue
    def _issue(self, op: _Op) -> None:
        """Send one command; a synchronous failure becomes a completion error."""
        cfg = self.cfg
        issued = False
        try:
            if op.kind == _READ:
                conn = self._connect("source")
            else:
                conn = self._connect("target")
            events = self._events

            def done(err: int, op=op) -> None:
                if op.inflight:
                    op.inflight = False
                    self._inflight.discard(op)
                    events.append((op, err))

            op.conn = conn
            op.inflight = True
            self._inflight.add(op)
            issued = True
            if op.kind == _READ:
                conn.aio_pread(op.buf, op.offset, done, length=op.length, at=op.at)
                self.stats.reads += 1
            elif op.kind == _WRITE:
                conn.aio_pwrite(op.buf, op.offset, done, length=op.length, at=op.at)
                self.stats.writes += 1
            else:  # zero
                if not conn.can_zero:
                    self._inflight.discard(op)
                    op.inflight = False
                    self._zero_by_writing(op)
                    return
                op.fast = cfg.fast_zero and conn.can_fast_zero and self._fast_zero_ok
                conn.aio_zero(op.length, op.offset, done, may_trim=cfg.punch_holes, fast=op.fast)
                self.stats.zeroes += 1
        except NbdError as exc:
            if issued and not op.inflight:
                return  # its completion was already reported (the connection died under it)
            op.inflight = False
            self._inflight.discard(op)
            err = exc.errno or errno.EIO
            conn = op.conn
            if conn is not None and conn.is_dead():
                err = errno.ENOTCONN  # libnbd says EINVAL ("invalid state") for a closed handle
            self._failed(op, err, str(exc))

    def _zeroes(self) -> IoBuffer:
        if self._zero_buf is None:
            self._zero_buf = IoBuffer(self.cfg.request_size)
        return self._zero_buf

    def _zero_by_writing(self, op: _Op) -> None:
        """Target without WRITE_ZEROES: write a zero buffer instead, piece by piece."""
        pieces = list(_split([(op.offset, op.length)], self.cfg.request_size))
        op.chunk.pending += len(pieces) - 1
        zbuf = self._zeroes()
        for off, n in pieces:
            self._issue(_Op(op.chunk, _WRITE, off, n, buf=zbuf, zero=True, detected=op.detected))

    # ------------------------------------------------------------- completion
    def _failed(self, op: _Op, err: int, detail: str | None = None) -> None:
        op.failures += 1
        self._suspect.add("source" if op.kind == _READ else "target")
        permanent = err in PERMANENT_ERRNOS
        if permanent or op.failures >= self.cfg.retry.tries:
            what = detail or strerror(err)
            side = "source" if op.kind == _READ else "target"
            tries = "" if permanent else f" after {op.failures} attempts"
            raise CopyError(
                f"{op.kind} of {op.length} bytes at offset {op.offset} on the {side} failed{tries}: {what}",
                offset=op.offset, length=op.length, operation=op.kind, errno=err)
        delay = self.cfg.retry.delay(op.failures)
        log.warning("%s of %d bytes at offset %d failed (%s); retry %d/%d in %.1fs", op.kind, op.length,
                    op.offset, detail or strerror(err), op.failures, self.cfg.retry.tries - 1, delay)
        self.stats.retries += 1
        heapq.heappush(self._delayed, (time.monotonic() + delay, next(self._seq), op))

    def _completed(self, op: _Op, err: int) -> None:
        if err:
            if op.kind == _ZERO and op.fast and err in (errno.ENOTSUP, errno.EOPNOTSUPP):
                self._fast_zero_ok = False  # server cannot zero fast: plain zero from now on
                op.fast = False
                self._issue(op)
                return
            self._failed(op, err)
            return
        chunk = op.chunk
        st = self.stats
        if op.kind == _READ:
            st.bytes_read += op.length
            ops = self._write_ops(chunk)
            chunk.pending = len(ops)
            if not any(w.kind == _WRITE for w in ops):
                self._release(chunk)  # all zero: the buffer is free at once
            for w in ops:
                self._issue(w)
            return
        if op.zero:
            st.bytes_zeroed += op.length
            if op.detected:
                st.zero_detected += op.length
        else:
            st.bytes_copied += op.length
        chunk.pending -= 1
        if chunk.pending == 0:
            self._release(chunk)
            self._open -= 1

    def _release(self, chunk: _Chunk) -> None:
        if chunk.buf is not None:
            self._buffers.append(chunk.buf)
            chunk.buf = None
            self._open_bytes -= chunk.length

    def _write_ops(self, chunk: _Chunk) -> list[_Op]:
        buf, n, off = chunk.buf, chunk.length, chunk.offset
        cfg = self.cfg
        if not cfg.detect_zeroes:
            return [_Op(chunk, _WRITE, off, n, buf=buf)]
        if buf.is_zero(0, n):
            return [_Op(chunk, _ZERO, off, n, zero=True, detected=True)]
        g = cfg.zero_granularity
        if not g or n <= g:
            return [_Op(chunk, _WRITE, off, n, buf=buf)]
        # Split off runs of all-zero granules (offsets relative to the chunk).
        ops: list[_Op] = []
        run_start, run_zero = 0, None
        pos = 0
        while pos < n:
            m = min(g, n - pos)
            z = buf.is_zero(pos, m)
            if run_zero is None:
                run_zero = z
            elif z != run_zero:
                ops.append(self._piece(chunk, run_zero, run_start, pos - run_start))
                run_start, run_zero = pos, z
            pos += m
        ops.append(self._piece(chunk, bool(run_zero), run_start, n - run_start))
        return ops

    @staticmethod
    def _piece(chunk: _Chunk, zero: bool, at: int, n: int) -> _Op:
        if zero:
            return _Op(chunk, _ZERO, chunk.offset + at, n, zero=True, detected=True)
        return _Op(chunk, _WRITE, chunk.offset + at, n, buf=chunk.buf, at=at)

    # ------------------------------------------------------------------- loop
    def run(self) -> None:
        try:
            self._loop()
            self.ok = True
        except BaseException as exc:  # noqa: BLE001 - handed to the supervisor
            self.shared.fail(exc)

    def _loop(self) -> None:
        cfg, shared = self.cfg, self.shared
        depth = cfg.queue_depth
        budget = cfg.max_in_flight
        pending_item = None
        events = self._events
        delayed = self._delayed
        timeout_ms = max(1, int(cfg.poll_interval * 1000))
        POLLIN, POLLOUT = select.POLLIN, select.POLLOUT
        POLLERR = select.POLLERR | select.POLLHUP | select.POLLNVAL
        poller = select.poll()
        registered: dict[int, tuple[NbdConnection, int]] = {}  # fd -> (connection, mask)

        while True:
            if shared.stop.is_set() or shared.cancelled():
                return
            # 1. completions (a chunk is finished when its last command completes)
            while events:
                op, err = events.popleft()
                self._completed(op, err)
            # 2. retries that are due
            if delayed:
                now = time.monotonic()
                while delayed and delayed[0][0] <= now:
                    _, _, op = heapq.heappop(delayed)
                    self._issue(op)
            # 3. new work: at most queue_depth chunks and max_in_flight data bytes open
            while self._open < depth:
                item = pending_item or shared.next_work()
                pending_item = None
                if item is None:
                    break
                is_zero, off, n = item
                if not is_zero and self._open_bytes + n > budget and self._open_bytes:
                    pending_item = item  # wait for buffer space
                    break
                chunk = _Chunk(off, n)
                chunk.pending = 1
                self._open += 1
                if is_zero:
                    self._issue(_Op(chunk, _ZERO, off, n, zero=True))
                else:
                    self._open_bytes += n
                    # LIFO reuse keeps the touched memory near max_in_flight even
                    # though up to queue_depth buffers may exist.
                    chunk.buf = self._buffers.pop() if self._buffers else IoBuffer(cfg.request_size)
                    self._issue(_Op(chunk, _READ, off, n, buf=chunk.buf))
            if events:
                continue
            if not self._open and pending_item is None and shared.exhausted and not delayed:
                return
            if self._open and not self._inflight and not delayed:
                raise RuntimeError(f"data mover stalled with {self._open} unfinished chunks")
            # 4. wait for the sockets (registrations change only when a direction does)
            live: set[int] = set()
            for conn in (self.src, self.dst):
                if conn is None or conn.closed:
                    continue
                try:
                    d = conn.wants()
                    fd = conn.fileno()
                except NbdError:
                    continue
                mask = (POLLIN if d & DIR_READ else 0) | (POLLOUT if d & DIR_WRITE else 0)
                if not mask:
                    continue
                live.add(fd)
                old = registered.get(fd)
                if old is None or old[1] != mask or old[0] is not conn:
                    poller.register(fd, mask)  # (re-)registering modifies
                    registered[fd] = (conn, mask)
            for fd in [fd for fd in registered if fd not in live]:
                del registered[fd]
                try:
                    poller.unregister(fd)
                except KeyError:  # pragma: no cover
                    pass
            wait = timeout_ms
            if delayed:
                wait = max(0, min(wait, int((delayed[0][0] - time.monotonic()) * 1000) + 1))
            if not registered:
                time.sleep(wait / 1000)
                continue
            for fd, rev in poller.poll(wait):
                entry = registered.get(fd)
                if entry is None:
                    continue
                conn = entry[0]
                try:
                    if rev & (POLLIN | POLLERR):
                        conn.notify_read()
                    elif rev & POLLOUT:
                        conn.notify_write()
                except NbdError:
                    self._fail_inflight(conn)


def _open_pair(cfg: _Settings, cancel: threading.Event | None) -> tuple[NbdConnection, NbdConnection]:
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
            if failures >= cfg.retry.tries or exc.errno in PERMANENT_ERRNOS:
                raise CopyError(str(exc), errno=exc.errno) from None
            delay = cfg.retry.delay(failures)
            log.warning("%s; retry %d/%d in %.1fs", exc, failures, cfg.retry.tries - 1, delay)
            if cancel is not None:
                if cancel.wait(delay):
                    raise CopyCancelled() from None
            else:
                time.sleep(delay)


def _flush(workers: Sequence[_Worker], cfg: _Settings, cancel: threading.Event | None) -> None:
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
                if failures >= retry.tries or exc.errno in PERMANENT_ERRNOS or (not multi and conn.is_dead()):
                    raise CopyError(f"flush of the target failed: {exc}", operation=_FLUSH,
                                    errno=exc.errno) from None
                if cancel is not None and cancel.wait(retry.delay(failures)):
                    raise CopyCancelled("copy cancelled during flush") from None
                if cancel is None:
                    time.sleep(retry.delay(failures))


def _flush_one(conn: NbdConnection, cfg: _Settings, cancel: threading.Event | None) -> None:
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
) -> CopyResult:
    """Copy ``data_extents`` from ``source_uri`` to ``target_uri`` and zero ``zero_extents``
    on the target. Extents are ``(offset, length)`` pairs; overlaps are merged.

    * ``on_progress(CopyProgress)``: called from this thread at most every
      ``progress_interval`` s while copying, and once at the end (100 %).
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

    Raises :class:`CopyError` (I/O failure after retries, target too small, ...) or
    :class:`CopyCancelled`; both carry ``progress``. Returns :class:`CopyResult`.
    """
    if request_size <= 0 or request_size > MAX_REQUEST:
        raise ValueError(f"request_size must be in (0, {MAX_REQUEST}]")
    if not 0 < zero_request_size <= MAX_ZERO_REQUEST:
        raise ValueError(f"zero_request_size must be in (0, {MAX_ZERO_REQUEST}]")
    if connections is None:
        connections = default_connections()
    if connections < 1 or queue_depth < 1:
        raise ValueError("connections and queue_depth must be >= 1")
    max_in_flight = max(max_in_flight, request_size)
    data = normalize_extents(data_extents)
    zero = normalize_extents(zero_extents)
    total = extents_total(data) + extents_total(zero)
    cfg = _Settings(source_uri, target_uri, request_size, zero_request_size, queue_depth, max_in_flight,
                    detect_zeroes, zero_granularity, punch_holes, fast_zero, retry, poll_interval)
    started = time.monotonic()
    result = CopyResult(bytes_total=total)

    def progress() -> CopyProgress:
        return CopyProgress(sum(w.stats.bytes_copied for w in workers),
                            sum(w.stats.bytes_zeroed for w in workers), total, time.monotonic() - started)

    workers: list[_Worker] = []
    if cancel_event is not None and cancel_event.is_set():
        raise CopyCancelled(progress=progress())
    try:
        src, dst = _open_pair(cfg, cancel_event)
    except (CopyError, CopyCancelled) as exc:
        exc.progress = progress()
        raise
    try:
        _check_sizes(src, dst, data, zero)
    except BaseException:
        src.close()
        dst.close()
        raise
    shared = _Shared(_work(data, zero, request_size, zero_request_size), cancel_event)
    workers = [_Worker(i, shared, cfg, *((src, dst) if i == 0 else (None, None)))
               for i in range(connections if total else 1)]
    try:
        for w in workers:
            w.start()
        last = started
        while True:
            alive = [w for w in workers if w.is_alive()]
            if not alive:
                break
            alive[0].join(max(0.01, min(progress_interval, poll_interval)))
            if cancel_event is not None and cancel_event.is_set():
                shared.stop.set()
            now = time.monotonic()
            if on_progress is not None and now - last >= progress_interval and not shared.stop.is_set():
                last = now
                on_progress(progress())
        if shared.error is not None:
            raise shared.error
        if cancel_event is not None and cancel_event.is_set():
            raise CopyCancelled(progress=progress())
        if flush and total:
            _flush(workers, cfg, cancel_event)
            result.flushed = True
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
        s = w.stats
        for name in ("bytes_copied", "bytes_zeroed", "bytes_read", "zero_detected", "reads", "writes",
                     "zeroes", "retries", "reconnects"):
            setattr(result, name, getattr(result, name) + getattr(s, name))
    result.connections = len(workers)
    result.elapsed = time.monotonic() - started
    if on_progress is not None:
        on_progress(CopyProgress(result.bytes_copied, result.bytes_zeroed, total, result.elapsed))
    return result


def _check_sizes(src: NbdConnection, dst: NbdConnection, data: Sequence[Extent],
                 zero: Sequence[Extent]) -> None:
    data_end = data[-1][0] + data[-1][1] if data else 0
    end = max(data_end, zero[-1][0] + zero[-1][1] if zero else 0)
    if data_end > src.size:
        raise CopyError(f"data extent ends at offset {data_end}, beyond the source size {src.size}",
                        offset=src.size, operation=_READ)
    if end > dst.size:
        raise CopyError(f"target export is too small: {dst.size} bytes, the copy needs {end} "
                        f"(source size {src.size})", offset=dst.size, operation=_WRITE)
