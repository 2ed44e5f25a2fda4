"""NBD client: the only module in the project that imports libnbd (``nbd``).

It wraps what the data mover needs behind a small surface:

* :class:`NbdConnection` — one connection to an NBD URI (``nbd://host:port/export``,
  ``nbd+unix:///export?socket=/path``; TLS ``nbds://`` as far as libnbd was built with
  it), with a connect timeout: size and capabilities, synchronous and
  asynchronous pread/pwrite/zero/flush, block status, and the low-level event-loop
  hooks (``fileno``/``wants``/``notify_read``/``notify_write``) that let one thread
  drive several connections with a single ``select.poll``.
* :class:`IoBuffer` — a reusable I/O buffer (anonymous mmap seen through libnbd's
  ``nbd.Buffer``) that stays valid while an asynchronous command is in flight; commands
  may use a sub-range without copying; ``is_zero`` runs in C.
* :class:`NbdError` — every libnbd failure, with ``errno`` (an int or ``None``).

Completion callbacks receive one argument, ``error`` (0 on success, else an errno
value) and are invoked from inside ``poll``/``notify_*`` on the thread driving the
connection; they must not call back into the same connection (queue the follow-up
work and issue it after ``notify_*`` returns).
"""
from __future__ import annotations

import errno as _errno
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import nbd

# URI builders live with the nbdkit helper (importable without libnbd, e.g. on the OMA).
from vma_agent.integrations.nbdkit import tcp_uri, unix_uri

__all__ = [
    "DIR_READ",
    "DIR_WRITE",
    "Extent",
    "IoBuffer",
    "NbdConnection",
    "NbdError",
    "libnbd_version",
    "strerror",
    "tcp_uri",
    "unix_uri",
]

#: Bits returned by :meth:`NbdConnection.wants`.
DIR_READ: int = nbd.AIO_DIRECTION_READ
DIR_WRITE: int = nbd.AIO_DIRECTION_WRITE

#: The NBD protocol limits one request to 32-bit lengths; keep well below.
MAX_REQUEST = 32 * 1024 * 1024
#: Write-zeroes requests may be much larger (no payload); stay below 2**32.
MAX_ZERO_REQUEST = 1024 * 1024 * 1024

Completion = Callable[[int], None]


