"""Replication end to end on the real parts: simulated vCenter (CBT, snapshots, raw disks), VMA data
mover (nbdkit + libnbd), CloudStack emulator (volumes as files, by-id devices), OMA on both databases.

Full copy → target checksums equal the source; guest writes → incremental copy sends exactly the
changed bytes (as CBT reports them) → checksums equal again."""
from __future__ import annotations

import os
import time

import grpc
import pytest
from oma.v1 import discovery_pb2
from oma.v1 import replications_pb2 as pb

from oma_server.db import models
from omalab.lab import sha256_prefix

BLOCK = 64 * 1024  # the simulator's CBT block size


def _add(lab, name):
    added = lab.client.discovery.AddVMs(discovery_pb2.AddVMsRequest(
        source=discovery_pb2.VCenterSource(credential_id=lab.credential_id), vm_names=[name]), timeout=60)
    assert added.vms_added == 1, added
    return added.processed_vms[0].context_id


def _replicate(lab, context_id, replication_type="", timeout=120):
    created = lab.client.replications.CreateReplication(pb.CreateReplicationRequest(
        context_id=context_id, replication_type=replication_type), timeout=30)
    assert created.status == "pending"
    updates = list(lab.client.watch_replication(created.job_id, timeout=timeout))
    assert updates and updates[-1].terminal
    return created, updates


def _checksums_match(lab, context_id):
    for disk in models.VmDisk.select().where(models.VmDisk.vm_context == context_id):
        volume = models.OsseaVolume.get_by_id(disk.ossea_volume_id)
        source = lab.vcenter.disk_file(lab_vm_name(context_id), disk.disk_id)
        capacity = os.path.getsize(source)
        assert sha256_prefix(lab.volume_file(volume.volume_id), capacity) == sha256_prefix(source, capacity), \
            disk.disk_id


def lab_vm_name(context_id):
    return models.VmReplicationContext.get_by_id(context_id).vm_name


