"""Issue 13, the crashes the VMA-only tests do not cover: the OMA (a real ``oma-server`` process) SIGKILLed at
about 50 % of a full and of an incremental copy of two disks, and the OMA and the VMA SIGKILLed together.

When only the OMA dies its NBD exports die with it (nbdkit runs with --exit-with-parent): the VMA keeps the job,
its copy loses the target connections and retries from its last checkpoint; the restarted OMA (same instance
name) takes its job back at start, serves the exports again on the same ports and follows the job to its end.
When both die nothing runs the copy: the restarted OMA finds the restarted VMA no longer knows the job and resumes
it from the checkpoints it stored. Either way no new request is made. The bytes rewritten are measured on the
target side, as in ``test_replication_resume.py``: the new nbdkit processes' write counters start at zero.
"""
from __future__ import annotations

import os
import time

from oma.v1 import discovery_pb2
from oma.v1 import replications_pb2 as pb

from oma_server.db import models
from omalab.lab import start_lab
from omalab.resume_harness import snapshot_names
from omalab.servers import ADMIN_PASSWORD
from tests.helpers.resume import AGENT, SLACK, assert_replicas_equal, export_bytes_written, job_messages

MiB = 1024 * 1024


def _replicate_and_kill(lab, context_id: str, *, kill_vma: bool, kill_at: float = 45.0):
    """Start a replication, SIGKILL the OMA (and the VMA with ``kill_vma``) once both disks have a stored
    checkpoint and the job is at ``kill_at`` %, keep them down 1.5 s, start them again and follow the job to
    its end through the restarted OMA, without any new request."""
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
    at_kill = export_bytes_written(job_id)  # read before the kill: the exports die with the OMA
    lab.oma.kill()
    if kill_vma:
        lab.vma.kill()
    stored = {d.disk_id: d.checkpoint_offset for d in models.VmDisk.select().where(models.VmDisk.job == job_id)}
    killed_at = models.ReplicationJob.get_by_id(job_id)
    time.sleep(1.5)
    # Nobody ended the job: it is still replicating in the database while both are down.
    assert models.ReplicationJob.get_by_id(job_id).status == "replicating"
    if kill_vma:
        lab.vma.start()
    lab.oma.start()
    lab.client.login("admin", ADMIN_PASSWORD)
    updates = list(lab.client.watch_replication(job_id, timeout=180))
    return job_id, killed_at, stored, updates, at_kill - baseline, export_bytes_written(job_id)


def _lab(db, db_url, tmp_path):
    return start_lab(tmp_path, existing_database=db, db_url=db_url, vms=1, data_vms=1, vma_settings=AGENT,
                     vma_process=True, oma_process=True)


def _add_vm(lab, vm: str) -> str:
    return lab.client.discovery.AddVMs(discovery_pb2.AddVMsRequest(
        source=discovery_pb2.VCenterSource(credential_id=lab.credential_id), vm_names=[vm]),
        timeout=60).processed_vms[0].context_id


def _next_incremental_is_exact(lab, vm: str, context_id: str) -> None:
    lab.vcenter.guest_write(vm, 1, 40 * MiB, os.urandom(MiB))
    job_id = lab.client.replications.CreateReplication(
        pb.CreateReplicationRequest(context_id=context_id), timeout=30).job_id
    final = list(lab.client.watch_replication(job_id, timeout=120))[-1]
    assert final.status == "completed", final.error_message
    assert models.ReplicationJob.get_by_id(job_id).bytes_transferred == MiB
    assert_replicas_equal(lab, vm, context_id)


def test_oma_killed_mid_full_and_incremental_copy_the_restarted_oma_completes_the_job(db, db_url, tmp_path):
    with _lab(db, db_url, tmp_path) as lab:
        vm = lab.vcenter.data_vms[0]
        context_id = _add_vm(lab, vm)
        # Random data everywhere, so every byte is a data write the exports' write counter sees.
        for disk in range(2):
            lab.vcenter.guest_write(vm, disk, 0, os.urandom(64 * MiB))
        job_id, killed, stored, updates, written, rewritten = _replicate_and_kill(lab, context_id, kill_vma=False)
        assert updates[-1].status == "completed", updates[-1].error_message
        planned = killed.total_bytes
        assert planned == 2 * 64 * MiB and 40 <= killed.progress_percent < 90
        assert all(0 < c < 64 * MiB for c in stored.values()), stored
        assert written >= 40 * MiB and rewritten <= planned - written + SLACK, (written, rewritten)
        steps = [s.name for s in models.JobTracking.get(models.JobTracking.external_job_id == job_id).steps]
        assert steps[-3:] == ["restore-exports", "transfer", "finalize"]  # the restarted OMA's part
        assert not [s for s in snapshot_names(lab.vcenter, vm) if s.startswith("srep-")]
        assert_replicas_equal(lab, vm, context_id)
        disks = list(models.VmDisk.select().where(models.VmDisk.vm_context == context_id))
        assert all(d.sync_status == "completed" and d.disk_change_id for d in disks)
        assert models.VmReplicationContext.get_by_id(context_id).current_job_id is None

        for disk in range(2):
            for k in range(3):
                lab.vcenter.guest_write(vm, disk, (4 + 20 * k) * MiB, os.urandom(8 * MiB))
        job_id, killed, stored, updates, written, rewritten = _replicate_and_kill(lab, context_id, kill_vma=False)
        assert updates[-1].status == "completed", updates[-1].error_message
        assert models.ReplicationJob.get_by_id(job_id).replication_type == "incremental"
        assert killed.total_bytes == 2 * 24 * MiB
        assert written >= 8 * MiB and rewritten <= killed.total_bytes - written + SLACK, (written, rewritten)
        assert not [s for s in snapshot_names(lab.vcenter, vm) if s.startswith("srep-")]
        assert_replicas_equal(lab, vm, context_id)

        _next_incremental_is_exact(lab, vm, context_id)


