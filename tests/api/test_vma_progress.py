"""VMA ProgressService (mapping: GET /progress/{jobId} reads VMA memory; POST /progress/{jobId}/update
writes no database): per-disk aggregation, real update times, and WatchProgress with many watchers,
a slow one never blocking updates, and the stream ending after the terminal event."""
from __future__ import annotations

import threading
import time

import grpc
import pytest
from vma.v1 import progress_pb2 as pb
from vma.v1 import progress_pb2_grpc

from tests.fixtures.servers import VMA_TOKEN
from vma_agent.progress_store import DiskStatus, JobStatus, ProgressStore, ProgressUpdate, Stage

META = (("authorization", f"Bearer {VMA_TOKEN}"),)


@pytest.fixture
def progress(vma_agent):
    channel = grpc.insecure_channel(f"127.0.0.1:{vma_agent.port}")
    yield progress_pb2_grpc.ProgressServiceStub(channel)
    channel.close()


def _update(stub, **fields):
    return stub.UpdateProgress(pb.UpdateProgressRequest(**fields), metadata=META, timeout=5)


def test_updates_aggregate_per_disk(progress):
    first = _update(progress, job_id="j1", stage=pb.STAGE_TRANSFER, status=pb.JOB_STATUS_RUNNING, disk_id="disk-2000",
                    bytes_transferred=25, total_bytes=100, throughput_bps=1 << 20, sync_type="initial")
    assert first.auto_initialized
    assert not _update(progress, job_id="j1", disk_id="disk-2001", bytes_transferred=50, total_bytes=100).auto_initialized
    got = progress.GetProgress(pb.GetProgressRequest(job_id="j1"), metadata=META, timeout=5).progress
    assert (got.bytes_transferred, got.total_bytes, got.percentage) == (75, 200, 37.5)
    assert got.sync_type == "full" and got.current_operation == "Transferring Data"
    assert {d.disk_id: d.percent for d in got.disks} == {"disk-2000": 25.0, "disk-2001": 50.0}
    updated = got.updated_at.ToDatetime()
    time.sleep(0.05)
    again = progress.GetProgress(pb.GetProgressRequest(job_id="j1"), metadata=META, timeout=5).progress
    assert again.updated_at.ToDatetime() == updated  # reads never rewrite the update time
    _update(progress, job_id="j1", disk_id="disk-2000", error_message="read error at 4096",
            disk_status=pb.DISK_STATUS_FAILED)
    failed = progress.GetProgress(pb.GetProgressRequest(job_id="j1"), metadata=META, timeout=5).progress
    assert failed.last_error == "disk-2000: read error at 4096" and failed.disks[0].status == pb.DISK_STATUS_FAILED


def test_errors_and_authentication(progress, vma_agent):
    with pytest.raises(grpc.RpcError) as err:
        progress.GetProgress(pb.GetProgressRequest(job_id="missing"), metadata=META, timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        _update(progress, job_id="")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        _update(progress, job_id="j", percent=150)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        progress.GetProgress(pb.GetProgressRequest(job_id="j"), timeout=5)  # no token
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_many_watchers_each_get_current_state_then_changes_until_terminal(progress):
    _update(progress, job_id="w", stage=pb.STAGE_SNAPSHOT, status=pb.JOB_STATUS_RUNNING)
    seen: dict[int, list] = {}

    def watch(i):
        stream = progress.WatchProgress(pb.WatchProgressRequest(job_id="w"), metadata=META, timeout=30)
        seen[i] = [(r.progress.sequence, r.progress.status, r.progress.stage) for r in stream]

    watchers = [threading.Thread(target=watch, args=(i,)) for i in range(5)]
    for t in watchers:
        t.start()
    time.sleep(0.3)
    _update(progress, job_id="w", stage=pb.STAGE_TRANSFER, disk_id="disk-2000", bytes_transferred=10, total_bytes=10)
    time.sleep(0.1)
    _update(progress, job_id="w", status=pb.JOB_STATUS_SUCCEEDED, stage=pb.STAGE_FINALIZE)
    for t in watchers:
        t.join(10)
    assert all(not t.is_alive() for t in watchers)  # every stream ended after the terminal event
    for events in seen.values():
        assert events[0][1] == pb.JOB_STATUS_RUNNING and events[0][2] == pb.STAGE_SNAPSHOT  # current state first
        assert events[-1][1] == pb.JOB_STATUS_SUCCEEDED
        assert [e[0] for e in events] == sorted({e[0] for e in events})  # increasing, no repeats


def test_a_slow_watcher_never_blocks_updates():
    store = ProgressStore()
    store.apply(ProgressUpdate(job_id="s", stage=Stage.TRANSFER, status=JobStatus.RUNNING))
    slow = store.watch("s")
    first = next(slow)  # then the watcher stalls and reads nothing for a while
    started = time.monotonic()
    for i in range(1, 2001):
        store.apply(ProgressUpdate(job_id="s", disk_id="disk-2000", bytes_transferred=i, total_bytes=2000,
                                   disk_status=DiskStatus.STREAMING))
    assert time.monotonic() - started < 5  # 2,000 updates went through while the watcher slept
    store.apply(ProgressUpdate(job_id="s", status=JobStatus.SUCCEEDED))
    rest = list(slow)
    assert rest and rest[-1].status is JobStatus.SUCCEEDED and rest[0].sequence > first.sequence + 1  # skipped, not blocked
    assert rest[-1].disks["disk-2000"].bytes_transferred == 2000


def test_ended_jobs_ignore_late_reports_and_are_evicted():
    store = ProgressStore(retention_seconds=0.05)
    store.apply(ProgressUpdate(job_id="e", status=JobStatus.FAILED, error_message="boom"))
    record, _ = store.apply(ProgressUpdate(job_id="e", status=JobStatus.RUNNING))
    assert record.status is JobStatus.FAILED
    time.sleep(0.1)
    assert store.get("e") is None
