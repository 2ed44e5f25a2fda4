"""Failover end to end on the real parts (simulated vCenter, VMA, CloudStack emulator, OMA on both
databases): a test failover and its end, a live failover (power-off, final sync) and its rollback."""
from __future__ import annotations

import os
import time

import grpc
import pytest
from oma.v1 import discovery_pb2, network_mappings_pb2, ossea_config_pb2
from oma.v1 import failover_pb2 as fpb
from oma.v1 import replications_pb2 as rpb

from oma_server.db import models
from oma_server.domain import credentials, network_mappings

FAILOVER_STEPS = ["validation", "source-vm-power-off", "final-sync", "volume-mode-switch-failover",
                  "multi-volume-snapshot-creation", "virtio-driver-injection", "vm-creation", "volume-attachment",
                  "vm-startup-and-validation", "status-update"]
CLEANUP_STEPS = ["failover-job-retrieval", "test-vm-shutdown", "volume-detachment", "multi-volume-snapshot-cleanup",
                 "volume-mode-switch-oma", "volume-reattachment-to-oma", "test-vm-deletion",
                 "failover-job-status-update", "vm-context-status-update"]
LIFECYCLE = ["validating", "snapshotting", "creating_vm", "switching_volume", "powering_on", "completed"]


# --- helpers shared with test_failover_failures.py -------------------------------------------------------

def add_vm(lab, name):
    added = lab.client.discovery.AddVMs(discovery_pb2.AddVMsRequest(
        source=discovery_pb2.VCenterSource(credential_id=lab.credential_id), vm_names=[name]), timeout=60)
    assert added.vms_added == 1, added
    return models.VmReplicationContext.get_by_id(added.processed_vms[0].context_id)


def replicate(lab, context_id):
    created = lab.client.replications.CreateReplication(rpb.CreateReplicationRequest(context_id=context_id), timeout=30)
    final = list(lab.client.watch_replication(created.job_id, timeout=120))[-1]
    assert final.status == "completed", final.error_message
    return models.ReplicationJob.get_by_id(created.job_id)


def map_networks(lab, ctx):
    """Live mappings to prod-network; test mappings to a different test network per source network."""
    sources = network_mappings.source_networks(ctx.context_id)
    assert sources, "the data VM has network adapters"
    ids = lab.cloudstack.ids
    test_targets = [ids["network_test"], ids["network_shared"]]
    for index, source in enumerate(sources):
        for is_test, target in ((False, ids["network"]), (True, test_targets[index % len(test_targets)])):
            lab.client.network_mappings.CreateNetworkMapping(network_mappings_pb2.CreateNetworkMappingRequest(
                vm_id=ctx.vm_name, vm_context_id=ctx.context_id, source_network_name=source,
                destination_network_id=target, is_test_network=is_test), timeout=30)
    return sources


def configure_cloudstack(lab):
    lab.client.ossea.UpdateConfig(ossea_config_pb2.UpdateConfigRequest(
        id=lab.ossea_config_id, template_id=lab.cloudstack.template_id,
        service_offering_id=lab.cloudstack.service_offering_id, network_id=lab.cloudstack.network_id), timeout=10)


def prepared_vm(lab, name=None):
    """A replicated two-disk data VM with live and test network mappings and a complete CloudStack config."""
    ctx = add_vm(lab, name or lab.vcenter.data_vms[0])
    replicate(lab, ctx.context_id)
    map_networks(lab, ctx)
    configure_cloudstack(lab)
    return models.VmReplicationContext.get_by_id(ctx.context_id)


def start_test(lab, ctx, **extra):
    return lab.client.failover.StartTestFailover(fpb.StartTestFailoverRequest(
        context_id=ctx.context_id, vmware_vm_id=ctx.vmware_vm_id, vm_name=ctx.vm_name, **extra), timeout=30)


def watch(lab, job_id, timeout=90):
    """Every message of WatchFailoverJob until the job is terminal."""
    messages = list(lab.client.failover.WatchFailoverJob(fpb.WatchFailoverJobRequest(job_id=job_id), timeout=timeout))
    assert messages and messages[-1].terminal, messages[-1:] or "no message"
    return messages


def steps(job_id):
    return [(s.name, s.status) for s in models.JobStep.select().where(models.JobStep.job == job_id)
            .order_by(models.JobStep.seq)]


def disk_volumes(ctx):
    """(disk, volume) in disk order: disk-2000 (the OS disk) first."""
    disks = sorted(models.VmDisk.select().where(models.VmDisk.vm_context == ctx.context_id), key=lambda d: d.disk_id)
    return [(d, models.OsseaVolume.get_by_id(d.ossea_volume_id)) for d in disks]


def status_moves(job_id, until="completed", timeout=10):
    """The failover_jobs transitions logged under the job (the log sink writes asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        moves = [e.message.rsplit("→ ", 1)[1] for e in models.LogEvent.select().where(
            models.LogEvent.job == job_id).order_by(models.LogEvent.id) if "→ " in e.message and "failover job" in e.message]
        if until in moves or time.monotonic() > deadline:
            return moves
        time.sleep(0.1)


def assert_back_on_oma(lab, ctx):
    """Every replica volume attached to the OMA, its device present, mapping 'oma', export served, no snapshot."""
    exports = lab.oma.components.exports
    for disk, volume in disk_volumes(ctx):
        remote = lab.cloudstack.get("volume", volume.volume_id)
        assert remote["virtualmachineid"] == lab.cloudstack.oma_vm_id, disk.disk_id
        assert lab.cloudstack.device_path(volume.volume_id).exists()
        mapping = models.DeviceMapping.get(models.DeviceMapping.volume_uuid == volume.volume_id)
        assert (mapping.vm_id, mapping.operation_mode) == (lab.cloudstack.oma_vm_id, "oma")
        assert mapping.device_path == str(lab.cloudstack.device_path(volume.volume_id))
        export = models.NbdExport.get(models.NbdExport.volume_id == volume.volume_id)
        assert export.status == "active" and exports.alive(export.export_name)
        volume = models.OsseaVolume.get_by_id(volume.id)
        assert (volume.snapshot_id, volume.snapshot_status) == (None, "none"), disk.disk_id
    assert not lab.cloudstack.state.snapshots


def power_state(lab, ctx):
    login = credentials.login_for(lab.oma.runtime.secrets, lab.credential_id)
    return lab.oma.components.vma.power_state(login, ctx.vmware_vm_id).power_state


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
