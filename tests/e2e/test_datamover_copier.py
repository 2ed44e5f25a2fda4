"""Copy engine against real nbdkit processes (file plugin over temp files, unix sockets)."""
from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest

from omalab.disk_images import allocated, make_garbage, make_sparse, read_at
from tests.fixtures.nbd import file_sha256, nbdkit_available, nbdkit_file_export
from vma_agent.datamover import (
    CopyCancelled,
    CopyError,
    RetryPolicy,
    copy_disk,
    normalize_extents,
    plan_full_copy,
    plan_full_copy_from_block_status,
    plan_incremental_copy,
)
from vma_agent.integrations.nbd_client import NbdConnection, NbdError, tcp_uri, unix_uri
from vma_agent.integrations.nbdkit import (
    NbdkitError,
    NbdkitServer,
    file_plugin_args,
    vddk_plugin_args,
)

if not nbdkit_available():  # never skipped: the data mover is tested on real nbdkit or not at all
    raise RuntimeError("nbdkit is not installed: run scripts/setup")

MiB = 1024 * 1024
KiB = 1024
FAST_RETRY = RetryPolicy(tries=3, initial_delay=0.02, factor=2.0)


# ----------------------------------------------------------------- helpers
DATA_EXTENTS = [(0, 200 * KiB), (1 * MiB + 4 * KiB, 3 * MiB), (7 * MiB, 64 * KiB),
                (9 * MiB + 512 * KiB, 5 * MiB + 12 * KiB), (31 * MiB, 1 * MiB)]
SIZE = 32 * MiB


@pytest.fixture
def sparse_pair(tmp_path):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_sparse(src, SIZE, DATA_EXTENTS)
    make_garbage(dst, SIZE)
    return src, dst


# ------------------------------------------------------------- planning
def test_normalize_and_plan_full_copy():
    assert normalize_extents([(10, 5), (0, 4), (4, 2), (20, 0), (12, 10)]) == [(0, 6), (10, 12)]
    assert normalize_extents([(0, 4), (6, 2)], merge_gap=2) == [(0, 8)]
    assert normalize_extents([(0, 4), (7, 2)], merge_gap=2) == [(0, 4), (7, 2)]
    assert normalize_extents([(90, 20), (200, 5)], size=100) == [(90, 10)]
    data, zero = plan_full_copy([(10, 10), (50, 10), (15, 10)], 100)
    assert data == [(10, 15), (50, 10)]
    assert zero == [(0, 10), (25, 25), (60, 40)]
    assert plan_full_copy([], 100) == ([], [(0, 100)])
    assert plan_full_copy([(0, 100)], 100) == ([(0, 100)], [])
    assert plan_incremental_copy([(5, 5), (0, 5)], 100) == ([(0, 10)], [])
    with pytest.raises(ValueError):
        normalize_extents([(-1, 5)])


# ------------------------------------------------------------- full copy
def test_full_copy_sparse_into_garbage(sparse_pair):
    src, dst = sparse_pair
    data, zero = plan_full_copy(allocated(src), SIZE)
    progress = []
    with nbdkit_file_export(src, readonly=True) as su, nbdkit_file_export(dst) as du:
        res = copy_disk(su, du, data, zero, on_progress=progress.append, request_size=1 * MiB,
                        queue_depth=4, connections=2, progress_interval=0.0)
    assert file_sha256(dst) == file_sha256(src)
    data_bytes = sum(n for _, n in data)
    assert res.bytes_copied + res.bytes_zeroed == SIZE == res.bytes_total
    assert res.bytes_copied <= data_bytes and res.bytes_read == data_bytes
    assert res.bytes_zeroed >= SIZE - data_bytes
    assert res.flushed and res.retries == 0 and res.connections == 2
    assert progress and progress[-1].bytes_done == SIZE and progress[-1].percent == 100.0
    done = [p.bytes_done for p in progress]
    assert done == sorted(done)


