"""A real vma-agent process killed (SIGKILL) at about 50 % of a copy of two disks, restarted, and the
job resumed from the last checkpoints the progress stream reported — for a full and for an
incremental copy — against the simulated vCenter and real nbdkit; measured on the target side.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import time

import grpc
import pytest
from vma.v1 import progress_pb2, progress_pb2_grpc, replication_pb2_grpc
from vma.v1 import replication_pb2 as pb

from omalab.resume_harness import Target, follow, kill_and_resume, start_request
from omalab.resume_harness import snapshot_names as snapshots
from omalab.vma_process import AUTH, VmaProcess
from tests.fixtures.nbd import file_sha256
from tests.fixtures.servers import start_vma
from vma_agent.integrations.nbdkit import NbdkitServer

MiB = 1024 * 1024
DISK = 48 * MiB
CHECKPOINT_MIB = 2
# What may be rewritten beyond the uncopied part: one checkpoint interval per disk (the copier
# never writes further than that beyond its last checkpoint), plus one request (2 MiB) at its edge.
SLACK = 2 * (CHECKPOINT_MIB * MiB + 2 * MiB)


@pytest.fixture
def rig(vcsim_factory, tmp_path):
    sim = vcsim_factory(vms=1, disks=2, disk_size=f"{DISK // MiB}MiB", data_vms=1)
    vm = sim.data_vms[0]
    targets = [Target.create(tmp_path, 2000 + i, DISK) for i in range(2)]
    datastores = ",".join(f"{k}={v}" for k, v in sim.datastores.items())
    # ~2.5 MB/s per disk: about 8 s for a disk's data, so 50 % is reachable
    agent = VmaProcess(tmp_path / "vma", datastore_map=datastores, source_rate_limit_mbps=20,
                       checkpoint_interval_mib=CHECKPOINT_MIB, checkpoint_interval_seconds=1,
                       progress_interval_seconds=0.2, connections_per_disk=1)
    agent.start()
    yield sim, vm, targets, agent
    agent.stop()
    for t in targets:
        t.server.stop()


def assert_replicas_equal(sim, vm, targets):
    for i, t in enumerate(targets):
        assert file_sha256(t.path) == file_sha256(sim.disk_file(vm, i)), f"disk-{t.disk_key} differs"


def test_agent_killed_mid_full_and_incremental_copy_resumes(rig):
    sim, vm, targets, agent = rig

    # --- full copy, killed at ~50 %
    full = kill_and_resume(agent, start_request(sim, vm, "job-full", targets), targets)
    assert full.final.status == progress_pb2.JOB_STATUS_SUCCEEDED, full.final.last_error
    assert 40 <= full.killed_at_percent < 90
    assert all(0 < c < DISK for c in full.checkpoints.values()), full.checkpoints
    assert full.final.resume_summary.startswith("resumed at ")
    assert all(d.resumed_from_offset == full.checkpoints[d.disk_id] for d in full.final.disks)
    assert full.rewritten_after_restart <= full.uncopied + SLACK, full
    assert full.resume_seconds <= 10, full
    assert_replicas_equal(sim, vm, targets)
    assert not [s for s in snapshots(sim, vm) if s.startswith("srep-")]
    change_ids = {int(d.disk_id.removeprefix("disk-")): d.change_id for d in full.final.disks}
    assert all(change_ids.values())

    # --- incremental copy of 12 MiB changed per disk, killed at ~50 %
    for i in range(2):
        for k in range(3):
            sim.guest_write(vm, i, (4 + 12 * k) * MiB, os.urandom(4 * MiB))
    inc = kill_and_resume(agent, start_request(sim, vm, "job-inc", targets, change_ids), targets)
    assert inc.final.status == progress_pb2.JOB_STATUS_SUCCEEDED, inc.final.last_error
    assert {d.sync_type for d in inc.final.disks} == {"incremental"}
    assert inc.planned == 2 * 12 * MiB
    assert inc.rewritten_after_restart <= inc.uncopied + SLACK, inc
    assert_replicas_equal(sim, vm, targets)
    assert not [s for s in snapshots(sim, vm) if s.startswith("srep-")]

    # --- the next incremental sends exactly the changed bytes (the CBT base was kept)
    change_ids = {int(d.disk_id.removeprefix("disk-")): d.change_id for d in inc.final.disks}
    sim.guest_write(vm, 1, 40 * MiB, os.urandom(MiB))
    before = len(targets[1].writes())
    agent.replication().StartReplication(start_request(sim, vm, "job-next", targets, change_ids),
                                         metadata=AUTH, timeout=60)
    final = follow(agent, "job-next")
    assert final.status == progress_pb2.JOB_STATUS_SUCCEEDED, final.last_error
    assert sum(n for _, _, n in targets[1].writes()[before:]) == MiB
    assert_replicas_equal(sim, vm, targets)


def test_interrupted_job_is_listed_and_its_snapshot_kept_then_removed(rig):
    sim, vm, targets, agent = rig
    request = start_request(sim, vm, "job-crashed", targets)
    agent.replication().StartReplication(request, metadata=AUTH, timeout=60)
    at_kill = follow(agent, "job-crashed", until_percent=30)
    agent.kill()
    agent.start()
    jobs = agent.replication().ListInterruptedJobs(pb.ListInterruptedJobsRequest(), metadata=AUTH, timeout=10).jobs
    assert [j.job_id for j in jobs] == ["job-crashed"]
    job = jobs[0]
    assert (job.snapshot_moref, job.snapshot_name, job.expired) == (at_kill.snapshot_moref, "srep-job-crashed", False)
    reported = {d.disk_id: d.checkpoint_offset for d in at_kill.disks}
    # the journal is written with every checkpoint the stream reports (it may be one ahead)
    assert all(d.checkpoint_offset >= reported[d.disk_id] for d in job.disks)
    assert "password" not in str(job).lower() and sim.password not in str(job)
    assert "srep-job-crashed" in snapshots(sim, vm)  # kept for a resume

    # a resume naming a snapshot that is gone: each disk starts again from 0, with the reason
    resume = pb.StartReplicationRequest()
    resume.CopyFrom(request)
    resume.resume_snapshot.moref = "snapshot-does-not-exist"
    for d in resume.disks:
        d.resume_offset = reported[d.disk_id]
    agent.replication().StartReplication(resume, metadata=AUTH, timeout=60)
    final = follow(agent, "job-crashed")
    assert final.status == progress_pb2.JOB_STATUS_SUCCEEDED, final.last_error
    assert all("is gone" in d.full_copy_reason and d.resumed_from_offset == 0 for d in final.disks)
    assert_replicas_equal(sim, vm, targets)
    # the new run's snapshot was removed; the old one was removed as a stale srep-* of this VM
    assert not [s for s in snapshots(sim, vm) if s.startswith("srep-")]
    assert not agent.replication().ListInterruptedJobs(pb.ListInterruptedJobsRequest(), metadata=AUTH).jobs


def test_resume_offset_without_snapshot_is_refused(rig):
    sim, vm, targets, agent = rig
    request = start_request(sim, vm, "job-bad", targets)
    request.disks[0].resume_offset = MiB
    with pytest.raises(grpc.RpcError) as err:
        agent.replication().StartReplication(request, metadata=AUTH, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "resume_snapshot" in err.value.details()
    assert hashlib.sha256(targets[0].path.read_bytes()).hexdigest() == file_sha256(targets[0].path)
    assert not targets[0].writes()


@pytest.mark.parametrize("keepalive", [0.5, 60.0])
def test_long_copy_outlives_the_vcenter_session_timeout(vcsim_factory, tmp_path, keepalive):
    """The simulator logs idle sessions out after 1.5 s; the copy takes several seconds. With the
    keep-alive shorter than that the one login lasts the whole job; without it the agent logs in
    again when vCenter says NotAuthenticated. Either way the job completes and its snapshot goes."""
    sim = vcsim_factory(vms=1, disks=1, disk_size="48MiB", data_vms=1, session_idle_timeout=1.5)
    vm = sim.data_vms[0]
    target = Target.create(tmp_path, 2000, 48 * MiB)
    datastores = ",".join(f"{k}={v}" for k, v in sim.datastores.items())
    try:
        with start_vma(work_dir=tmp_path / "vma", source_mode="file", datastore_map=datastores,
                       source_rate_limit_mbps=8, vcenter_keepalive_seconds=keepalive,
                       progress_interval_seconds=0.2) as agent:
            channel = grpc.insecure_channel(f"127.0.0.1:{agent.port}")
            t0 = time.monotonic()
            replication_pb2_grpc.ReplicationServiceStub(channel).StartReplication(
                start_request(sim, vm, f"job-session-{keepalive}", [target]), metadata=AUTH, timeout=60)
            final = None
            for msg in progress_pb2_grpc.ProgressServiceStub(channel).WatchProgress(
                    progress_pb2.WatchProgressRequest(job_id=f"job-session-{keepalive}"), metadata=AUTH, timeout=300):
                final = msg.progress
            elapsed = time.monotonic() - t0
            channel.close()
            sessions = agent.parts.sessions
            logins = sum(s.logins for s in sessions._sessions.values())
    finally:
        target.server.stop()
    assert final.status == progress_pb2.JOB_STATUS_SUCCEEDED, final.last_error
    assert elapsed > 3 * 1.5  # the job outlived the session timeout several times
    assert logins == 1 if keepalive < 1.5 else logins >= 2
    assert file_sha256(target.path) == file_sha256(sim.disk_file(vm, 0))
    assert not [s for s in snapshots(sim, vm) if s.startswith("srep-")]


def test_target_nbd_server_cut_mid_disk_and_back_completes(rig):
    """The replica's NBD server dies mid-disk and comes back 3 s later on the same socket (as the
    OMA serves its exports again after a restart): the copy reconnects with back-off and completes."""
    sim, vm, targets, agent = rig
    agent.replication().StartReplication(start_request(sim, vm, "job-cut", targets), metadata=AUTH, timeout=60)
    follow(agent, "job-cut", until_percent=30)
    cut = targets[1]
    cut.server.kill()
    time.sleep(3)
    # (the dead server object must outlive the test: dropping it removes its socket's folder)
    dead, cut.server = cut.server, NbdkitServer(cut.server.plugin, socket_path=cut.server.socket_path)
    cut.server.start()
    final = follow(agent, "job-cut")
    dead.stop()
    assert final.status == progress_pb2.JOB_STATUS_SUCCEEDED, final.last_error
    assert cut.writes()  # the copy went on into the new server (its log filter starts a new log)
    assert_replicas_equal(sim, vm, targets)
    assert not [s for s in snapshots(sim, vm) if s.startswith("srep-")]


def test_appliance_restart_keeps_the_job_resumable(rig):
    """A graceful stop (SIGTERM, as at an appliance restart) cancels the copy but keeps the snapshot
    and the journal: after the restart the job is listed and resumes from its checkpoints."""
    sim, vm, targets, agent = rig
    request = start_request(sim, vm, "job-restart", targets)
    agent.replication().StartReplication(request, metadata=AUTH, timeout=60)
    follow(agent, "job-restart", until_percent=30)
    agent.stop()
    agent.start()
    jobs = agent.replication().ListInterruptedJobs(pb.ListInterruptedJobsRequest(), metadata=AUTH, timeout=10).jobs
    assert [j.job_id for j in jobs] == ["job-restart"] and "srep-job-restart" in snapshots(sim, vm)
    resume = pb.StartReplicationRequest()
    resume.CopyFrom(request)
    resume.resume_snapshot.moref, resume.resume_snapshot.name = jobs[0].snapshot_moref, jobs[0].snapshot_name
    offsets = {d.disk_id: d.checkpoint_offset for d in jobs[0].disks}
    assert all(offsets.values())
    for d in resume.disks:
        d.resume_offset = offsets[d.disk_id]
    agent.replication().StartReplication(resume, metadata=AUTH, timeout=60)
    final = follow(agent, "job-restart")
    assert final.status == progress_pb2.JOB_STATUS_SUCCEEDED, final.last_error
    assert final.resume_summary.startswith("resumed at ")
    assert_replicas_equal(sim, vm, targets)
    assert not [s for s in snapshots(sim, vm) if s.startswith("srep-")]
    assert not agent.replication().ListInterruptedJobs(pb.ListInterruptedJobsRequest(), metadata=AUTH).jobs


def test_leftover_snapshots_expire_and_are_removed_by_age(rig):
    sim, vm, targets, agent = rig
    agent.replication().StartReplication(start_request(sim, vm, "job-old", targets), metadata=AUTH, timeout=60)
    follow(agent, "job-old", until_percent=20)
    agent.kill()
    agent.settings["leftover_snapshot_max_age_seconds"] = 1
    agent.start()
    time.sleep(1.5)
    stub = agent.replication()
    jobs = stub.ListInterruptedJobs(pb.ListInterruptedJobsRequest(), metadata=AUTH, timeout=10).jobs
    assert [(j.job_id, j.expired) for j in jobs] == [("job-old", True)]
    request = start_request(sim, vm, "unused", targets)
    cleanup = pb.CleanupSnapshotsRequest(connection=request.connection, vm=request.vm, job_id="job-old",
                                         older_than_seconds=3600)
    assert list(stub.CleanupSnapshots(cleanup, metadata=AUTH, timeout=60).removed_snapshots) == []
    assert "srep-job-old" in snapshots(sim, vm)  # younger than an hour: kept
    cleanup.older_than_seconds = 1
    assert list(stub.CleanupSnapshots(cleanup, metadata=AUTH, timeout=60).removed_snapshots) == ["srep-job-old"]
    assert not [s for s in snapshots(sim, vm) if s.startswith("srep-")]
    assert not stub.ListInterruptedJobs(pb.ListInterruptedJobsRequest(), metadata=AUTH, timeout=10).jobs
    cleanup.older_than_seconds = -1
    with pytest.raises(grpc.RpcError) as err:
        stub.CleanupSnapshots(cleanup, metadata=AUTH, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_quiet_progress_stream_survives_client_keepalive_pings(tmp_path):
    """A WatchProgress stream with nothing to say for seconds while the client pings every 0.3 s
    (as the OMA pings during a multi-hour copy, scaled down): the agent accepts the pings (gRPC's
    default would answer GOAWAY "too_many_pings" and kill the stream) and the stream goes on."""
    with start_vma(work_dir=tmp_path / "vma", grpc_min_client_ping_seconds=0.2) as agent:
        channel = grpc.insecure_channel(f"127.0.0.1:{agent.port}", options=[
            ("grpc.keepalive_time_ms", 300), ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0), ("grpc.http2.min_time_between_pings_ms", 300)])
        progress = progress_pb2_grpc.ProgressServiceStub(channel)
        progress.UpdateProgress(progress_pb2.UpdateProgressRequest(
            job_id="quiet", status=progress_pb2.JOB_STATUS_RUNNING), metadata=AUTH, timeout=10)
        stream = progress.WatchProgress(progress_pb2.WatchProgressRequest(job_id="quiet"), metadata=AUTH, timeout=60)
        first = next(stream)
        time.sleep(4)  # quiet: no update, only pings
        progress.UpdateProgress(progress_pb2.UpdateProgressRequest(
            job_id="quiet", status=progress_pb2.JOB_STATUS_SUCCEEDED), metadata=AUTH, timeout=10)
        rest = list(stream)
        channel.close()
    assert first.progress.status == progress_pb2.JOB_STATUS_RUNNING
    assert rest[-1].progress.status == progress_pb2.JOB_STATUS_SUCCEEDED


def test_source_nbdkit_killed_mid_disk_is_restarted_and_the_copy_completes(rig):
    """The nbdkit serving a source disk dies mid-copy (as a vddk plugin crash would): the agent starts
    it again on the same socket and the copy reconnects and completes."""
    sim, vm, targets, agent = rig
    agent.replication().StartReplication(start_request(sim, vm, "job-src", targets), metadata=AUTH, timeout=60)
    follow(agent, "job-src", until_percent=30)
    children = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(agent.proc.pid)], capture_output=True,
                              text=True, check=True).stdout.splitlines()
    sources = [int(line.split()[0]) for line in children if "nbdkit" in line and "-r" in line.split()]
    assert len(sources) == 2, children
    os.kill(sources[0], 9)
    final = follow(agent, "job-src")
    assert final.status == progress_pb2.JOB_STATUS_SUCCEEDED, final.last_error
    assert_replicas_equal(sim, vm, targets)
    log = (agent.work_dir / "agent.log").read_text()
    assert "exited" in log and "starting it again" in log