class NbdError(OSError):
    """A libnbd call failed, or an asynchronous command completed with an error."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(errno or 0, message)
        self.errno = errno  # type: ignore[assignment]
        self.message = message

    def __str__(self) -> str:  # OSError's default adds "[Errno 0]" noise
        return self.message


def _wrap(exc: nbd.Error, what: str) -> NbdError:
    msg = exc.string or str(exc)
    num = getattr(exc, "errnum", None)  # nbd.Error.errno is the *name* ("EIO"); errnum the number
    return NbdError(f"{what}: {msg}", num if isinstance(num, int) and num > 0 else None)


def libnbd_version() -> str:
    return nbd.NBD().get_version()


@dataclass(frozen=True, slots=True)
class Extent:
    """One block-status extent: ``hole`` = unallocated, ``zero`` = reads as zeroes."""

    offset: int
    length: int
    hole: bool
    zero: bool

    @property
    def end(self) -> int:
        return self.offset + self.length


class IoBuffer:
    """A fixed-size, reusable I/O buffer for the asynchronous calls.

    It must stay alive (and unmodified, for writes) until the command completes.
    Commands may use a sub-range (``at``/``length``) without copying.
    """

    __slots__ = ("_mem", "_mv", "_whole", "size")

    def __init__(self, size: int):
        # Anonymous mmap, not bytearray: bytearray(n) memsets all n bytes at once (and a
        # first touch of fresh memory is slow in VMs); mmap pages are faulted in only
        # when a request actually uses them, so a deep queue of big buffers costs
        # nothing for small requests.
        self._mem = mmap.mmap(-1, max(size, 1))
        self._mv = memoryview(self._mem)[:size]
        self._whole = nbd.Buffer.from_buffer(self._mv)
        self.size = size

    def _part(self, at: int, length: int | None) -> nbd.Buffer:
        if length is None:
            length = self.size - at
        if at == 0 and length == self.size:
            return self._whole
        if at < 0 or length < 0 or at + length > self.size:
            raise ValueError(f"buffer range [{at}, {at + length}) outside [0, {self.size})")
        return nbd.Buffer.from_buffer(self._mv[at:at + length])

    def is_zero(self, at: int = 0, length: int = -1) -> bool:
        """True if ``[at, at+length)`` (``-1``: to the end) holds only zero bytes (C speed)."""
        return self._whole.is_zero(at, length)

    def view(self) -> memoryview:
        """A shared, writable view of the contents (no copy)."""
        return self._mv

    def __len__(self) -> int:
        return self.size


class NbdConnection:
    """One connection to an NBD export.

    Not thread-safe by design: drive each connection from one thread (libnbd itself
    serialises calls on a handle, so concurrent use would only add lock contention).
    """

    def __init__(self, uri: str, *, name: str | None = None, write: bool = False,
                 structured_replies: bool = True, connect_timeout: float | None = 60.0):
        self.uri = uri
        self.name = name or uri
        self._fd: int | None = None
        self._h = nbd.NBD()
        # libnbd would otherwise memset every read buffer before the read; ours are
        # fully overwritten on success and re-read on failure.
        try:
            self._h.set_pread_initialize(False)
        except (AttributeError, nbd.Error):  # pragma: no cover - older libnbd
            pass
        try:
            self._h.set_request_structured_replies(structured_replies)
            if structured_replies:
                self._h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            self._connect(uri, connect_timeout)
        except nbd.Error as exc:
            self._h = None
            raise _wrap(exc, f"cannot connect to {self.name}") from None
        except NbdError:
            self._h = None
            raise
        try:
            self.size: int = self._h.get_size()
            self.read_only: bool = bool(self._h.is_read_only())
            self.can_zero: bool = bool(self._h.can_zero())
            self.can_fast_zero: bool = bool(self._h.can_fast_zero())
            self.can_flush: bool = bool(self._h.can_flush())
            self.can_fua: bool = bool(self._h.can_fua())
            self.can_trim: bool = bool(self._h.can_trim())
            self.can_multi_conn: bool = bool(self._h.can_multi_conn())
            try:
                self.can_block_status: bool = bool(self._h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
            except nbd.Error:
                self.can_block_status = False
            self.preferred_block_size: int = max(0, self._h.get_block_size(nbd.SIZE_PREFERRED))
            self.max_block_size: int = max(0, self._h.get_block_size(nbd.SIZE_MAXIMUM))
        except nbd.Error as exc:
            self.close()
            raise _wrap(exc, f"cannot query {self.name}") from None
        if write and self.read_only:
            self.close()
            raise NbdError(f"{self.name} is read-only", _errno.EROFS)

    def _connect(self, uri: str, timeout: float | None) -> None:
        h = self._h
        if "tls-psk-file=" in uri:
            # libnbd reads a local file named in a URI only when allowed; the agent composes such URIs
            # itself (the OMA's are refused when they name one: vma_agent.replication).
            h.set_uri_allow_local_file(True)
        if timeout is None:
            h.connect_uri(uri)
            return
        deadline = time.monotonic() + timeout
        h.aio_connect_uri(uri)
        while h.aio_is_connecting():
            left = deadline - time.monotonic()
            if left <= 0:
                raise NbdError(f"cannot connect to {self.name}: timed out after {timeout:g} s",
                               _errno.ETIMEDOUT)
            h.poll(max(1, min(int(left * 1000), 1000)))
        if not h.aio_is_ready():
            raise NbdError(f"cannot connect to {self.name}: connection closed during negotiation",
                           _errno.ECONNRESET)

    # ---------------------------------------------------------------- state
    @property
    def closed(self) -> bool:
        return self._h is None

    def is_dead(self) -> bool:
        """True if the connection failed (server gone, protocol error) or was closed."""
        h = self._h
        if h is None:
            return True
        try:
            return bool(h.aio_is_dead() or h.aio_is_closed())
        except nbd.Error:
            return True

    def close(self) -> None:
        """Close the connection; in-flight commands are abandoned. Never blocks (a
        synchronous NBD_CMD_DISC could hang on a dead peer). Idempotent."""
        h, self._h = self._h, None
        if h is None:
            return
        try:
            if h.aio_is_ready() and not h.aio_in_flight():
                h.aio_disconnect()  # polite, queued without waiting for the server
        except nbd.Error:
            pass
        del h  # libnbd closes the socket when the last reference goes

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _handle(self) -> nbd.NBD:
        if self._h is None:
            raise NbdError(f"{self.name}: connection is closed", _errno.ENOTCONN)
        return self._h

    # ------------------------------------------------------------- sync I/O
    def pread(self, length: int, offset: int) -> bytes:
        try:
            return self._handle().pread(length, offset)
        except nbd.Error as exc:
            raise _wrap(exc, f"{self.name}: read {length} bytes at offset {offset}") from None

    def pwrite(self, data: bytes, offset: int, *, fua: bool = False) -> None:
        try:
            self._handle().pwrite(data, offset, nbd.CMD_FLAG_FUA if fua else 0)
        except nbd.Error as exc:
            raise _wrap(exc, f"{self.name}: write {len(data)} bytes at offset {offset}") from None

    def zero(self, length: int, offset: int, *, may_trim: bool = True) -> None:
        try:
            self._handle().zero(length, offset, 0 if may_trim else nbd.CMD_FLAG_NO_HOLE)
        except nbd.Error as exc:
            raise _wrap(exc, f"{self.name}: zero {length} bytes at offset {offset}") from None

    def flush(self) -> None:
        if not self.can_flush:
            return
        try:
            self._handle().flush()
        except nbd.Error as exc:
            raise _wrap(exc, f"{self.name}: flush") from None

    def block_status(self, length: int, offset: int) -> list[Extent]:
        """Allocation extents (``base:allocation``) for ``[offset, offset+length)``.

        The server may answer for less than ``length``; callers loop. A server
        without block status yields one data extent covering the request.
        """
        if not self.can_block_status:
            return [Extent(offset, length, False, False)]
        out: list[Extent] = []

        def cb(metacontext, off, entries, err):
            if metacontext != nbd.CONTEXT_BASE_ALLOCATION:
                return 0
            pos = off
            for i in range(0, len(entries) - 1, 2):
                n, flags = entries[i], entries[i + 1]
                out.append(Extent(pos, n, bool(flags & nbd.STATE_HOLE), bool(flags & nbd.STATE_ZERO)))
                pos += n
            return 0

        try:
            self._handle().block_status(length, offset, cb)
        except nbd.Error as exc:
            raise _wrap(exc, f"{self.name}: block status at offset {offset}") from None
        end = offset + length
        return [e if e.end <= end else Extent(e.offset, end - e.offset, e.hole, e.zero)
                for e in out if e.offset < end]

    # ------------------------------------------------------------ async I/O
    @staticmethod
    def _completion(cb: Completion):
        def done(err) -> int:
            cb(err.value)
            return 1  # auto-retire: no aio_command_completed needed
        return done

    def aio_pread(self, buf: IoBuffer, offset: int, cb: Completion, *,
                  length: int | None = None, at: int = 0) -> None:
        """Read ``length`` bytes (default: the rest of ``buf`` from ``at``) at ``offset``
        into ``buf[at:]``; ``cb(error)`` on completion."""
        part = buf._part(at, length)
        try:
            self._handle().aio_pread(part, offset, self._completion(cb))
        except nbd.Error as exc:
            raise _wrap(exc, f"{self.name}: read {len(part)} bytes at offset {offset}") from None

    def aio_pwrite(self, buf: IoBuffer, offset: int, cb: Completion, *,
                   length: int | None = None, at: int = 0, fua: bool = False) -> None:
        """Write ``buf[at:at+length]`` (default: the rest of ``buf``) at ``offset``."""
        part = buf._part(at, length)
        try:
            self._handle().aio_pwrite(part, offset, self._completion(cb),
                                      nbd.CMD_FLAG_FUA if fua else 0)
        except nbd.Error as exc:
            raise _wrap(exc, f"{self.name}: write {len(part)} bytes at offset {offset}") from None

    def aio_zero(self, length: int, offset: int, cb: Completion, *,
                 may_trim: bool = True, fast: bool = False) -> None:
        """NBD WRITE_ZEROES. ``may_trim`` lets the server punch holes (thin target);
        ``fast`` (only if :attr:`can_fast_zero`) asks the server to fail with
        ENOTSUP rather than fall back to writing zeroes."""
        flags = 0 if may_trim else nbd.CMD_FLAG_NO_HOLE
        if fast:
            flags |= nbd.CMD_FLAG_FAST_ZERO
        try:
            self._handle().aio_zero(length, offset, self._completion(cb), flags)
        except nbd.Error as exc:
            raise _wrap(exc, f"{self.name}: zero {length} bytes at offset {offset}") from None

    def aio_flush(self, cb: Completion) -> None:
        try:
            self._handle().aio_flush(self._completion(cb))
        except nbd.Error as exc:
            raise _wrap(exc, f"{self.name}: flush") from None

    def in_flight(self) -> int:
        h = self._h
        if h is None:
            return 0
        try:
            return h.aio_in_flight()
        except nbd.Error:
            return 0

    # ------------------------------------------------------ event-loop hooks
    def fileno(self) -> int:
        """The socket's file descriptor (constant for the life of the connection)."""
        if self._fd is None:
            try:
                self._fd = self._handle().aio_get_fd()
            except nbd.Error as exc:
                raise _wrap(exc, f"{self.name}: no socket") from None
        return self._fd

    def wants(self) -> int:
        """Bitmask of :data:`DIR_READ`/:data:`DIR_WRITE` the connection is waiting for."""
        return self._handle().aio_get_direction()

    def notify_read(self) -> None:
        """The socket is readable: advance the state machine (runs completions)."""
        try:
            self._handle().aio_notify_read()
        except nbd.Error as exc:
            raise _wrap(exc, f"{self.name}: connection failed") from None

    def notify_write(self) -> None:
        """The socket is writable: advance the state machine."""
        try:
            self._handle().aio_notify_write()
        except nbd.Error as exc:
            raise _wrap(exc, f"{self.name}: connection failed") from None

    def poll(self, timeout_ms: int) -> int:
        """Wait for and process events on this one connection (``-1`` = forever)."""
        try:
            return self._handle().poll(timeout_ms)
        except nbd.Error as exc:
            raise _wrap(exc, f"{self.name}: connection failed") from None


def strerror(err: int) -> str:
    """Readable text for a completion error code."""
    try:
        return f"{_errno.errorcode.get(err, str(err))}: {os.strerror(err)}"
    except ValueError:  # pragma: no cover
        return str(err)
