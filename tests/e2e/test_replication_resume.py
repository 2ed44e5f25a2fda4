"""Issue 13, the OMA half: the VMA agent (a real process) is SIGKILLed at about 50 % of a full and of an
incremental copy of two disks and started again; the OMA, following the job, finds the agent no longer
knows it and resumes it from the checkpoints it stored with the progress — same job, same snapshot, same
change-id base — without a new request. Measured on the target side: the bytes the OMA's NBD exports
(nbdkit) wrote after the kill, read from the kernel's per-process write counter (``wchar``).
"""
from __future__ import annotations

import contextlib
import os
import time

from oma.v1 import discovery_pb2
from oma.v1 import replications_pb2 as pb

from oma_server.db import models
from omaclient.client import OmaClient
from omalab.lab import start_lab
from omalab.resume_harness import snapshot_names
from tests.fixtures.servers import ADMIN_PASSWORD, start_oma
from tests.helpers.resume import (
    AGENT,
    SLACK,
    MiB,
    assert_replicas_equal,
    export_bytes_written,
    job_messages,
)


def _replicate_and_kill_vma(lab, context_id: str, kill_at: float = 45.0, while_down=None):
    """Start a replication, SIGKILL the agent once both disks have a stored checkpoint and the job is at
    ``kill_at`` %, keep it down 1.5 s (calling ``while_down()``, which may return another OMA's client to
    follow the job with), start it again and follow the job to its end (no new request)."""
    job_id = lab.client.replications.CreateReplication(
        pb.CreateReplicationRequest(context_id=context_id), timeout=30).job_id
    deadline, baseline = time.monotonic() + 120, None
    while True:
        assert time.monotonic() < deadline, "the job never reached the kill point"
        job = models.ReplicationJob.get_by_id(job_id)
        assert job.status in ("pending", "provisioning", "replicating"), job.error_message
        if job.status == "replicating" and baseline is None:
            baseline = export_bytes_written(job_id)
        disks = list(models.VmDisk.select().where(models.VmDisk.job == job_id))
        if baseline is not None and job.status == "replicating" and job.progress_percent >= kill_at and disks \
                and all(d.checkpoint_offset for d in disks):
            break
        time.sleep(0.05)
    lab.vma.kill()
    time.sleep(0.5)  # let the exports finish what the dead agent had sent
    at_kill = export_bytes_written(job_id)
    stored = {d.disk_id: d.checkpoint_offset for d in models.VmDisk.select().where(models.VmDisk.job == job_id)}
    killed_at = models.ReplicationJob.get_by_id(job_id)
    client = (while_down() if while_down else None) or lab.client
    time.sleep(1.5)
    # The VMA is down: the job waits for it instead of failing.
    assert models.ReplicationJob.get_by_id(job_id).status == "replicating"
    lab.vma.start()
    updates = list(client.watch_replication(job_id, timeout=180))
    final = updates[-1]
    # what omactl shows while it runs (its progress line is the job's current_operation)
    assert any("resumed at" in u.current_operation.lower() for u in updates), [u.current_operation for u in updates]
    # Exports served again by another OMA are new nbdkit processes: their counters start at zero.
    rewritten = export_bytes_written(job_id) - (0 if while_down else at_kill)
    return job_id, killed_at, stored, final, at_kill - baseline, rewritten


