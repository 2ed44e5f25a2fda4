"""The copy loop: one worker thread per source + target connection pair.

Each :class:`Worker` drives libnbd's asynchronous API with completion callbacks and one
``select.poll`` over both sockets, keeps at most ``queue_depth`` chunks and ``max_in_flight``
bytes open, retries failed commands under the :class:`~.failures.RetryPolicy` (re-opening a
connection that died) and counts what it did in its own :class:`~.progress.CopyResult`. Workers
share one :class:`WorkQueue` of request-sized pieces (:func:`~.extents.work_order`); the first
failure stops them all and is raised by :func:`~.copier.copy_disk`.
"""
from __future__ import annotations

import errno
import heapq
import itertools
import logging
import select
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from vma_agent.datamover.extents import split_at_multiples, zero_runs
from vma_agent.datamover.failures import CopyError, RetryPolicy, is_permanent
from vma_agent.datamover.progress import CopyResult
from vma_agent.integrations.nbd_client import DIR_READ, DIR_WRITE, IoBuffer, NbdConnection, NbdError, strerror

log = logging.getLogger(__name__)

#: NBD command kinds (also the operation named by CopyError)
READ, WRITE, ZERO, FLUSH = "read", "write", "write-zeroes", "flush"


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


class WorkQueue:
    """State shared by the workers and the supervising thread.

    It also knows the *completed prefix* of the copy: pieces are handed out in disk order, so
    every planned byte below the lowest piece still open (or below the end of the last piece
    handed out, when none is open) has been written and acknowledged by the target. A flush of
    every target connection after that moment makes the prefix durable: a checkpoint.
    """

    def __init__(self, work: Iterator[tuple[bool, int, int]], cancel: threading.Event | None,
                 start: int = 0):
        self.work_order = work
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.cancel = cancel
        self.error: BaseException | None = None
        self.exhausted = False
        self._open: set[int] = set()      # offsets of pieces handed out and not finished
        self._open_heap: list[int] = []   # the same, lazily pruned, for the lowest one
        self._handed_end = start          # end of the last piece handed out
        self.durable = start              # the last checkpoint (set by the supervisor)
        self.window_blocked = False       # a worker waits for the next checkpoint (hurry it)
        self.wake = threading.Event()     # wakes the supervisor: a worker waits, flushed or ended
        # Checkpoint flushes: the supervisor raises flush_generation, each worker flushes its
        # target connection and records the generation it flushed (or failed to flush).
        self.flush_generation = 0

    def next_work(self) -> tuple[bool, int, int] | None:
        if self.exhausted:
            return None
        with self._lock:
            item = next(self.work_order, None)
            if item is None:
                self.exhausted = True
            else:
                _, off, n = item
                self._open.add(off)
                heapq.heappush(self._open_heap, off)
                self._handed_end = max(self._handed_end, off + n)
            return item

    def finished(self, offset: int) -> None:
        """The piece starting at ``offset`` is written (every command of it acknowledged)."""
        with self._lock:
            self._open.discard(offset)

    def completed_prefix(self) -> int:
        """Offset below which every planned piece is acknowledged by the target."""
        with self._lock:
            heap = self._open_heap
            while heap and heap[0] not in self._open:
                heapq.heappop(heap)
            return heap[0] if heap else self._handed_end

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.stop.set()

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


@dataclass
class CopySettings:
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
    # Writes acknowledged on a target connection that died but not flushed may be lost (the
    # server may have held them in its own cache). When set, losing a target connection fails
    # the attempt so the copy rewinds to its last checkpoint instead of trusting those writes.
    rewind_on_target_loss: bool = False
    # How far (in disk offsets) the copy may write beyond the last checkpoint: bounds what lies
    # written-but-not-yet-durable (zero pieces are written at memory speed and would otherwise
    # run far ahead of the flushes), so a resume rewrites at most this much beyond the uncopied
    # part. Checkpoints are taken every half of it, so the copy goes on during a flush. 0 = unbounded.
    max_ahead: int = 0


