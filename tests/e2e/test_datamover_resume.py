"""Checkpoints, resume and stall detection of the copy engine, against real nbdkit processes.

The target side is measured with nbdkit's log filter: every Write/Zero request the target
received, so "what was rewritten" is counted where it happens, not by the copier's own counters.
"""
from __future__ import annotations

import errno
import threading
import time

import pytest

from omalab.disk_images import allocated, make_garbage, make_sparse, read_at
from tests.fixtures.nbd import file_sha256, logged_flushes, logged_writes, nbdkit_available, nbdkit_file_export
from vma_agent.datamover import CopyError, RetryPolicy, copy_disk, plan_full_copy
from vma_agent.datamover.extents import bytes_below, clip_from
from vma_agent.integrations.nbdkit import NbdkitServer, file_plugin_args

if not nbdkit_available():  # never skipped: the data mover is tested on real nbdkit or not at all
    raise RuntimeError("nbdkit is not installed: run scripts/setup")

MiB = 1024 * 1024
KiB = 1024
SIZE = 32 * MiB
EXTENTS = [(0, 3 * MiB), (5 * MiB, 6 * MiB + 64 * KiB), (14 * MiB, 9 * MiB), (30 * MiB, 2 * MiB)]


@pytest.fixture
def pair(tmp_path):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_sparse(src, SIZE, EXTENTS, seed=7)
    make_garbage(dst, SIZE)
    return src, dst


def logged_target(path, logfile, socket_path=None, **filter_params) -> NbdkitServer:
    params = {"logfile": str(logfile), **filter_params}
    filters = ["log", *(["delay"] if any(k.startswith(("delay", "wdelay")) for k in filter_params) else [])]
    return NbdkitServer(file_plugin_args(path, filters=filters, filter_params=params), socket_path=socket_path)


def slow_source(path, delay="10ms", socket_path=None) -> NbdkitServer:
    return NbdkitServer(file_plugin_args(path, readonly=True, filters=["delay"],
                                         filter_params={"delay-read": delay}), socket_path=socket_path)


def test_extent_clipping_for_resume():
    extents = [(0, 10), (20, 10), (40, 5)]
    assert clip_from(extents, 0) == extents
    assert clip_from(extents, 25) == [(25, 5), (40, 5)]
    assert clip_from(extents, 30) == [(40, 5)]
    assert clip_from(extents, 50) == []
    assert [bytes_below(extents, o) for o in (0, 5, 25, 30, 45, 99)] == [0, 5, 15, 20, 25, 25]


def test_checkpoints_are_flushed_and_cover_only_written_bytes(pair, tmp_path):
    src, dst = pair
    log = tmp_path / "target.log"
    data, zero = plan_full_copy(allocated(src), SIZE)
    seen = []

    def on_progress(p):
        if not seen or p.durable_offset != seen[-1][0]:
            # at the moment a checkpoint is published, everything below it is on the target
            seen.append((p.durable_offset, logged_flushes(log),
                         read_at(dst, 0, p.durable_offset) == read_at(src, 0, p.durable_offset)))

    with slow_source(src, delay="30ms") as s, logged_target(dst, log) as t:
        res = copy_disk(s.uri, t.uri, data, zero, request_size=256 * KiB, queue_depth=2, connections=2,
                        on_progress=on_progress, checkpoint_bytes=4 * MiB, checkpoint_seconds=0,
                        progress_interval=0.05)
    offsets = [o for o, _, _ in seen]
    assert offsets == sorted(offsets) and offsets[-1] == SIZE
    middle = [c for c in seen if 0 < c[0] < SIZE]
    assert len(middle) >= 3, seen           # several checkpoints during the copy
    assert all(ok for _, _, ok in seen)       # never ahead of the data
    assert all(flushes >= 1 for _, flushes, _ in middle)  # each one after a target flush
    assert res.checkpoints == len(middle)
    assert file_sha256(dst) == file_sha256(src)


def test_resume_from_an_offset_writes_only_the_rest(pair, tmp_path):
    src, dst = pair
    resume_at = 14 * MiB + 512 * KiB
    # the target holds the copy up to the checkpoint (an earlier run), garbage after it
    with open(dst, "r+b") as f:
        f.write(read_at(src, 0, resume_at))
    log = tmp_path / "target.log"
    data, zero = plan_full_copy(allocated(src), SIZE)
    progress = []
    with nbdkit_file_export(src, readonly=True) as su, logged_target(dst, log) as t:
        res = copy_disk(su, t.uri, data, zero, start_offset=resume_at, on_progress=progress.append)
    written = logged_writes(log)
    assert written and min(off for _, off, _ in written) >= resume_at
    assert sum(n for _, _, n in written) == SIZE - resume_at
    assert (res.resumed_from, res.bytes_resumed) == (resume_at, resume_at)
    assert res.bytes_copied + res.bytes_zeroed == SIZE - resume_at
    assert progress[-1].percent == 100.0 and progress[-1].bytes_done == SIZE
    assert file_sha256(dst) == file_sha256(src)


def test_target_restarted_mid_copy_resumes_from_the_checkpoint(pair, tmp_path):
    """The target's NBD server dies mid-disk and comes back 1.5 s later on the same socket: longer
    than the per-command retries last, so the copy starts again from its last checkpoint."""
    src, dst = pair
    sock = str(tmp_path / "target.sock")
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = logged_target(dst, first_log, socket_path=sock)
    second = logged_target(dst, second_log, socket_path=sock)
    data, zero = plan_full_copy(allocated(src), SIZE)
    checkpoints = []

    def cut():
        first.kill()
        time.sleep(1.5)
        second.start()

    first.start()
    try:
        with slow_source(src, delay="40ms") as s:
            timer = threading.Timer(0.6, cut)
            timer.start()
            res = copy_disk(s.uri, first.uri, data, zero, request_size=256 * KiB, queue_depth=2, connections=1,
                            retry=RetryPolicy(tries=2, initial_delay=0.05), stall_seconds=30,
                            checkpoint_bytes=2 * MiB, checkpoint_seconds=0, progress_interval=0.05,
                            on_progress=lambda p: checkpoints.append(p.durable_offset))
            timer.join()
    finally:
        first.stop()
        second.stop()
    before = logged_writes(first_log)
    after = logged_writes(second_log)
    assert before and after and res.attempts >= 2
    written_before = sum(n for _, _, n in before)
    rewritten = sum(n for _, _, n in after)
    # at most what was not written yet, plus one checkpoint interval
    assert rewritten <= SIZE - written_before + 2 * MiB, (rewritten, written_before)
    assert file_sha256(dst) == file_sha256(src)


def test_a_hung_target_is_a_stall_not_a_hang(pair, tmp_path):
    src, dst = pair
    with nbdkit_file_export(src, readonly=True) as su, \
            logged_target(dst, tmp_path / "t.log", **{"wdelay": "60"}) as t:
        t0 = time.monotonic()
        with pytest.raises(CopyError, match="no progress") as ei:
            copy_disk(su, t.uri, [(0, SIZE)], [], connections=1, stall_seconds=1.5,
                      retry=RetryPolicy(tries=2, initial_delay=0.05))
        assert time.monotonic() - t0 < 15
    assert ei.value.errno == errno.ETIMEDOUT
