"""Failover end to end on the real parts (simulated vCenter, VMA, CloudStack emulator, OMA on both
databases): a test failover and its end, a live failover (power-off, final sync) and its rollback."""
from __future__ import annotations

import os

import grpc
import pytest
from oma.v1 import failover_pb2 as fpb
from oma.v1 import replications_pb2 as rpb

from oma_server.db import models
from oma_server.domain import network_mappings
from tests.helpers.failover import (
    CLEANUP_STEPS,
    FAILOVER_STEPS,
    assert_back_on_oma,
    disk_volumes,
    power_state,
    prepared_vm,
    replicate,
    start_test,
    status_moves,
    steps,
    watch,
)

LIFECYCLE = ["validating", "snapshotting", "creating_vm", "switching_volume", "powering_on", "completed"]


# --- tests ---------------------------------------------------------------------------------------------

def test_test_failover_then_end_test_restores_everything(lab_private):
    lab = lab_private
    ctx = prepared_vm(lab)
    sources = network_mappings.source_networks(ctx.context_id)
    (os_disk, os_volume), (data_disk, data_volume) = disk_volumes(ctx)

    started = start_test(lab, ctx, request_id="req-1")
    # Ids and rows exist the moment the call returns.
    assert started.job_id == started.failover_job_id and started.status == "pending" and not started.existing
    assert started.external_job_id.startswith(f"unified-test-failover-{ctx.vm_name}-") and len(started.external_job_id) <= 64
    assert models.FailoverJob.get(models.FailoverJob.job_id == started.job_id).job_type == "test"
    assert models.JobTracking.get_by_id(started.job_id).external_job_id == started.external_job_id
    config = started.configuration
    assert (config.vm_naming, config.network_strategy, config.snapshot_type) == ("suffixed", "custom", "cloudstack")
    assert config.destination_name.startswith(f"{ctx.vm_name}-test-") and set(config.network_mappings) == set(sources)
    again = start_test(lab, ctx, request_id="req-1")
    assert again.existing and again.job_id == started.job_id

    messages = watch(lab, started.job_id)
    final = messages[-1]
    assert final.job.status == "completed", final.job.error_message
    assert final.failover_job.status == "completed" and final.failover_job.progress == 100
    seen = [m.failover_job.status for m in messages]
    assert [s for s in LIFECYCLE if s in seen] == [s for s in dict.fromkeys(seen) if s in LIFECYCLE]  # in order
    assert status_moves(started.job_id) == LIFECYCLE
    assert [(s.name, s.status) for s in final.job.steps] == steps(started.job_id)
    assert [name for name, _ in steps(started.job_id)] == FAILOVER_STEPS
    statuses = dict(steps(started.job_id))
    assert statuses["source-vm-power-off"] == statuses["final-sync"] == "skipped"
    assert statuses["virtio-driver-injection"] == "skipped"  # no injection command configured: never faked
    assert all(statuses[n] == "completed" for n in FAILOVER_STEPS if n not in
               ("source-vm-power-off", "final-sync", "virtio-driver-injection"))

    record = models.FailoverJob.get(models.FailoverJob.job_id == started.job_id)
    vm = lab.cloudstack.get("vm", record.destination_vm_id)
    assert vm["state"] == "Running" and vm["displayname"] == config.destination_name
    assert vm["name"] == config.destination_hostname and len(vm["name"]) <= 63
    adapters = [n["network_name"] for n in os_disk.network_config]  # adapter order
    assert [n["networkid"] for n in vm["nic"]] == [config.network_mappings[s] for s in adapters]  # one NIC each
    root = lab.cloudstack.get("volume", os_volume.volume_id)
    data = lab.cloudstack.get("volume", data_volume.volume_id)
    assert (root["virtualmachineid"], root["deviceid"], root["type"]) == (vm["id"], 0, "ROOT")
    assert (data["virtualmachineid"], data["deviceid"]) == (vm["id"], 1)
    on_vm = {v.id for v in lab.cloudstack.state.volumes.values() if v.vm_id == vm["id"]}
    assert on_vm == {os_volume.volume_id, data_volume.volume_id}  # the template's root disk was removed
    for _, volume in disk_volumes(ctx):
        mapping = models.DeviceMapping.get(models.DeviceMapping.volume_uuid == volume.volume_id)
        assert (mapping.vm_id, mapping.operation_mode) == (vm["id"], "failover")
        assert mapping.device_path == f"remote-vm-{vm['id']}-{volume.volume_id}"
        assert volume.snapshot_status == "ready" and lab.cloudstack.get("snapshot", volume.snapshot_id)
        assert not lab.oma.components.exports.alive(f"migration-vol-{volume.volume_id}")
    ctx_row = models.VmReplicationContext.get_by_id(ctx.context_id)
    assert ctx_row.current_status == "failed_over_test"
    assert ctx_row.last_operation_summary["operation_type"] == "test_failover"
    assert ctx_row.last_operation_summary["status"] == "completed"
    with pytest.raises(grpc.RpcError) as refused:
        lab.client.replications.CreateReplication(rpb.CreateReplicationRequest(context_id=ctx.context_id), timeout=30)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # Reads: by external id, the list, the record's progress.
    status = lab.client.failover.GetFailoverStatus(fpb.GetFailoverStatusRequest(job_id=started.external_job_id), timeout=10)
    assert (status.job_id, status.status, status.progress, status.tracking_source) == \
        (started.job_id, "completed", 100, "job_tracking")
    listed = lab.client.failover.ListFailoverJobs(fpb.ListFailoverJobsRequest(context_id=ctx.context_id), timeout=10)
    assert [j.job_id for j in listed.failover_jobs] == [started.job_id] and listed.failover_jobs[0].progress == 100

    # The test VM writes into its disk: the end of the test must give the replica its bytes back.
    volume_file = lab.volume_file(os_volume.volume_id)
    with open(volume_file, "rb") as f:
        original = f.read(8192)
    fd = os.open(volume_file, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(8192), 0)
    finally:
        os.close(fd)

    ended = lab.client.failover.EndTestFailover(fpb.EndTestFailoverRequest(job_id=started.job_id), timeout=30)
    assert ended.failover_job_id == started.job_id and ended.job_id != started.job_id
    cleanup = models.JobTracking.get_by_id(ended.job_id)
    assert (cleanup.job_type, cleanup.operation, cleanup.parent_job_id) == ("cleanup", "test-failover-cleanup", started.job_id)
    done = watch(lab, ended.job_id)[-1]
    assert done.job.status == "completed", done.job.error_message
    assert [name for name, _ in steps(ended.job_id)] == CLEANUP_STEPS
    assert all(status == "completed" for _, status in steps(ended.job_id))
    assert lab.cloudstack.get("vm", vm["id"]) is None
    with open(volume_file, "rb") as f:
        assert f.read(8192) == original
    assert_back_on_oma(lab, ctx)
    assert models.FailoverJob.get(models.FailoverJob.job_id == started.job_id).status == "cleanup"
    assert models.VmReplicationContext.get_by_id(ctx.context_id).current_status == "ready_for_failover"
    for call in (lambda: lab.client.failover.EndTestFailover(fpb.EndTestFailoverRequest(job_id=started.job_id),
                                                             timeout=30),
                 lambda: lab.client.failover.CleanupTestFailover(fpb.CleanupTestFailoverRequest(vm_name=ctx.vm_name),
                                                                 timeout=30)):
        with pytest.raises(grpc.RpcError) as over:
            call()
        assert over.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already cleaned up" in over.value.details()

    job = replicate(lab, ctx.context_id)
    assert job.replication_type == "incremental" and job.vma_sync_type == "incremental"


