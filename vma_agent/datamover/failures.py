"""How the copy engine fails and retries: which NBD errors are worth another attempt, the
back-off between attempts, and the two exceptions a copy ends with."""
from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vma_agent.datamover.progress import CopyProgress

#: Errors that another attempt cannot fix.
PERMANENT_ERRNOS = frozenset({errno.EINVAL, errno.EROFS, errno.EPERM, errno.EACCES, errno.ENOSPC,
                              errno.EFBIG, errno.EOVERFLOW, errno.ENOTSUP, errno.EDQUOT})


def is_permanent(err: int | None) -> bool:
    """True for an errno another attempt cannot fix (read-only or full target, bad request, ...)."""
    return err in PERMANENT_ERRNOS


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

    def gives_up(self, err: int | None, failures: int) -> bool:
        """After ``failures`` failed attempts, the last with ``err``: stop (True) or retry."""
        return is_permanent(err) or failures >= self.tries


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