def test_vma_killed_mid_full_and_incremental_copy_the_job_resumes_and_completes(db, tmp_path):
    with start_lab(tmp_path, existing_database=db, vms=1, data_vms=1, vma_settings=AGENT, vma_process=True) as lab:
        vm = lab.vcenter.data_vms[0]
        context_id = lab.client.discovery.AddVMs(discovery_pb2.AddVMsRequest(
            source=discovery_pb2.VCenterSource(credential_id=lab.credential_id), vm_names=[vm]),
            timeout=60).processed_vms[0].context_id

        # --- full copy of two 64 MiB disks, agent killed at ~50 %. Random data everywhere, so every
        # byte is a data write the exports' write counter sees (zeroes would be punched, not written).
        for disk in range(2):
            lab.vcenter.guest_write(vm, disk, 0, os.urandom(64 * MiB))
        job_id, killed, stored, final, written, rewritten = _replicate_and_kill_vma(lab, context_id)
        assert final.status == "completed", final.error_message
        planned = killed.total_bytes
        assert planned == 2 * 64 * MiB and 40 <= killed.progress_percent < 90
        assert all(0 < c < 64 * MiB for c in stored.values()), stored
        # Resumed, not started over: the part already copied is (almost) not written again.
        assert written >= 40 * MiB and rewritten <= planned - written + SLACK, (written, rewritten)
        messages = job_messages(job_id)
        assert any("resumed at" in m and "the VMA no longer knows this job" in m for m in messages), messages
        assert any("the VMA resumed at" in m for m in messages), messages
        assert not [s for s in snapshot_names(lab.vcenter, vm) if s.startswith("srep-")]
        assert_replicas_equal(lab, vm, context_id)
        disks = list(models.VmDisk.select().where(models.VmDisk.vm_context == context_id))
        assert all(d.sync_status == "completed" and d.disk_change_id for d in disks)
        assert models.VmReplicationContext.get_by_id(context_id).current_job_id is None

        # --- incremental copy of 24 MiB changed per disk, agent killed at ~50 %
        for disk in range(2):
            for k in range(3):
                lab.vcenter.guest_write(vm, disk, (4 + 20 * k) * MiB, os.urandom(8 * MiB))
        job_id, killed, stored, final, written, rewritten = _replicate_and_kill_vma(lab, context_id)
        assert final.status == "completed", final.error_message
        job = models.ReplicationJob.get_by_id(job_id)
        assert job.replication_type == "incremental" and killed.total_bytes == 2 * 24 * MiB
        assert written >= 8 * MiB and rewritten <= killed.total_bytes - written + SLACK, (written, rewritten)
        assert any("resumed at" in m for m in job_messages(job_id))
        assert not [s for s in snapshot_names(lab.vcenter, vm) if s.startswith("srep-")]
        assert_replicas_equal(lab, vm, context_id)

        # --- the next incremental sends exactly the changed bytes: the CBT base survived the resume
        lab.vcenter.guest_write(vm, 1, 40 * MiB, os.urandom(MiB))
        job_id = lab.client.replications.CreateReplication(
            pb.CreateReplicationRequest(context_id=context_id), timeout=30).job_id
        final = list(lab.client.watch_replication(job_id, timeout=120))[-1]
        assert final.status == "completed", final.error_message
        assert models.ReplicationJob.get_by_id(job_id).bytes_transferred == MiB
        assert_replicas_equal(lab, vm, context_id)


def test_vma_killed_and_oma_restarted_while_it_is_down_the_new_oma_resumes_the_job(db, tmp_path):
    """The agent dies at ~50 % of a full copy; while it is down the OMA stops too and another OMA
    process starts on the same database: it takes the job over from the database (its exports served
    again on the same ports), finds the restarted agent no longer knows the job and resumes it from the
    checkpoints the first OMA stored."""
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(start_lab(tmp_path, existing_database=db, vms=1, data_vms=1, vma_settings=AGENT,
                                            vma_process=True))
        vm = lab.vcenter.data_vms[0]
        for disk in range(2):
            lab.vcenter.guest_write(vm, disk, 0, os.urandom(64 * MiB))
        context_id = lab.client.discovery.AddVMs(discovery_pb2.AddVMsRequest(
            source=discovery_pb2.VCenterSource(credential_id=lab.credential_id), vm_names=[vm]),
            timeout=60).processed_vms[0].context_id

        def restart_oma():
            settings = lab.oma.runtime.settings
            lab.oma.stop(grace=None)
            second = stack.enter_context(start_oma(tmp_path / "oma", db, **{k: getattr(settings, k) for k in (
                "vma_address", "device_dir", "device_wait_seconds", "replica_extra_gib", "nbd_port_min",
                "nbd_port_max")}))
            client = OmaClient(f"127.0.0.1:{second.port}", token="")
            stack.callback(client.close)
            client.login("admin", ADMIN_PASSWORD)
            return client

        job_id, killed, stored, final, written, rewritten = _replicate_and_kill_vma(
            lab, context_id, while_down=restart_oma)
        assert final.status == "completed", final.error_message
        assert all(0 < c < 64 * MiB for c in stored.values()), stored
        planned = killed.total_bytes
        assert written >= 40 * MiB and rewritten <= planned - written + SLACK, (written, rewritten)
        steps = [s.name for s in models.JobTracking.get(models.JobTracking.external_job_id == job_id).steps]
        assert steps[-3:] == ["restore-exports", "transfer", "finalize"]  # the new OMA's part
        assert any("resumed at" in m and "the VMA no longer knows this job" in m for m in job_messages(job_id))
        assert not [s for s in snapshot_names(lab.vcenter, vm) if s.startswith("srep-")]
        assert_replicas_equal(lab, vm, context_id)
        assert models.VmReplicationContext.get_by_id(context_id).current_job_id is None
