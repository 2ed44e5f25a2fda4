"""Pure logic of the data mover, no NBD server needed: extent planning, the work order the workers
share, zero-run splitting, retry decisions and progress accounting. The copy itself is tested on
real nbdkit exports in test_datamover_copier.py."""
from __future__ import annotations

import dataclasses
import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vma_agent.datamover.extents import (
    complement,
    normalize_extents,
    plan_full_copy,
    plan_incremental_copy,
    split_at_multiples,
    work_order,
    zero_runs,
)
from vma_agent.datamover.failures import RetryPolicy, is_permanent
from vma_agent.datamover.progress import COUNTED_FIELDS, CopyProgress, CopyResult, progress_of

KiB = 1024
MiB = 1024 * KiB

extents_strategy = st.lists(st.tuples(st.integers(0, 10 * MiB), st.integers(0, 2 * MiB)), max_size=40)


def test_normalize_sorts_merges_clips_and_drops_empty():
    raw = [(100, 50), (0, 10), (10, 5), (140, 20), (300, 0), (500, 100), (590, 1000)]
    assert normalize_extents(raw) == [(0, 15), (100, 60), (500, 1090)]
    assert normalize_extents(raw, size=550) == [(0, 15), (100, 60), (500, 50)]
    assert normalize_extents(raw, size=100) == [(0, 15)]  # an extent starting at the end is dropped
    assert normalize_extents([(0, 10), (20, 10)], merge_gap=10) == [(0, 30)]
    assert normalize_extents([(0, 10), (21, 10)], merge_gap=10) == [(0, 10), (21, 10)]
    with pytest.raises(ValueError, match="negative extent offset -5"):
        normalize_extents([(-5, 10)])


def test_full_copy_plan_zeroes_everything_not_allocated():
    data, zero = plan_full_copy([(4 * KiB, 4 * KiB), (0, 4 * KiB), (64 * KiB, 8 * KiB)], 80 * KiB)
    assert data == [(0, 8 * KiB), (64 * KiB, 8 * KiB)]
    assert zero == [(8 * KiB, 56 * KiB), (72 * KiB, 8 * KiB)]
    assert plan_full_copy([], 10) == ([], [(0, 10)])  # nothing allocated: the whole disk is zeroed
    assert plan_full_copy([(0, 10)], 10) == ([(0, 10)], [])
    assert plan_full_copy([], 0) == ([], [])
    with pytest.raises(ValueError, match="disk size must be >= 0"):
        plan_full_copy([], -1)


def test_incremental_plan_copies_changed_areas_only():
    assert plan_incremental_copy([(8, 8), (0, 8), (100, 50)], 120) == ([(0, 16), (100, 20)], [])


@given(extents_strategy, st.integers(0, 12 * MiB))
def test_full_copy_plan_covers_the_disk_exactly_once(allocated, size):
    data, zero = plan_full_copy(allocated, size)
    pieces = sorted(data + zero)
    pos = 0
    for off, n in pieces:  # no gap, no overlap, in order
        assert off == pos and n > 0
        pos = off + n
    assert pos == size
    # every allocated byte inside the disk is copied, not zeroed
    for off, n in allocated:
        if n and off < size:
            assert any(d <= off and min(off + n, size) <= d + m for d, m in data)


def test_complement_of_touching_and_overlapping_extents():
    assert complement([(0, 5), (5, 5), (20, 5)], 30) == [(10, 10), (25, 5)]
    assert complement([], 7) == [(0, 7)]


def test_split_at_multiples_keeps_requests_aligned():
    assert list(split_at_multiples([(1000, 5000)], 2048)) == [(1000, 1048), (2048, 2048), (4096, 1904)]
    assert list(split_at_multiples([(0, 4096), (8192, 10)], 4096)) == [(0, 4096), (8192, 10)]