def test_plan_from_block_status_matches_seek_data(sparse_pair):
    src, dst = sparse_pair
    with nbdkit_file_export(src, readonly=True) as su:
        data, zero = plan_full_copy_from_block_status(su, step=5 * MiB)
        assert (data, zero) == plan_full_copy(allocated(src), SIZE)
        with nbdkit_file_export(dst) as du:
            copy_disk(su, du, data, zero)
    assert file_sha256(dst) == file_sha256(src)


def test_full_copy_one_connection_small_requests(sparse_pair):
    src, dst = sparse_pair
    data, zero = plan_full_copy(allocated(src), SIZE)
    with nbdkit_file_export(src, readonly=True) as su, nbdkit_file_export(dst) as du:
        res = copy_disk(su, du, data, zero, request_size=64 * KiB, queue_depth=3, connections=1,
                        zero_request_size=1 * MiB)
    assert file_sha256(dst) == file_sha256(src)
    assert res.reads >= sum(n for _, n in data) // (64 * KiB)


def test_full_copy_target_without_multi_conn_flushes_every_connection(sparse_pair):
    src, dst = sparse_pair
    data, zero = plan_full_copy(allocated(src), SIZE)
    params = {"multi-conn-mode": "disable"}
    with (nbdkit_file_export(src, readonly=True) as su,
          nbdkit_file_export(dst, filters=["multi-conn"], filter_params=params) as du):
        with NbdConnection(du) as c:
            assert not c.can_multi_conn
        res = copy_disk(su, du, data, zero, connections=3, request_size=512 * KiB)
    assert res.flushed and res.connections == 3
    assert file_sha256(dst) == file_sha256(src)


def test_full_copy_target_without_write_zeroes(sparse_pair):
    """A target that cannot WRITE_ZEROES gets zero buffers written instead."""
    src, dst = sparse_pair
    data, zero = plan_full_copy(allocated(src), SIZE)
    with nbdkit_file_export(src, readonly=True) as su, \
            nbdkit_file_export(dst, filters=["nozero"]) as du:
        with NbdConnection(du) as c:
            assert not c.can_zero
        res = copy_disk(su, du, data, zero, request_size=1 * MiB)
    assert file_sha256(dst) == file_sha256(src)
    assert res.zeroes == 0 and res.bytes_copied + res.bytes_zeroed == SIZE


@pytest.mark.parametrize("mode", ["slow", "ignore"])
def test_fast_zero_used_when_offered_and_falls_back(sparse_pair, mode):
    """fastzeromode=slow: the target advertises FAST_ZERO but refuses it (ENOTSUP), so the
    engine must fall back to a plain WRITE_ZEROES; ignore: FAST_ZERO just works."""
    src, dst = sparse_pair
    data, zero = plan_full_copy(allocated(src), SIZE)
    params = {"zeromode": "plugin", "fastzeromode": mode}
    with (nbdkit_file_export(src, readonly=True) as su,
          nbdkit_file_export(dst, filters=["nozero"], filter_params=params) as du):
        with NbdConnection(du) as c:
            assert c.can_fast_zero
        res = copy_disk(su, du, data, zero, fast_zero=True)
    assert file_sha256(dst) == file_sha256(src)
    assert res.retries == 0 and res.bytes_zeroed >= SIZE - sum(n for _, n in data)