class Worker(threading.Thread):
    """One source + one target connection driven by one event loop."""

    def __init__(self, index: int, shared: WorkQueue, cfg: CopySettings,
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
        # Sides whose server answered ESHUTDOWN: an nbdkit whose OMA died (--exit-with-parent) answers every
        # command so and keeps the connection (and its port) until the client closes it; the connection is
        # lost although libnbd does not call it dead, and closing it lets a new export take the same port.
        self._shut_down: set[str] = set()
        self._open = 0                     # chunks taken and not finished
        self._open_bytes = 0               # bytes of those holding a buffer
        self.extra_conns: list[NbdConnection] = []
        self.ok = False
        # checkpoint flushes (see WorkQueue): the last generation flushed / failed to flush
        self.flushed_generation = 0
        self.flush_failed_generation = 0
        self._flush_sent = 0

    # ------------------------------------------------------------ connections
    def _connect(self, which: str) -> NbdConnection:
        conn = self.src if which == "source" else self.dst
        if conn is not None and (which not in self._suspect or not (conn.is_dead() or which in self._shut_down)):
            self._suspect.discard(which)
            return conn
        self._suspect.discard(which)
        self._shut_down.discard(which)
        if conn is not None:
            if which == "target" and self.cfg.rewind_on_target_loss:
                raise CopyError(f"{conn.name}: connection lost; what was written since the last checkpoint "
                                "is written again", errno=errno.ENOTCONN)
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
            if op.kind == READ:
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
            if op.kind == READ:
                conn.aio_pread(op.buf, op.offset, done, length=op.length, at=op.at)
                self.stats.reads += 1
            elif op.kind == WRITE:
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
        pieces = list(split_at_multiples([(op.offset, op.length)], self.cfg.request_size))
        op.chunk.pending += len(pieces) - 1
        zbuf = self._zeroes()
        for off, n in pieces:
            self._issue(_Op(op.chunk, WRITE, off, n, buf=zbuf, zero=True, detected=op.detected))

    # ------------------------------------------------------------- completion
    def _failed(self, op: _Op, err: int, detail: str | None = None) -> None:
        op.failures += 1
        self._suspect.add("source" if op.kind == READ else "target")
        if err == errno.ESHUTDOWN:
            self._shut_down.add("source" if op.kind == READ else "target")
        if self.cfg.retry.gives_up(err, op.failures):
            permanent = is_permanent(err)
            what = detail or strerror(err)
            side = "source" if op.kind == READ else "target"
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
            if op.kind == ZERO and op.fast and err in (errno.ENOTSUP, errno.EOPNOTSUPP):
                self._fast_zero_ok = False  # server cannot zero fast: plain zero from now on
                op.fast = False
                self._issue(op)
                return
            self._failed(op, err)
            return
        chunk = op.chunk
        st = self.stats
        if op.kind == READ:
            st.bytes_read += op.length
            ops = self._write_ops(chunk)
            chunk.pending = len(ops)
            if not any(w.kind == WRITE for w in ops):
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
            self.shared.finished(chunk.offset)

    def _checkpoint_flush(self, generation: int) -> None:
        """Flush this worker's target connection for checkpoint ``generation`` (asynchronously:
        the completion records the outcome, the loop goes on copying meanwhile)."""
        dst = self.dst
        if dst is not None and dst.is_dead():
            self._suspect.add("target")
            dst = self._connect("target")  # (or rewinds the copy to its last checkpoint)
        if dst is None or not dst.can_flush:
            self.flushed_generation = generation  # nothing written here / nothing to flush
            return

        def done(err: int, generation=generation) -> None:
            if err:
                self.flush_failed_generation = max(self.flush_failed_generation, generation)
            else:
                self.flushed_generation = max(self.flushed_generation, generation)
            self.shared.wake.set()

        try:
            dst.aio_flush(done)
        except NbdError:
            self.flush_failed_generation = generation

    def _release(self, chunk: _Chunk) -> None:
        if chunk.buf is not None:
            self._buffers.append(chunk.buf)
            chunk.buf = None
            self._open_bytes -= chunk.length

    def _write_ops(self, chunk: _Chunk) -> list[_Op]:
        buf, n, off = chunk.buf, chunk.length, chunk.offset
        cfg = self.cfg
        if not cfg.detect_zeroes:
            return [_Op(chunk, WRITE, off, n, buf=buf)]
        if buf.is_zero(0, n):
            return [_Op(chunk, ZERO, off, n, zero=True, detected=True)]
        g = cfg.zero_granularity
        if not g or n <= g:
            return [_Op(chunk, WRITE, off, n, buf=buf)]
        # split off runs of all-zero granules (offsets relative to the chunk)
        return [self._piece(chunk, zero, at, m) for zero, at, m in zero_runs(n, g, buf.is_zero)]

    @staticmethod
    def _piece(chunk: _Chunk, zero: bool, at: int, n: int) -> _Op:
        if zero:
            return _Op(chunk, ZERO, chunk.offset + at, n, zero=True, detected=True)
        return _Op(chunk, WRITE, chunk.offset + at, n, buf=chunk.buf, at=at)

    # ------------------------------------------------------------------- loop
    def run(self) -> None:
        try:
            self._loop()
            self.ok = True
        except BaseException as exc:  # noqa: BLE001 - handed to the supervisor
            self.shared.fail(exc)
        finally:
            self.shared.wake.set()

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
            if shared.flush_generation > self._flush_sent:
                self._flush_sent = shared.flush_generation
                self._checkpoint_flush(self._flush_sent)
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
            window_blocked = False
            while self._open < depth:
                item = pending_item or shared.next_work()
                pending_item = None
                if item is None:
                    break
                is_zero, off, n = item
                if not is_zero and self._open_bytes + n > budget and self._open_bytes:
                    pending_item = item  # wait for buffer space
                    break
                if cfg.max_ahead and off > shared.durable and off + n - shared.durable > cfg.max_ahead:
                    pending_item = item  # wait for the next checkpoint
                    window_blocked = shared.window_blocked = True
                    shared.wake.set()
                    break
                chunk = _Chunk(off, n)
                chunk.pending = 1
                self._open += 1
                if is_zero:
                    self._issue(_Op(chunk, ZERO, off, n, zero=True))
                else:
                    self._open_bytes += n
                    # LIFO reuse keeps the touched memory near max_in_flight even
                    # though up to queue_depth buffers may exist.
                    chunk.buf = self._buffers.pop() if self._buffers else IoBuffer(cfg.request_size)
                    self._issue(_Op(chunk, READ, off, n, buf=chunk.buf))
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
            wait = 2 if window_blocked else timeout_ms  # a checkpoint is published within milliseconds
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
