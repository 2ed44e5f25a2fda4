"""Progress accounting of a copy: what the caller sees while it runs (:class:`CopyProgress`) and at
the end (:class:`CopyResult`), summed over the worker threads' own counters."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class CopyProgress:
    """How far a running copy is (handed to ``on_progress``)."""

    bytes_copied: int
    bytes_zeroed: int
    bytes_total: int
    elapsed: float
    # Planned bytes below the offset the copy (or its current attempt) started at: already on
    # the target from an earlier run, not copied again.
    bytes_resumed: int = 0
    # Checkpoint: every planned byte below this offset is written AND flushed to the target.
    durable_offset: int = 0

    @property
    def bytes_done(self) -> int:
        return self.bytes_copied + self.bytes_zeroed + self.bytes_resumed

    @property
    def percent(self) -> float:
        return 100.0 if self.bytes_total <= 0 else min(100.0, 100.0 * self.bytes_done / self.bytes_total)

    @property
    def throughput_bps(self) -> float:
        return self.bytes_done / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class CopyResult:
    """Counters of a copy; each worker keeps its own, :meth:`add_counts` sums them."""

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
    resumed_from: int = 0          # offset the copy started at (0: from the beginning)
    bytes_resumed: int = 0         # planned bytes below resumed_from (not copied again)
    attempts: int = 0              # 1 + restarts from a checkpoint after a lost connection
    checkpoints: int = 0           # checkpoints taken (flushes of every target connection)

    @property
    def bytes_done(self) -> int:
        return self.bytes_copied + self.bytes_zeroed

    @property
    def throughput_bps(self) -> float:
        return self.bytes_done / self.elapsed if self.elapsed > 0 else 0.0

    def add_counts(self, other: CopyResult) -> None:
        """Add ``other``'s byte and command counters (not its totals, time or flags)."""
        for name in COUNTED_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


#: The counters each worker accumulates (the rest of CopyResult describes the whole copy).
COUNTED_FIELDS = ("bytes_copied", "bytes_zeroed", "bytes_read", "zero_detected", "reads", "writes",
                  "zeroes", "retries", "reconnects")


def progress_of(stats: Iterable[CopyResult], total: int, elapsed: float, *, resumed: int = 0,
                durable_offset: int = 0) -> CopyProgress:
    """The progress of a running copy from its workers' counters."""
    copied = zeroed = 0
    for s in stats:
        copied += s.bytes_copied
        zeroed += s.bytes_zeroed
    return CopyProgress(copied, zeroed, total, elapsed, resumed, durable_offset)