def test_live_failover_then_rollback_with_power_on(lab_private):
    lab = lab_private
    ctx = prepared_vm(lab)
    assert power_state(lab, ctx) == "poweredOn"

    started = lab.client.failover.StartLiveFailover(fpb.StartLiveFailoverRequest(
        context_id=ctx.context_id, vmware_vm_id=ctx.vmware_vm_id, vm_name=ctx.vm_name), timeout=30)
    config = started.configuration
    assert (config.destination_name, config.vm_naming, config.power_off_source, config.perform_final_sync) == \
        (ctx.vm_name, "exact", True, True)
    final = watch(lab, started.job_id)[-1]
    assert final.job.status == "completed", final.job.error_message
    assert all(status == "completed" for name, status in steps(started.job_id) if name != "virtio-driver-injection")
    assert power_state(lab, ctx) == "poweredOff"
    sync = models.ReplicationJob.get(models.ReplicationJob.scheduled_by == "failover")
    assert sync.status == "completed" and sync.replication_type == "incremental"
    record = models.FailoverJob.get(models.FailoverJob.job_id == started.job_id)
    vm = lab.cloudstack.get("vm", record.destination_vm_id)
    assert vm["state"] == "Running" and vm["displayname"] == ctx.vm_name
    assert models.VmReplicationContext.get_by_id(ctx.context_id).current_status == "failed_over_live"

    rollback = lab.client.failover.StartRollback(fpb.StartRollbackRequest(
        context_id=ctx.context_id, vm_name=ctx.vm_name, failover_type="live", power_on_source=True), timeout=30)
    assert rollback.rollback_type == "live_rollback" and rollback.power_on_source and \
        rollback.failover_job_id == started.job_id
    assert rollback.external_job_id.startswith(f"rollback-live-failover-{ctx.vm_name}-")
    done = watch(lab, rollback.job_id)[-1]
    assert done.job.status == "completed", done.job.error_message
    assert [name for name, _ in steps(rollback.job_id)] == CLEANUP_STEPS + ["source-vm-power-on"]
    assert lab.cloudstack.get("vm", vm["id"]) is None
    assert_back_on_oma(lab, ctx)
    assert power_state(lab, ctx) == "poweredOn"
    assert models.FailoverJob.get(models.FailoverJob.job_id == started.job_id).status == "cleanup"
    ctx_row = models.VmReplicationContext.get_by_id(ctx.context_id)
    assert ctx_row.current_status == "ready_for_failover"
    assert ctx_row.last_operation_summary["operation_type"] == "rollback"


