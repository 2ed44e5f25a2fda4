"""Extent planning for the copy engine: pure functions, no I/O.

An extent is ``(offset, length)`` in bytes. A copy is planned as data extents (read from the
source, written to the target) and zero extents (written as NBD WRITE_ZEROES); the worker threads
take the plan as one stream of request-sized pieces in disk order (:func:`work_order`), and split
a chunk they read into zero and data runs (:func:`zero_runs`).
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence

MiB = 1024 * 1024
Extent = tuple[int, int]  # (offset, length)

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


def complement(extents: Sequence[Extent], size: int) -> list[Extent]:
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
    return data, complement(data, disk_size)


def plan_incremental_copy(changed: Iterable[Sequence[int]], disk_size: int, *,
                          merge_gap: int = 0) -> tuple[list[Extent], list[Extent]]:
    """``(data_extents, [])`` for an incremental copy of the changed areas."""
    return normalize_extents(changed, size=disk_size, merge_gap=merge_gap), []


def split_at_multiples(extents: Sequence[Extent], step: int) -> Iterator[tuple[int, int]]:
    """Cut extents at multiples of ``step`` (so requests stay aligned to it)."""
    for off, n in extents:
        end = off + n
        while off < end:
            nxt = min(end, (off // step + 1) * step)
            yield off, nxt - off
            off = nxt


def work_order(data: Sequence[Extent], zero: Sequence[Extent], request_size: int,
               zero_request_size: int) -> Iterator[tuple[bool, int, int]]:
    """``(is_zero, offset, length)`` pieces of both plans merged in disk order (lazily: the
    workers take them one by one)."""
    d = ((False, o, n) for o, n in split_at_multiples(data, request_size))
    z = ((True, o, n) for o, n in split_at_multiples(zero, zero_request_size))
    return heapq.merge(d, z, key=lambda t: t[1])


def zero_runs(length: int, granularity: int, is_zero: Callable[[int, int], bool]) -> list[tuple[bool, int, int]]:
    """``(all_zero, at, n)`` runs covering ``[0, length)`` of a chunk, judged ``granularity`` bytes
    at a time by ``is_zero(at, n)``; neighbouring granules of the same kind form one run."""
    runs: list[tuple[bool, int, int]] = []
    run_start, run_zero = 0, None
    pos = 0
    while pos < length:
        m = min(granularity, length - pos)
        z = is_zero(pos, m)
        if run_zero is None:
            run_zero = z
        elif z != run_zero:
            runs.append((run_zero, run_start, pos - run_start))
            run_start, run_zero = pos, z
        pos += m
    runs.append((bool(run_zero), run_start, length - run_start))
    return runs


def clip_from(extents: Sequence[Extent], offset: int) -> list[Extent]:
    """The parts of (normalised) ``extents`` at or after ``offset``: what is left to copy when
    everything below a checkpoint is already on the target."""
    out: list[Extent] = []
    for off, n in extents:
        end = off + n
        if end <= offset:
            continue
        start = max(off, offset)
        out.append((start, end - start))
    return out


def bytes_below(extents: Sequence[Extent], offset: int) -> int:
    """How many bytes of ``extents`` lie below ``offset``."""
    return sum(min(off + n, offset) - off for off, n in extents if off < offset)