def test_work_order_merges_data_and_zero_pieces_in_disk_order():
    data = [(0, 3 * MiB), (10 * MiB, MiB)]
    zero = [(3 * MiB, 7 * MiB)]
    work = list(work_order(data, zero, 2 * MiB, 4 * MiB))
    assert work == [
        (False, 0, 2 * MiB), (False, 2 * MiB, MiB),
        (True, 3 * MiB, MiB), (True, 4 * MiB, 4 * MiB), (True, 8 * MiB, 2 * MiB),
        (False, 10 * MiB, MiB),
    ]


@given(extents_strategy, st.sampled_from([4 * KiB, 64 * KiB, 2 * MiB]))
def test_work_order_pieces_never_cross_a_request_boundary(extents, request):
    data, zero = plan_full_copy(extents, 12 * MiB)
    work = list(work_order(data, zero, request, 2 * request))
    assert [w[1] for w in work] == sorted(w[1] for w in work)
    assert sum(n for _, _, n in work) == 12 * MiB
    for is_zero, off, n in work:
        step = 2 * request if is_zero else request
        assert 0 < n <= step and off // step == (off + n - 1) // step


def test_zero_runs_split_a_chunk_into_zero_and_data_runs():
    buf = bytearray(10 * 4)  # granules of 4: Z Z D Z Z Z D D Z Z
    for g in (2, 6, 7):
        buf[g * 4 + 1] = 0xFF

    def is_zero(at: int, n: int) -> bool:
        return not any(buf[at:at + n])

    assert zero_runs(len(buf), 4, is_zero) == [
        (True, 0, 8), (False, 8, 4), (True, 12, 12), (False, 24, 8), (True, 32, 8)]
    assert zero_runs(10, 4, lambda at, n: False) == [(False, 0, 10)]
    assert zero_runs(10, 4, lambda at, n: True) == [(True, 0, 10)]
    assert zero_runs(9, 4, lambda at, n: at == 8) == [(False, 0, 8), (True, 8, 1)]  # short last granule


def test_permanent_errors_are_not_retried_and_others_are_until_the_last_try():
    policy = RetryPolicy(tries=3)
    for err in (errno.EROFS, errno.ENOSPC, errno.EINVAL, errno.EPERM, errno.ENOTSUP):
        assert is_permanent(err) and policy.gives_up(err, 1)
    for err in (errno.EIO, errno.ENOTCONN, errno.ECONNRESET, errno.ETIMEDOUT, None):
        assert not is_permanent(err)
        assert [policy.gives_up(err, failures) for failures in (1, 2, 3)] == [False, False, True]


def test_retry_delays_back_off_up_to_the_cap():
    policy = RetryPolicy(tries=8, initial_delay=0.5, factor=3.0, max_delay=10.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.5, 4.5, 10.0, 10.0]


def test_progress_percent_and_throughput():
    p = CopyProgress(bytes_copied=30, bytes_zeroed=20, bytes_total=200, elapsed=2.0)
    assert (p.bytes_done, p.percent, p.throughput_bps) == (50, 25.0, 25.0)
    assert CopyProgress(0, 0, 0, 0.0).percent == 100.0  # nothing to copy is done
    assert CopyProgress(0, 0, 10, 0.0).throughput_bps == 0.0
    assert CopyProgress(15, 0, 10, 1.0).percent == 100.0  # never above 100


def test_worker_counters_are_summed_into_the_result():
    names = {f.name for f in dataclasses.fields(CopyResult)}
    assert set(COUNTED_FIELDS) <= names
    workers = [CopyResult(**{name: i + 1 for name in COUNTED_FIELDS}) for i in range(3)]
    result = CopyResult(bytes_total=999, connections=3, elapsed=4.0, flushed=True)
    for w in workers:
        result.add_counts(w)
    assert all(getattr(result, name) == 6 for name in COUNTED_FIELDS)
    assert (result.bytes_total, result.connections, result.elapsed, result.flushed) == (999, 3, 4.0, True)
    assert result.bytes_done == 12 and result.throughput_bps == 3.0
    running = progress_of(workers, total=100, elapsed=2.0)
    assert running == CopyProgress(bytes_copied=6, bytes_zeroed=6, bytes_total=100, elapsed=2.0)