def test_oma_and_vma_killed_together_mid_full_and_incremental_copy_the_job_resumes(db, db_url, tmp_path):
    with _lab(db, db_url, tmp_path) as lab:
        vm = lab.vcenter.data_vms[0]
        context_id = _add_vm(lab, vm)
        for disk in range(2):
            lab.vcenter.guest_write(vm, disk, 0, os.urandom(64 * MiB))
        job_id, killed, stored, updates, written, rewritten = _replicate_and_kill(lab, context_id, kill_vma=True)
        assert updates[-1].status == "completed", updates[-1].error_message
        planned = killed.total_bytes
        assert planned == 2 * 64 * MiB and 40 <= killed.progress_percent < 90
        assert all(0 < c < 64 * MiB for c in stored.values()), stored
        # Resumed from the stored checkpoints, not started over.
        assert written >= 40 * MiB and rewritten <= planned - written + SLACK, (written, rewritten)
        assert any("resumed at" in u.current_operation.lower() for u in updates), [u.current_operation for u in updates]
        assert any("resumed at" in m and "the VMA no longer knows this job" in m for m in job_messages(job_id))
        assert not [s for s in snapshot_names(lab.vcenter, vm) if s.startswith("srep-")]
        assert_replicas_equal(lab, vm, context_id)

        for disk in range(2):
            for k in range(3):
                lab.vcenter.guest_write(vm, disk, (4 + 20 * k) * MiB, os.urandom(8 * MiB))
        job_id, killed, stored, updates, written, rewritten = _replicate_and_kill(lab, context_id, kill_vma=True)
        assert updates[-1].status == "completed", updates[-1].error_message
        assert models.ReplicationJob.get_by_id(job_id).replication_type == "incremental"
        assert killed.total_bytes == 2 * 24 * MiB
        assert written >= 8 * MiB and rewritten <= killed.total_bytes - written + SLACK, (written, rewritten)
        assert any("resumed at" in m for m in job_messages(job_id))
        assert not [s for s in snapshot_names(lab.vcenter, vm) if s.startswith("srep-")]
        assert_replicas_equal(lab, vm, context_id)

        _next_incremental_is_exact(lab, vm, context_id)


def _nbdkit_pid(export_name: str) -> int:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"nbdkit") and any(export_name.encode() in a for a in argv):
            return int(pid)
    raise AssertionError(f"no nbdkit serves {export_name}")


def test_nbd_export_killed_mid_disk_is_served_again_and_the_copy_completes(db, tmp_path):
    """The NBD connection cut mid-disk through the whole stack: the nbdkit serving one disk's export dies
    (SIGKILL) at ~50 % of a full copy; the OMA serves the export again on the same port, the agent rewinds that
    disk to its checkpoint and reconnects; the job completes without a new request, replicas equal."""
    with start_lab(tmp_path, existing_database=db, vms=1, data_vms=1, vma_settings=AGENT) as lab:
        vm = lab.vcenter.data_vms[0]
        context_id = _add_vm(lab, vm)
        for disk in range(2):
            lab.vcenter.guest_write(vm, disk, 0, os.urandom(64 * MiB))
        job_id = lab.client.replications.CreateReplication(
            pb.CreateReplicationRequest(context_id=context_id), timeout=30).job_id
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, "the job never reached the kill point"
            job = models.ReplicationJob.get_by_id(job_id)
            assert job.status in ("pending", "provisioning", "replicating"), job.error_message
            if job.status == "replicating" and job.progress_percent >= 40:
                break
            time.sleep(0.05)
        export = models.NbdExport.select().where(models.NbdExport.job == job_id).order_by(models.NbdExport.id).first()
        old_pid = _nbdkit_pid(export.export_name)
        os.kill(old_pid, 9)
        final = list(lab.client.watch_replication(job_id, timeout=180))[-1]
        assert final.status == "completed", final.error_message
        # served again by a new nbdkit on the port the agent writes to
        assert _nbdkit_pid(export.export_name) != old_pid
        assert models.NbdExport.get_by_id(export.id).port == export.port
        assert not [s for s in snapshot_names(lab.vcenter, vm) if s.startswith("srep-")]
        assert_replicas_equal(lab, vm, context_id)
