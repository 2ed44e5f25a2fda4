"""ReplicationService and ProgressService reads and writes around a real replication (mapping:
GET/PUT/DELETE /replications/{id}, GET /replications/changeid, POST /replications/{job_id}/changeid,
GET /replications/{job_id}/progress, GET /progress/{job_id} proxies the VMA)."""
from __future__ import annotations

import os

import grpc
import pytest
from oma.v1 import discovery_pb2
from oma.v1 import progress_pb2 as prog_pb
from oma.v1 import replications_pb2 as pb

from oma_server.db import models
from tests import factories


def _error(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


@pytest.fixture
def replicated(lab_private):
    """A lab whose first data VM has one completed full replication."""
    lab = lab_private
    added = lab.client.discovery.AddVMs(discovery_pb2.AddVMsRequest(
        source=discovery_pb2.VCenterSource(credential_id=lab.credential_id),
        vm_names=[lab.vcenter.data_vms[0]]), timeout=60)
    context_id = added.processed_vms[0].context_id
    job_id = lab.client.replications.CreateReplication(pb.CreateReplicationRequest(context_id=context_id), timeout=30).job_id
    assert list(lab.client.watch_replication(job_id, timeout=120))[-1].status == "completed"
    return lab, context_id, job_id


def test_get_list_and_progress(replicated):
    lab, context_id, job_id = replicated
    got = lab.client.replications.GetReplication(pb.GetReplicationRequest(job_id=job_id), timeout=10)
    assert got.job.status == "completed" and got.job.tracking_job_id
    assert sorted(d.disk_id for d in got.disks) == ["disk-2000", "disk-2001"]
    for disk in got.disks:  # each disk names its CloudStack replica and the device it is attached as
        volume = models.OsseaVolume.get(models.OsseaVolume.volume_id == disk.replica_volume_uuid)
        assert volume.id == disk.ossea_volume_id and disk.replica_device_path.endswith(
            "virtio-" + disk.replica_volume_uuid.replace("-", "")[:20])
    assert len(got.cbt_history) == 2 and all(c.sync_success and c.sync_type == "full" for c in got.cbt_history)
    assert all(p.sync_status == "completed" and p.change_id for p in got.disk_progress)

    listed = lab.client.replications.ListReplications(pb.ListReplicationsRequest(vm_context_id=context_id), timeout=10)
    assert [j.job_id for j in listed.jobs] == [job_id] and listed.count == 1
    assert lab.client.replications.ListReplications(pb.ListReplicationsRequest(
        statuses=["replication_failed"]), timeout=10).count == 0  # legacy alias of failed
    assert _error(lambda: lab.client.replications.ListReplications(pb.ListReplicationsRequest(
        statuses=["bogus"]), timeout=10))[0] == grpc.StatusCode.INVALID_ARGUMENT

    progress = lab.client.replications.GetReplicationProgress(pb.GetReplicationProgressRequest(job_id=job_id),
                                                              timeout=10).progress
    assert progress.terminal and progress.progress_percent == 100 and progress.vma_progress.sync_type == "full"
    assert not progress.vma_progress.is_live  # a finished job is never "live"
    assert progress.bytes_transferred > 0 and len(progress.disks) == 2

    # The progress proxy reads the VMA's own record and writes nothing.
    before = factories.db_snapshot()
    vma = lab.client.progress.GetVMAProgress(prog_pb.GetVMAProgressRequest(job_id=job_id), timeout=10).progress
    assert factories.db_snapshot() == before
    assert vma.job_id == job_id and vma.status == 3 and len(vma.disks) == 2  # JOB_STATUS_SUCCEEDED
    assert _error(lambda: lab.client.progress.GetVMAProgress(prog_pb.GetVMAProgressRequest(job_id="nope"),
                                                             timeout=10))[0] == grpc.StatusCode.NOT_FOUND
    assert _error(lambda: lab.client.replications.GetReplication(pb.GetReplicationRequest(job_id="nope"),
                                                                 timeout=10))[0] == grpc.StatusCode.NOT_FOUND


def test_change_ids_are_per_context_and_disk(replicated):
    lab, context_id, job_id = replicated
    disks = {d.disk_id: d for d in models.VmDisk.select().where(models.VmDisk.vm_context == context_id)}
    by_context = lab.client.replications.GetPreviousChangeID(pb.GetPreviousChangeIDRequest(
        vm_context_id=context_id, disk_id="disk-2001"), timeout=10)
    assert by_context.change_id == disks["disk-2001"].disk_change_id
    by_job = lab.client.replications.GetPreviousChangeID(pb.GetPreviousChangeIDRequest(
        job_id=job_id, disk_id="disk-2000"), timeout=10)
    assert by_job.change_id == disks["disk-2000"].disk_change_id != by_context.change_id
    ctx = models.VmReplicationContext.get_by_id(context_id)
    by_path = lab.client.replications.GetPreviousChangeID(pb.GetPreviousChangeIDRequest(
        vm_path=ctx.vm_path, disk_id="disk-2000"), timeout=10)
    assert by_path.change_id == by_job.change_id
    for request, code in ((pb.GetPreviousChangeIDRequest(vm_context_id=context_id), grpc.StatusCode.INVALID_ARGUMENT),
                          (pb.GetPreviousChangeIDRequest(vm_context_id=context_id, disk_id="disk-9"),
                           grpc.StatusCode.NOT_FOUND),
                          (pb.GetPreviousChangeIDRequest(disk_id="disk-2000"), grpc.StatusCode.INVALID_ARGUMENT)):
        assert _error(lambda: lab.client.replications.GetPreviousChangeID(request, timeout=10))[0] == code

    stored = lab.client.replications.StoreChangeID(pb.StoreChangeIDRequest(
        job_id=job_id, disk_id="disk-2001", change_id="52 aa bb/77", sync_type="incremental"), timeout=10)
    assert stored.change_id == "52 aa bb/77"
    assert models.VmDisk.get_by_id(disks["disk-2001"].id).disk_change_id == "52 aa bb/77"
    assert models.VmDisk.get_by_id(disks["disk-2000"].id).disk_change_id == disks["disk-2000"].disk_change_id
    rows = models.CbtHistory.select().where(models.CbtHistory.change_id == "52 aa bb/77").count()
    lab.client.replications.StoreChangeID(pb.StoreChangeIDRequest(
        job_id=job_id, disk_id="disk-2001", change_id="52 aa bb/77", sync_type="incremental"), timeout=10)
    assert models.CbtHistory.select().where(models.CbtHistory.change_id == "52 aa bb/77").count() == rows == 1
    before = models.CbtHistory.select().count()
    for request, code in ((pb.StoreChangeIDRequest(job_id=job_id, disk_id="disk-2999", change_id="52 aa bb cc/1"),
                           grpc.StatusCode.NOT_FOUND),  # never another disk's row
                          (pb.StoreChangeIDRequest(job_id=job_id, disk_id="disk-2000", change_id="garbage"),
                           grpc.StatusCode.INVALID_ARGUMENT),
                          (pb.StoreChangeIDRequest(job_id="nope", disk_id="disk-2000", change_id="52 aa bb cc/1"),
                           grpc.StatusCode.NOT_FOUND)):
        assert _error(lambda: lab.client.replications.StoreChangeID(request, timeout=10))[0] == code
    assert models.CbtHistory.select().count() == before


def test_a_replaced_volume_forces_a_full_copy(replicated):
    lab, context_id, job_id = replicated
    disk = models.VmDisk.get(models.VmDisk.vm_context == context_id, models.VmDisk.disk_id == "disk-2000")
    volume = models.OsseaVolume.get_by_id(disk.ossea_volume_id)
    # The replica volume vanishes from CloudStack (deleted by someone): a new one is created, the
    # stored change id no longer applies, so this disk alone is copied in full.
    lab.cloudstack.client().detachVolume(id=volume.volume_id)
    lab.cloudstack.wait_for_jobs(10)
    lab.cloudstack.client().deleteVolume(id=volume.volume_id)
    lab.vcenter.guest_write(lab.vcenter.data_vms[0], "disk-2001", 0, os.urandom(4096))
    job2 = lab.client.replications.CreateReplication(pb.CreateReplicationRequest(context_id=context_id), timeout=30).job_id
    assert list(lab.client.watch_replication(job2, timeout=120))[-1].status == "completed"
    history = {c.disk_id: c for c in models.CbtHistory.select().where(models.CbtHistory.job == job2)}
    assert history["disk-2000"].sync_type == "full" and history["disk-2001"].sync_type == "incremental"
    assert history["disk-2001"].bytes_transferred == 64 * 1024
    lab.oma.components.log_events.flush()
    tracking = models.JobTracking.get(models.JobTracking.external_job_id == job2)
    messages = [e.message for e in models.LogEvent.select().where(models.LogEvent.job == tracking.id)]
    assert any("disk-2000 has a new replica volume" in m and "this copy of the disk is full" in m for m in messages)
    assert any(m.startswith("disk disk-2000 was copied in full: no previous change id") for m in messages)
    new_volume = models.VmDisk.get_by_id(disk.id).ossea_volume_id
    assert new_volume != volume.id and not models.OsseaVolume.select().where(models.OsseaVolume.id == volume.id).exists()


def test_delete_keeps_disks_unless_volumes_go_too(replicated):
    lab, context_id, job_id = replicated
    code, msg = _error(lambda: lab.client.replications.DeleteReplication(
        pb.DeleteReplicationRequest(job_id="nope"), timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND
    deleted = lab.client.replications.DeleteReplication(pb.DeleteReplicationRequest(job_id=job_id), timeout=30)
    assert deleted.database_cleaned and deleted.volumes_deleted == 0 and deleted.nbd_exports_removed == 2
    disks = list(models.VmDisk.select().where(models.VmDisk.vm_context == context_id))
    assert len(disks) == 2 and all(d.job_id is None and d.disk_change_id for d in disks)  # change ids kept
    assert models.CbtHistory.select().count() == 0 and models.NbdExport.select().count() == 0
    assert models.OsseaVolume.select().count() == 2
    ctx = models.VmReplicationContext.get_by_id(context_id)
    assert (ctx.total_jobs_run, ctx.successful_jobs, ctx.last_successful_job_id) == (1, 1, None)
    tracking = models.JobTracking.get_by_id(deleted.deletion_tracking_id)
    assert (tracking.operation, tracking.status, tracking.context_id) == \
        ("delete-replication-job", "completed", context_id)

    # Replicate again, then delete with the volumes: CloudStack volumes, exports and change ids go.
    job2 = lab.client.replications.CreateReplication(pb.CreateReplicationRequest(context_id=context_id), timeout=30).job_id
    assert list(lab.client.watch_replication(job2, timeout=120))[-1].status == "completed"
    volume_ids = [v.volume_id for v in models.OsseaVolume.select()]
    removed = lab.client.replications.DeleteReplication(pb.DeleteReplicationRequest(job_id=job2, delete_volumes=True),
                                                         timeout=60)
    assert removed.volumes_deleted == 2 and not removed.volume_deletion_warning
    assert all(lab.cloudstack.get("volume", v) is None for v in volume_ids)
    assert models.OsseaVolume.select().count() == 0 and models.DeviceMapping.select().count() == 0
    assert all(d.disk_change_id is None and d.ossea_volume_id is None
               for d in models.VmDisk.select().where(models.VmDisk.vm_context == context_id))


def test_create_refusals_change_nothing(oma, oma_server, db):
    ctx = factories.context()
    factories.disk(ctx)
    cases = [
        (pb.CreateReplicationRequest(context_id=ctx.context_id), grpc.StatusCode.FAILED_PRECONDITION,
         "no CloudStack configuration"),
        (pb.CreateReplicationRequest(context_id="missing"), grpc.StatusCode.NOT_FOUND, "missing"),
        (pb.CreateReplicationRequest(), grpc.StatusCode.INVALID_ARGUMENT, "context_id"),
    ]
    for request, code, needle in cases:
        got, msg = _error(lambda: oma.replications.CreateReplication(request, timeout=10))
        assert got == code and needle in msg, (got, msg)
    models.OsseaConfig.create(name="c", api_url="http://x/client/api", api_key="enc:v1:AAAA",
                              secret_key="enc:v1:AAAA", zone="z")
    got, msg = _error(lambda: oma.replications.CreateReplication(
        pb.CreateReplicationRequest(context_id=ctx.context_id), timeout=10))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "oma_vm_id" in msg and "disk_offering_id" in msg
    models.OsseaConfig.update(oma_vm_id="vm", disk_offering_id="d").execute()
    got, msg = _error(lambda: oma.replications.CreateReplication(
        pb.CreateReplicationRequest(context_id=ctx.context_id), timeout=10))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "credential" in msg
    from oma_server.domain import credentials

    credentials.create(oma_server.runtime.secrets, credential_name="c", vcenter_host="vcenter.lab", username="u",
                       password="p", datacenter="DC0", is_default=True, created_by="t")
    # A failover still validating has not changed the context's status, but it owns the VM.
    models.FailoverJob.create(vm_context=ctx.context_id, job_id="failover-1", vm_id=ctx.vmware_vm_id,
                              job_type="test", status="validating", source_vm_name=ctx.vm_name)
    got, msg = _error(lambda: oma.replications.CreateReplication(
        pb.CreateReplicationRequest(context_id=ctx.context_id), timeout=10))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "test failover in progress (failover-1" in msg
    assert models.VmReplicationContext.get_by_id(ctx.context_id).current_job_id is None
    models.FailoverJob.update(status="failed").execute()
    models.VmReplicationContext.update(current_status="failed_over_live").execute()
    got, msg = _error(lambda: oma.replications.CreateReplication(
        pb.CreateReplicationRequest(context_id=ctx.context_id), timeout=10))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "failed_over_live" in msg
    assert models.ReplicationJob.select().count() == 0 and models.JobTracking.select().count() == 0
    assert models.VmReplicationContext.get_by_id(ctx.context_id).total_jobs_run == 0