def test_full_then_incremental_replication(lab_private):
    lab = lab_private
    vm = lab.vcenter.data_vms[0]
    context_id = _add(lab, vm)

    created, updates = _replicate(lab, context_id)
    final = updates[-1]
    assert final.status == "completed", final.error_message
    assert len(updates) >= 2 and any(u.status == "replicating" for u in updates)  # live progress was streamed
    job = models.ReplicationJob.get_by_id(created.job_id)
    assert (job.replication_type, job.progress_percent, job.vma_sync_type) == ("initial", 100, "full")
    assert job.started_at and job.completed_at and job.setup_progress_percent == 100
    ctx = models.VmReplicationContext.get_by_id(context_id)
    assert (ctx.current_status, ctx.current_job_id, ctx.successful_jobs, ctx.last_successful_job_id) == \
        ("ready_for_failover", None, 1, created.job_id)
    disks = list(models.VmDisk.select().where(models.VmDisk.vm_context == context_id))
    assert len(disks) == 2 and all(d.sync_status == "completed" and d.disk_change_id for d in disks)
    assert models.CbtHistory.select().where(models.CbtHistory.job == created.job_id).count() == 2
    assert models.OsseaVolume.select().count() == 2 and models.DeviceMapping.select().count() == 2
    assert models.NbdExport.select().where(models.NbdExport.status == "active").count() == 2
    # The agent wrote through TLS with the job's pre-shared key: nbdkit requires it (test_nbd_access).
    served = [lab.oma.components.exports.current(row.export_name) for row in models.NbdExport.select()]
    assert {export.tls.identity for export, _ in served} == {created.job_id}
    assert all("--tls=require" in argv and not any(export.tls.psk.hex() in a for a in argv)
               for export, argv in served)
    steps = [s.name for s in models.JobTracking.get(models.JobTracking.external_job_id == created.job_id).steps]
    assert steps == ["prepare-disks", "provision-volumes", "attach-volumes", "start-exports", "start-transfer",
                     "transfer", "finalize"]
    _checksums_match(lab, context_id)

    # Guest writes: scattered 4 KiB blocks on both disks, some in holes, some crossing a CBT block boundary.
    writes = {"disk-2000": [0, 5 * BLOCK + 100, 7 * BLOCK - 2048], "disk-2001": [3 * BLOCK, 900 * BLOCK]}
    changed_blocks = {}
    for disk_id, offsets in writes.items():
        blocks = set()
        for offset in offsets:
            lab.vcenter.guest_write(vm, disk_id, offset, os.urandom(4096))
            blocks |= {b for b in range(offset // BLOCK, (offset + 4096 - 1) // BLOCK + 1)}
        changed_blocks[disk_id] = len(blocks) * BLOCK

    created2, updates2 = _replicate(lab, context_id)
    assert updates2[-1].status == "completed", updates2[-1].error_message
    job2 = models.ReplicationJob.get_by_id(created2.job_id)
    assert job2.replication_type == "incremental" and job2.vma_sync_type == "incremental"
    history = {c.disk_id: c for c in models.CbtHistory.select().where(models.CbtHistory.job == created2.job_id)}
    for disk_id, expected in changed_blocks.items():
        assert history[disk_id].sync_type == "incremental"
        assert history[disk_id].bytes_transferred == expected, (disk_id, history[disk_id].bytes_transferred, expected)
        assert history[disk_id].previous_change_id
    assert job2.bytes_transferred == sum(changed_blocks.values())
    _checksums_match(lab, context_id)
    # The same volumes and exports were reused.
    assert models.OsseaVolume.select().count() == 2 and models.NbdExport.select().count() == 2
    ctx = models.VmReplicationContext.get_by_id(context_id)
    assert (ctx.successful_jobs, ctx.total_jobs_run, ctx.current_job_id) == (2, 2, None)


def test_a_second_replication_of_a_busy_vm_is_refused_atomically(lab_private):
    lab = lab_private
    context_id = _add(lab, lab.vcenter.data_vms[0])
    results = []

    def create():
        try:
            results.append(lab.client.replications.CreateReplication(
                pb.CreateReplicationRequest(context_id=context_id), timeout=30).job_id)
        except grpc.RpcError as exc:
            results.append(exc.code())

    import threading
    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    jobs = [r for r in results if isinstance(r, str)]
    assert len(jobs) == 1 and results.count(grpc.StatusCode.FAILED_PRECONDITION) == 3
    assert models.ReplicationJob.select().count() == 1
    updates = list(lab.client.watch_replication(jobs[0], timeout=120))
    assert updates[-1].status == "completed"


def test_cancel_releases_the_vm(lab_private):
    lab = lab_private
    context_id = _add(lab, lab.vcenter.data_vms[0])
    lab.cloudstack.set_job_delay(1.0, command="createVolume")  # keep the job in setup for a moment
    created = lab.client.replications.CreateReplication(pb.CreateReplicationRequest(context_id=context_id), timeout=30)
    time.sleep(0.3)
    lab.client.replications.CancelReplication(pb.CancelReplicationRequest(job_id=created.job_id, reason="test"),
                                              timeout=30)
    final = list(lab.client.watch_replication(created.job_id, timeout=60))[-1]
    assert final.status == "cancelled"
    ctx = models.VmReplicationContext.get_by_id(context_id)
    assert ctx.current_job_id is None and ctx.current_status == "discovered"
    with pytest.raises(grpc.RpcError) as err:
        lab.client.replications.CancelReplication(pb.CancelReplicationRequest(job_id=created.job_id), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_cbt_switched_off_forces_a_full_copy(lab_private):
    from vma_agent.integrations import vsphere

    lab = lab_private
    vm = lab.vcenter.data_vms[0]
    context_id = _add(lab, vm)
    assert _replicate(lab, context_id)[1][-1].status == "completed"
    session = vsphere.connect(vsphere.VCenterParams(lab.vcenter.address, lab.vcenter.username, lab.vcenter.password,
                                                    thumbprint=lab.vcenter.thumbprint_sha1))
    handle = session.find_vm(vsphere.VMRef(path=lab.vcenter.vm(vm)["path"]))
    session.set_change_tracking(handle, False)  # an administrator turns CBT off
    session.close()
    created, updates = _replicate(lab, context_id)
    assert updates[-1].status == "completed", updates[-1].error_message
    job = models.ReplicationJob.get_by_id(created.job_id)
    assert job.replication_type == "initial" and job.vma_sync_type == "full"
    history = list(models.CbtHistory.select().where(models.CbtHistory.job == created.job_id))
    assert len(history) == 2 and all(h.sync_type == "full" and not h.previous_change_id for h in history)
    steps = models.JobTracking.get(models.JobTracking.external_job_id == created.job_id).steps
    assert next(s for s in steps if s.name == "prepare-disks").metadata["change_ids_cleared"] == 2
    _checksums_match(lab, context_id)


def test_a_repeated_create_with_the_same_request_id_returns_the_same_job(lab_private):
    lab = lab_private
    context_id = _add(lab, lab.vcenter.data_vms[0])
    request = pb.CreateReplicationRequest(context_id=context_id, request_id="retry-after-timeout-1")
    first = lab.client.replications.CreateReplication(request, timeout=30)
    again = lab.client.replications.CreateReplication(request, timeout=30)
    assert again.job_id == first.job_id and models.ReplicationJob.select().count() == 1
    assert list(lab.client.watch_replication(first.job_id, timeout=120))[-1].status == "completed"
    assert lab.client.replications.CreateReplication(request, timeout=30).job_id == first.job_id
    other = lab.client.replications.CreateReplication(
        pb.CreateReplicationRequest(context_id=context_id, request_id="another"), timeout=30)
    assert other.job_id != first.job_id
    assert list(lab.client.watch_replication(other.job_id, timeout=120))[-1].status == "completed"