def test_cleanup_by_vm_name_ends_the_test_failover_like_end_test(lab_private):
    """POST /failover/cleanup/{vm_name}: the same rollback path as DELETE /failover/test/{job_id}."""
    lab = lab_private
    ctx = prepared_vm(lab)
    started = start_test(lab, ctx)
    assert watch(lab, started.job_id)[-1].job.status == "completed"
    destination = models.FailoverJob.get(models.FailoverJob.job_id == started.job_id).destination_vm_id
    assert lab.cloudstack.get("vm", destination)["state"] == "Running"

    cleaned = lab.client.failover.CleanupTestFailover(fpb.CleanupTestFailoverRequest(
        vm_name=ctx.vm_name, request_id="cleanup-1"), timeout=30)
    assert (cleaned.failover_job_id, cleaned.context_id, cleaned.vm_name) == (started.job_id, ctx.context_id, ctx.vm_name)
    assert cleaned.external_job_id.startswith(f"cleanup-test-failover-{ctx.vm_name}-") and not cleaned.existing
    again = lab.client.failover.CleanupTestFailover(fpb.CleanupTestFailoverRequest(
        vm_name=ctx.vm_name, request_id="cleanup-1"), timeout=30)
    assert again.existing and again.job_id == cleaned.job_id
    done = watch(lab, cleaned.job_id)[-1]
    assert done.job.status == "completed", done.job.error_message
    assert [name for name, _ in steps(cleaned.job_id)] == CLEANUP_STEPS
    assert lab.cloudstack.get("vm", destination) is None
    assert_back_on_oma(lab, ctx)
    assert models.FailoverJob.get(models.FailoverJob.job_id == started.job_id).status == "cleanup"
    assert models.VmReplicationContext.get_by_id(ctx.context_id).current_status == "ready_for_failover"