def test_many_small_scattered_extents_deep_queue(tmp_path):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    rnd = random.Random(11)
    blocks = sorted(rnd.sample(range(SIZE // (16 * KiB)), 300))
    extents = [(b * 16 * KiB, 16 * KiB) for b in blocks]
    make_sparse(src, SIZE, extents, seed=3)
    make_sparse(dst, SIZE, [], seed=3)
    with nbdkit_file_export(src, readonly=True) as su, nbdkit_file_export(dst) as du:
        res = copy_disk(su, du, extents, [], queue_depth=64, max_in_flight=256 * KiB, request_size=128 * KiB,
                        connections=3)
    assert res.bytes_copied == sum(n for _, n in normalize_extents(extents))
    assert file_sha256(dst) == file_sha256(src)


# ------------------------------------------------------------ incremental
def test_incremental_copies_only_changed_extents(tmp_path):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_sparse(src, SIZE, DATA_EXTENTS)
    data, zero = plan_full_copy(allocated(src), SIZE)
    make_garbage(dst, SIZE)
    with nbdkit_file_export(src, readonly=True) as su, nbdkit_file_export(dst) as du:
        copy_disk(su, du, data, zero)
    assert file_sha256(dst) == file_sha256(src)

    # Change scattered blocks (some in holes, some over data, one across a boundary).
    changed = [(64 * KiB, 64 * KiB), (3 * MiB, 4 * KiB), (12 * MiB, 2 * MiB + 100),
               (20 * MiB, 256 * KiB), (SIZE - 8 * KiB, 8 * KiB)]
    make_sparse_changes = random.Random(7)
    with open(src, "r+b") as f:
        for off, n in changed:
            f.seek(off)
            f.write(make_sparse_changes.randbytes(n))
    # Something on the target outside the changed extents must stay untouched:
    marker_off = 25 * MiB
    with open(dst, "r+b") as f:
        f.seek(marker_off)
        f.write(b"UNTOUCHED")

    inc, inc_zero = plan_incremental_copy(changed, SIZE)
    with nbdkit_file_export(src, readonly=True) as su, nbdkit_file_export(dst) as du:
        res = copy_disk(su, du, inc, inc_zero, request_size=1 * MiB, connections=2)
    changed_bytes = sum(n for _, n in changed)
    assert res.bytes_copied == changed_bytes and res.bytes_zeroed == 0
    assert res.bytes_read == changed_bytes == res.bytes_total
    assert read_at(dst, marker_off, 9) == b"UNTOUCHED"
    with open(dst, "r+b") as f:  # undo the marker: then target == source
        f.seek(marker_off)
        f.write(read_at(src, marker_off, 9))
    assert file_sha256(dst) == file_sha256(src)


def test_no_extents_is_a_noop(sparse_pair):
    src, dst = sparse_pair
    before = file_sha256(dst)
    with nbdkit_file_export(src, readonly=True) as su, nbdkit_file_export(dst) as du:
        res = copy_disk(su, du, [], [])
    assert res.bytes_done == 0 and res.bytes_total == 0
    assert file_sha256(dst) == before


# ---------------------------------------------------------- zero detection
def test_zero_detection_writes_zeroes_not_data(tmp_path):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    with open(src, "wb") as f:  # allocated but zero: SEEK_DATA reports it as data
        f.write(b"\0" * (4 * MiB))                       # [0, 4M) all zero
        f.write(os.urandom(1 * MiB))                     # [4M, 5M) data
        f.write(b"\0" * (256 * KiB) + os.urandom(768 * KiB))  # [5M, 6M) zero run + data
        f.write(b"\0" * (2 * MiB))                       # [6M, 8M) zero
    make_garbage(dst, 8 * MiB)
    with nbdkit_file_export(src, readonly=True) as su, nbdkit_file_export(dst) as du:
        res = copy_disk(su, du, [(0, 8 * MiB)], [], request_size=1 * MiB, zero_granularity=64 * KiB)
    assert file_sha256(dst) == file_sha256(src)
    assert res.bytes_read == 8 * MiB
    assert res.zero_detected == res.bytes_zeroed == 6 * MiB + 256 * KiB
    assert res.bytes_copied == 1 * MiB + 768 * KiB
    # Detection off: everything goes out as data.
    make_garbage(dst, 8 * MiB)
    with nbdkit_file_export(src, readonly=True) as su, nbdkit_file_export(dst) as du:
        res = copy_disk(su, du, [(0, 8 * MiB)], [], detect_zeroes=False)
    assert res.bytes_copied == 8 * MiB and res.bytes_zeroed == 0
    assert file_sha256(dst) == file_sha256(src)


# ------------------------------------------------------------------ errors
def test_target_smaller_than_source_is_a_clear_error(tmp_path):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_sparse(src, SIZE, DATA_EXTENTS)
    make_garbage(dst, 16 * MiB)
    data, zero = plan_full_copy(allocated(src), SIZE)
    with (nbdkit_file_export(src, readonly=True) as su, nbdkit_file_export(dst) as du,
          pytest.raises(CopyError, match=r"target export is too small: 16777216 bytes.*33554432") as ei):
        copy_disk(su, du, data, zero)
    assert ei.value.offset == 16 * MiB


def test_data_extent_beyond_source_is_rejected(sparse_pair):
    src, dst = sparse_pair
    with (nbdkit_file_export(src, readonly=True) as su, nbdkit_file_export(dst) as du,
          pytest.raises(CopyError, match="beyond the source size")):
        copy_disk(su, du, [(SIZE - MiB, 2 * MiB)], [])


def test_read_only_target_is_rejected(sparse_pair):
    src, dst = sparse_pair
    with (nbdkit_file_export(src, readonly=True) as su, nbdkit_file_export(dst, readonly=True) as du,
          pytest.raises(CopyError, match="read-only")):
        copy_disk(su, du, [(0, MiB)], [])


def test_unreachable_source_is_a_clear_error(tmp_path, sparse_pair):
    _, dst = sparse_pair
    with nbdkit_file_export(dst) as du, pytest.raises(CopyError, match="cannot connect to source"):
        copy_disk(unix_uri(str(tmp_path / "nothing.sock")), du, [(0, MiB)], [], retry=FAST_RETRY)


def test_persistent_read_error_names_the_offset(sparse_pair):
    src, dst = sparse_pair
    params = {"error": "EIO", "error-pread-rate": "100%"}
    with nbdkit_file_export(src, readonly=True, filters=["error"], filter_params=params) as su, \
            nbdkit_file_export(dst) as du:
        t0 = time.monotonic()
        with pytest.raises(CopyError, match=r"read of \d+ bytes at offset \d+ on the source failed "
                                            r"after 3 attempts: EIO") as ei:
            copy_disk(su, du, [(3 * MiB, MiB)], [], retry=FAST_RETRY)
        assert time.monotonic() - t0 < 5
    assert ei.value.offset == 3 * MiB and ei.value.operation == "read" and ei.value.errno == errno.EIO


def test_permanent_write_error_is_not_retried(sparse_pair):
    src, dst = sparse_pair
    params = {"error": "ENOSPC", "error-pwrite-rate": "100%"}
    with (nbdkit_file_export(src, readonly=True) as su,
          nbdkit_file_export(dst, filters=["error"], filter_params=params) as du,
          pytest.raises(CopyError, match=r"write of \d+ bytes at offset 1048576 on the target failed: ENOSPC") as ei):
        copy_disk(su, du, [(MiB, MiB)], [], retry=RetryPolicy(tries=3, initial_delay=5))
    assert ei.value.errno == errno.ENOSPC and ei.value.progress is not None


def test_transient_errors_are_retried(tmp_path, sparse_pair):
    src, dst = sparse_pair
    inject = tmp_path / "inject"
    inject.touch()
    params = {"error": "EIO", "error-rate": "100%", "error-file": str(inject)}
    data, zero = plan_full_copy(allocated(src), SIZE)

    class HealAfterFirstFailure(RetryPolicy):
        def delay(self, failures):
            inject.unlink(missing_ok=True)  # the "transient" condition goes away
            return super().delay(failures)

    with nbdkit_file_export(src, readonly=True, filters=["error"], filter_params=params) as su, \
            nbdkit_file_export(dst) as du:
        res = copy_disk(su, du, data, zero, connections=2,
                        retry=HealAfterFirstFailure(tries=3, initial_delay=0.05))
    assert res.retries > 0
    assert file_sha256(dst) == file_sha256(src)


def test_random_errors_on_both_sides_are_survived(sparse_pair):
    src, dst = sparse_pair
    data, zero = plan_full_copy(allocated(src), SIZE)
    flaky = {"error": "EIO", "error-rate": "10%"}
    with (nbdkit_file_export(src, readonly=True, filters=["error"], filter_params=flaky) as su,
          nbdkit_file_export(dst, filters=["error"], filter_params=flaky) as du):
        res = copy_disk(su, du, data, zero, request_size=256 * KiB, zero_request_size=MiB, connections=2,
                        retry=RetryPolicy(tries=8, initial_delay=0.001, factor=1.5))
    assert res.retries > 0
    assert res.bytes_copied + res.bytes_zeroed == SIZE
    assert file_sha256(dst) == file_sha256(src)


def test_source_killed_mid_copy_raises_with_offset(sparse_pair):
    src, dst = sparse_pair
    slow = file_plugin_args(src, readonly=True, filters=["delay"], filter_params={"delay-read": "30ms"})
    with NbdkitServer(slow) as s, nbdkit_file_export(dst) as du:
        threading.Timer(0.2, s.kill).start()
        t0 = time.monotonic()
        with pytest.raises(CopyError, match=r"(read|connect).*source") as ei:
            copy_disk(s.uri, du, [(0, SIZE)], [], request_size=256 * KiB, queue_depth=2,
                      connections=1, retry=FAST_RETRY)
        assert time.monotonic() - t0 < 5
    msg = str(ei.value)
    assert "offset" in msg and ei.value.offset is not None
    assert 0 < ei.value.progress.bytes_done < SIZE


def test_source_restarted_mid_copy_reconnects(tmp_path, sparse_pair):
    src, dst = sparse_pair
    sock = str(tmp_path / "src.sock")
    # slow enough that the restart 0.1 s in always lands mid-copy, even on a loaded machine
    slow = file_plugin_args(src, readonly=True, filters=["delay"], filter_params={"delay-read": "20ms"})
    first = NbdkitServer(slow, socket_path=sock)
    first.start()
    second = NbdkitServer(slow, socket_path=sock)

    def restart():
        first.kill()  # leaves its socket file behind: start() must clear it
        second.start()

    data, zero = plan_full_copy(allocated(src), SIZE)
    try:
        with nbdkit_file_export(dst) as du:
            threading.Timer(0.1, restart).start()
            res = copy_disk(first.uri, du, data, zero, request_size=128 * KiB, queue_depth=2,
                            connections=1, retry=RetryPolicy(tries=5, initial_delay=0.2))
    finally:
        first.stop()
        second.stop()
    assert res.reconnects >= 1 and res.retries >= 1
    assert file_sha256(dst) == file_sha256(src)


# ------------------------------------------------------------ cancellation
def test_cancellation_stops_promptly(sparse_pair):
    src, dst = sparse_pair
    cancel = threading.Event()
    with nbdkit_file_export(src, readonly=True, filters=["delay"], filter_params={"delay-read": "50ms"}) as su, \
            nbdkit_file_export(dst) as du:
        threading.Timer(0.3, cancel.set).start()
        t0 = time.monotonic()
        with pytest.raises(CopyCancelled) as ei:
            copy_disk(su, du, [(0, SIZE)], [], request_size=256 * KiB, queue_depth=2, cancel_event=cancel)
        took = time.monotonic() - t0
    assert took < 1.5
    assert ei.value.progress is not None and ei.value.progress.bytes_done < SIZE


def test_already_cancelled_does_nothing(sparse_pair):
    src, dst = sparse_pair
    cancel = threading.Event()
    cancel.set()
    with (nbdkit_file_export(src, readonly=True) as su, nbdkit_file_export(dst) as du,
          pytest.raises(CopyCancelled)):
        copy_disk(su, du, [(0, SIZE)], [], cancel_event=cancel)


def test_progress_callback_error_aborts_the_copy(sparse_pair):
    src, dst = sparse_pair

    def boom(p):
        raise RuntimeError("progress sink failed")

    slow = {"delay-read": "20ms"}
    with (nbdkit_file_export(src, readonly=True, filters=["delay"], filter_params=slow) as su,
          nbdkit_file_export(dst) as du, pytest.raises(RuntimeError, match="progress sink failed")):
        copy_disk(su, du, [(0, SIZE)], [], request_size=256 * KiB, queue_depth=2,
                  on_progress=boom, progress_interval=0.05)


# ------------------------------------------------------- integrations
def test_nbd_connection_basics(sparse_pair):
    src, _ = sparse_pair
    with nbdkit_file_export(src, readonly=True) as uri, NbdConnection(uri) as c:
        assert c.size == SIZE and c.read_only
        assert c.pread(16, 0) == read_at(src, 0, 16)
        ext = c.block_status(SIZE, 0)
        assert ext and ext[0].offset == 0 and not ext[0].hole
        assert any(e.hole for e in ext)
    with pytest.raises(NbdError, match="cannot connect"):
        NbdConnection(unix_uri("/nonexistent/x.sock"))


def test_nbdkit_server_tcp_and_failures(tmp_path, sparse_pair):
    src, _ = sparse_pair
    with NbdkitServer(file_plugin_args(src, readonly=True), tcp_host="127.0.0.1") as srv:
        assert srv.uri == tcp_uri("127.0.0.1", srv.tcp_port)
        with NbdConnection(srv.uri) as c:
            assert c.size == SIZE
        assert "-r" in srv.argv() and "--exit-with-parent" in srv.argv() and "-f" in srv.argv()
    assert not srv.alive()
    with pytest.raises(NbdkitError, match="exited with status"):
        NbdkitServer(file_plugin_args(tmp_path / "missing.img")).start()
    srv = NbdkitServer(file_plugin_args(src))
    srv.start()
    sock = srv.socket_path
    assert os.path.exists(sock)
    srv.stop()
    srv.stop()  # idempotent
    assert not os.path.exists(sock)


def test_vddk_argv_keeps_the_password_off_the_command_line():
    args = vddk_plugin_args(server="vc.example", user="administrator@vsphere.local", password="s3cret!",
                            thumbprint="AA:BB", vm_moref="vm-42", snapshot_moref="snapshot-7",
                            disk_file="[ds1] vm/vm.vmdk", libdir="/opt/vmware-vix-disklib-distrib",
                            transports=["nbdssl", "nbd"])
    srv = NbdkitServer(args, socket_path="/tmp/x.sock", nbdkit="/usr/sbin/nbdkit")
    argv = srv.argv()
    assert "s3cret!" not in " ".join(argv)
    assert argv[:2] == ["/usr/sbin/nbdkit", "-f"] and "-r" in argv and "--exit-with-parent" in argv
    tail = argv[argv.index("vddk"):]
    assert tail == ["vddk", "libdir=/opt/vmware-vix-disklib-distrib", "server=vc.example",
                    "user=administrator@vsphere.local", "password=-", "thumbprint=AA:BB", "vm=moref=vm-42",
                    "snapshot=snapshot-7", "transports=nbdssl:nbd", "file=[ds1] vm/vm.vmdk"]
    assert args.stdin_secret == "s3cret!"
    f = vddk_plugin_args(server="h", user="u", password_file="/run/pw", thumbprint="T", vm_moref="vm-1",
                         disk_file="[d] a.vmdk")
    assert "password=+/run/pw" in f.argv_tail() and f.stdin_secret is None
    with pytest.raises(ValueError):
        vddk_plugin_args(server="h", user="u", thumbprint="T", vm_moref="vm-1", disk_file="x")


def test_nbdkit_started_from_a_short_lived_thread_survives_it(sparse_pair):
    """--exit-with-parent must not kill nbdkit when the starting thread (not process) ends."""
    src, _ = sparse_pair
    srv = NbdkitServer(file_plugin_args(src, readonly=True))
    t = threading.Thread(target=srv.start)
    t.start()
    t.join()
    try:
        time.sleep(0.2)
        assert srv.alive()
        with NbdConnection(srv.uri) as c:
            assert c.size == SIZE
    finally:
        srv.stop()
