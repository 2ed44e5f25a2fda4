"""Failover failures on the real parts: CloudStack faults at VM creation, volume attachment and start
are compensated (nothing left behind, the VM ready again, a retry succeeds); a compensation that
cannot finish leaves cleanup_required until CleanupFailedExecution; a VM that is not ready fails at
validation with nothing touched; a second failover of a busy VM is refused; pre-flight validation
accepts exactly what the Start RPCs accept."""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta

import grpc
import pytest
from oma.v1 import failover_pb2 as fpb
from oma.v1 import replications_pb2 as rpb

from oma_server.db import models
from tests import factories
from tests.helpers.failover import (
    add_vm,
    assert_back_on_oma,
    configure_cloudstack,
    disk_volumes,
    power_state,
    prepared_vm,
    replicate,
    start_test,
    steps,
    watch,
)
from tests.helpers.faults import datastore_gone

COMPENSATION_STEPS = ["destination-vm-shutdown", "volume-detachment", "destination-vm-deletion",
                      "cloudstack-snapshot-rollback", "volume-reattachment-to-oma", "cloudstack-snapshot-deletion",
                      "volume-mode-switch-oma"]
FAILED_EXECUTION_STEPS = ["analyze-volume-state", "detach-attached-volumes", "destroy-destination-vm",
                          "cleanup-snapshots", "reattach-all-volumes", "reset-vm-state"]


def failed_steps(job_id):
    return [name for name, status in steps(job_id) if status == "failed"]


def compensation_job(failover_job_id):
    return models.JobTracking.get(models.JobTracking.parent_job == failover_job_id,
                                  models.JobTracking.operation == "failover-compensation")


def destination_vms(lab):
    return [vm for vm in lab.cloudstack.state.vms.values() if "-test-" in vm.name]


@pytest.fixture
def lab_sweeping(db, tmp_path):
    """A lab whose OMA sweeps for expired test failovers twice a second and has a driver injection
    command (a script that records its arguments in ``<tmp>/injections``)."""
    from omalab.lab import start_lab

    script = tmp_path / "inject-drivers"
    script.write_text(f'#!/bin/sh\necho "$1 $2" >> {tmp_path / "injections"}\n')
    script.chmod(0o755)
    settings = {"failover_sweep_seconds": 0.5, "virtio_injection_command": str(script)}
    with start_lab(tmp_path, existing_database=db, oma_settings=settings) as running:
        running.injections = tmp_path / "injections"
        yield running


def test_faults_at_creation_attachment_and_startup_are_compensated_and_a_retry_succeeds(lab_sweeping):
    lab = lab_sweeping
    ctx = prepared_vm(lab)
    faults = (("deployVirtualMachine", "vm-creation"), ("attachVolume", "volume-attachment"),
              ("startVirtualMachine", "vm-startup-and-validation"))
    for command, step in faults:
        lab.cloudstack.fail(command, times=1, errorcode=530, errortext=f"injected {command} failure", async_job=True)
        if command == "deployVirtualMachine":
            lab.cloudstack.set_job_delay(1.0, command=command)  # keeps the first failover busy for a while
        started = start_test(lab, ctx)
        if command == "deployVirtualMachine":
            # The VM is busy: a second failover, an end-test and a failed-execution cleanup are refused.
            for call in (lambda: start_test(lab, ctx),
                         lambda: lab.client.failover.StartLiveFailover(fpb.StartLiveFailoverRequest(
                             context_id=ctx.context_id, vmware_vm_id=ctx.vmware_vm_id, vm_name=ctx.vm_name), timeout=30),
                         lambda: lab.client.failover.EndTestFailover(
                             fpb.EndTestFailoverRequest(job_id=started.job_id), timeout=30),
                         lambda: lab.client.failover.CleanupFailedExecution(
                             fpb.CleanupFailedExecutionRequest(vm_name=ctx.vm_name), timeout=30)):
                with pytest.raises(grpc.RpcError) as busy:
                    call()
                assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert started.job_id in busy.value.details(), busy.value.details()
            lab.cloudstack.set_job_delay(lab.cloudstack.job_delay, command=command)
        final = watch(lab, started.job_id)[-1]
        assert final.job.status == "failed" and final.failover_job.status == "failed", command
        assert failed_steps(started.job_id) == [step], (command, steps(started.job_id))
        assert f"injected {command} failure" in final.job.error_message
        assert "compensation restored" in final.failover_job.error_message
        compensation = compensation_job(started.job_id)
        assert compensation.status == "completed", compensation.error_message
        assert [name for name, _ in steps(compensation.id)] == COMPENSATION_STEPS
        # Reverted: the OS disk the injection wrote to (deploy fault), the moved volumes (later faults).
        assert dict(steps(compensation.id))["cloudstack-snapshot-rollback"] == "completed", command
        assert destination_vms(lab) == [], command  # no destination VM left (also none in Error state)
        assert_back_on_oma(lab, ctx)
        ctx_row = models.VmReplicationContext.get_by_id(ctx.context_id)
        assert ctx_row.current_status == "ready_for_failover", command
        summary = ctx_row.last_operation_summary
        assert (summary["status"], summary["failed_step_internal"]) == ("failed", step)
        assert summary["error_category"] and summary["actionable_steps"]

    retry = start_test(lab, ctx, auto_cleanup=True, test_duration="1m")
    assert retry.configuration.auto_cleanup and retry.configuration.test_duration == "1m"
    final = watch(lab, retry.job_id)[-1]
    assert final.job.status == "completed", final.job.error_message
    # The guest is Windows and a command is configured: drivers were injected into the OS disk's device
    # (and, above, the compensation of the runs that injected reverted that disk).
    injection = next(s for s in final.job.steps if s.name == "virtio-driver-injection")
    assert injection.status == "completed" and injection.metadata["virtio_status"] == "drivers-injected-successfully"
    (_, os_volume), _ = disk_volumes(ctx)
    calls = lab.injections.read_text().split("\n")[:-1]
    assert len(calls) == 4 and all(c.split()[0] == str(lab.cloudstack.device_path(os_volume.volume_id)) for c in calls)
    assert all(c.split()[1].startswith(f"virtio-{ctx.vmware_vm_id}-") for c in calls)
    assert models.VmReplicationContext.get_by_id(ctx.context_id).current_status == "failed_over_test"
    listed = lab.client.failover.ListFailoverJobs(fpb.ListFailoverJobsRequest(
        vm_id=ctx.vmware_vm_id, failover_type="test", status="failed"), timeout=10)
    assert listed.total_count == 3

    # Auto-cleanup (docs/design/failover.md#auto-cleanup): the deadline is stored with the record; once it passes, the sweep ends the test.
    record = models.FailoverJob.get(models.FailoverJob.job_id == retry.job_id)
    spec = json.loads(record.source_vm_spec)
    deadline = datetime.fromisoformat(spec["cleanup_deadline"])
    assert timedelta(seconds=55) < deadline - record.completed_at <= timedelta(seconds=60)
    spec["cleanup_deadline"] = (models.utcnow() - timedelta(seconds=1)).isoformat()
    models.FailoverJob.update(source_vm_spec=json.dumps(spec)).where(models.FailoverJob.id == record.id).execute()
    end = time.monotonic() + 30
    while not (cleanups := list(models.JobTracking.select().where(
            models.JobTracking.parent_job == retry.job_id, models.JobTracking.operation == "test-failover-cleanup"))):
        assert time.monotonic() < end, "the sweep did not end the expired test failover"
        time.sleep(0.1)
    assert len(cleanups) == 1 and cleanups[0].owner == "auto-cleanup"
    assert watch(lab, cleanups[0].id)[-1].job.status == "completed"
    assert_back_on_oma(lab, ctx)
    assert models.FailoverJob.get_by_id(record.id).status == "cleanup"
    assert models.VmReplicationContext.get_by_id(ctx.context_id).current_status == "ready_for_failover"


def test_an_incomplete_compensation_needs_cleanup_failed_execution(lab_private):
    lab = lab_private
    ctx = prepared_vm(lab)
    lab.cloudstack.fail("startVirtualMachine", times=1, async_job=True)
    lab.cloudstack.fail("revertSnapshot", times=None, errortext="injected revert failure", async_job=True)
    started = start_test(lab, ctx)
    final = watch(lab, started.job_id)[-1]
    assert final.job.status == "failed"
    assert failed_steps(started.job_id) == ["vm-startup-and-validation"]
    assert "compensation failed" in final.failover_job.error_message
    assert "injected revert failure" in final.failover_job.error_message
    compensation = compensation_job(started.job_id)
    assert compensation.status == "failed"
    comp_steps = dict(steps(compensation.id))
    assert comp_steps["cloudstack-snapshot-rollback"] == "failed"
    assert comp_steps["cloudstack-snapshot-deletion"] == "skipped"  # the snapshots stay for the cleanup
    assert comp_steps["destination-vm-deletion"] == "completed" and destination_vms(lab) == []
    assert models.VmReplicationContext.get_by_id(ctx.context_id).current_status == "cleanup_required"
    snapshots = [v.snapshot_id for _, v in disk_volumes(ctx)]
    assert all(snapshots) and all(lab.cloudstack.get("snapshot", s) for s in snapshots)
    for call in (lambda: start_test(lab, ctx),
                 lambda: lab.client.replications.CreateReplication(
                     rpb.CreateReplicationRequest(context_id=ctx.context_id), timeout=30)):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # Whatever touched the volume meanwhile, the cleanup reverts it from the snapshot.
    (_, os_volume), _ = disk_volumes(ctx)
    volume_file = lab.volume_file(os_volume.volume_id)
    with open(volume_file, "rb") as f:
        original = f.read(4096)
    fd = os.open(volume_file, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(4096), 0)
    finally:
        os.close(fd)

    lab.cloudstack.clear_faults()
    cleanup = lab.client.failover.CleanupFailedExecution(fpb.CleanupFailedExecutionRequest(vm_name=ctx.vm_name),
                                                         timeout=30)
    assert cleanup.failover_job_id == started.job_id
    done = watch(lab, cleanup.job_id)[-1]
    assert done.job.status == "completed", done.job.error_message
    assert [name for name, _ in steps(cleanup.job_id)] == FAILED_EXECUTION_STEPS
    with open(volume_file, "rb") as f:
        assert f.read(4096) == original
    assert_back_on_oma(lab, ctx)
    assert models.VmReplicationContext.get_by_id(ctx.context_id).current_status == "ready_for_failover"

    # Idempotent: a second run finds nothing to do and changes nothing.
    again = lab.client.failover.CleanupFailedExecution(fpb.CleanupFailedExecutionRequest(context_id=ctx.context_id),
                                                       timeout=30)
    assert watch(lab, again.job_id)[-1].job.status == "completed"
    assert_back_on_oma(lab, ctx)
    assert replicate(lab, ctx.context_id).replication_type == "incremental"


def test_a_failed_final_sync_leaves_the_vm_ready_for_failover_and_a_retry_syncs_again(lab_private):
    """docs/design/failover.md#compensation, final sync failed: the source is off, the final sync fails (its datastore is gone, so vCenter cannot
    snapshot it): the failover fails at final-sync with nothing else touched, the message says the
    source is off, the VM is ready for failover again and free; once the datastore is back the retried
    live failover final-syncs and completes."""
    lab = lab_private
    ctx = prepared_vm(lab)
    volumes_before = [(m.volume_uuid, m.vm_id, m.operation_mode) for m in models.DeviceMapping.select()
                      .where(models.DeviceMapping.vm_context == ctx.context_id).order_by(models.DeviceMapping.volume_uuid)]
    live = fpb.StartLiveFailoverRequest(context_id=ctx.context_id, vmware_vm_id=ctx.vmware_vm_id, vm_name=ctx.vm_name)
    with datastore_gone(lab):
        started = lab.client.failover.StartLiveFailover(live, timeout=30)
        final = watch(lab, started.job_id)[-1]
    assert final.job.status == "failed" and final.failover_job.status == "failed"
    assert failed_steps(started.job_id) == ["final-sync"], steps(started.job_id)
    assert f"the source VM {ctx.vm_name} is powered off" in final.failover_job.error_message
    assert "final-syncs again" in final.failover_job.error_message
    assert power_state(lab, ctx) == "poweredOff"
    sync = models.ReplicationJob.get(models.ReplicationJob.scheduled_by == "failover")
    assert sync.status == "failed" and sync.completed_at
    ctx_row = models.VmReplicationContext.get_by_id(ctx.context_id)
    assert (ctx_row.current_status, ctx_row.current_job_id) == ("ready_for_failover", None)
    assert ctx_row.last_successful_job_id != sync.id and ctx_row.failed_jobs == 1
    assert not models.JobTracking.select().where(models.JobTracking.parent_job == started.job_id,
                                                 models.JobTracking.operation == "failover-compensation").exists()
    assert destination_vms(lab) == [] and not [vm for vm in lab.cloudstack.state.vms.values()
                                               if vm.name == ctx.vm_name]
    assert [(m.volume_uuid, m.vm_id, m.operation_mode) for m in models.DeviceMapping.select().where(
        models.DeviceMapping.vm_context == ctx.context_id).order_by(models.DeviceMapping.volume_uuid)] == volumes_before

    retry = lab.client.failover.StartLiveFailover(live, timeout=30)
    done = watch(lab, retry.job_id)[-1]
    assert done.job.status == "completed", done.job.error_message
    synced = models.ReplicationJob.get(models.ReplicationJob.scheduled_by == "failover",
                                       models.ReplicationJob.status == "completed")
    assert synced.replication_type == "incremental"
    assert models.VmReplicationContext.get_by_id(ctx.context_id).current_status == "failed_over_live"


def _request(ctx, **values):
    fields = {"context_id": ctx.context_id, "vmware_vm_id": ctx.vmware_vm_id, "vm_name": ctx.vm_name}
    fields.update(values)
    return fpb.StartFailoverRequest(**fields)


INVALID = [
    {"failover_type": "other"},
    {"failover_type": "live", "power_off_source": False},
    {"failover_type": "test", "power_off_source": True},
    {"failover_type": "test", "perform_final_sync": True},
    {"failover_type": "test", "test_duration": "2 hours"},
    {"failover_type": "live", "test_duration": "2h"},
    {"failover_type": "test", "network_strategy": "production"},
    {"failover_type": "live", "network_strategy": "isolated"},
    {"failover_type": "test", "network_strategy": "bogus"},
    {"failover_type": "live", "vm_naming": "suffixed"},
    {"failover_type": "test", "vm_naming": "exact"},
    {"failover_type": "test", "network_strategy": "custom"},  # the VM has no mappings yet
    {"failover_type": "test", "vm_name": "someone-else"},
    {"failover_type": "test", "vmware_vm_id": ""},
]
VALID = [
    {"failover_type": "test"},
    {"failover_type": "test", "network_strategy": "test", "vm_naming": "suffixed", "test_duration": "90m"},
    {"failover_type": "live", "perform_final_sync": False, "network_strategy": "live", "vm_naming": "exact"},
]
_TIME_DEPENDENT = ("destination_name", "destination_hostname", "snapshot_name")


def test_preflight_agrees_with_start_and_an_unready_vm_fails_validation_untouched(lab_private):
    lab = lab_private
    ctx = add_vm(lab, lab.vcenter.data_vms[0])  # never replicated
    configure_cloudstack(lab)
    decision = lab.client.failover.GetRollbackDecision(fpb.GetRollbackDecisionRequest(failover_type="live"), timeout=10)
    assert decision.decision_id == "live-rollback-power-on" and decision.default_value == decision.options[0]
    options = lab.client.failover.GetPreflightConfig(fpb.GetPreflightConfigRequest(failover_type="test"), timeout=10)
    assert options.options["test_duration"].pattern == "^[0-9]+[hm]$"
    assert options.options["vm_naming"].default_value.string_value == "suffixed"

    for values in INVALID:
        checked = lab.client.failover.ValidatePreflightConfig(
            fpb.ValidatePreflightConfigRequest(request=_request(ctx, **values)), timeout=10)
        assert not checked.valid and checked.errors and not checked.HasField("configuration"), values
        before = factories.db_snapshot()
        with pytest.raises(grpc.RpcError) as refused:
            lab.client.failover.StartFailover(_request(ctx, **values), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (values, refused.value.details())
        assert factories.db_snapshot() == before, values

    readiness = lab.client.failover.GetFailoverReadiness(fpb.GetFailoverReadinessRequest(
        vm_id=ctx.vmware_vm_id, failover_type="test"), timeout=10)
    assert not readiness.is_valid and readiness.context_id == ctx.context_id
    vms_before = set(lab.cloudstack.state.vms)
    for values in VALID:
        checked = lab.client.failover.ValidatePreflightConfig(
            fpb.ValidatePreflightConfigRequest(request=_request(ctx, **values)), timeout=10)
        assert checked.valid and not checked.errors, (values, checked.errors)
        started = lab.client.failover.StartFailover(_request(ctx, **values), timeout=30)
        for field in fpb.FailoverConfiguration.DESCRIPTOR.fields:
            if field.name not in _TIME_DEPENDENT:
                assert getattr(started.configuration, field.name) == getattr(checked.configuration, field.name), field.name
        final = watch(lab, started.job_id)[-1]
        assert final.job.status == "failed" and failed_steps(started.job_id) == ["validation"], values
        assert [name for name, _ in steps(started.job_id)] == ["validation"]
        assert "not ready for failover" in final.failover_job.error_message
        assert "no completed replication" in final.failover_job.error_message
        assert models.JobTracking.select().where(models.JobTracking.parent_job == started.job_id).count() == 0
    # Nothing was touched: no VM, no volume, no snapshot, no mapping; the VM is as it was.
    assert set(lab.cloudstack.state.vms) == vms_before and not lab.cloudstack.state.snapshots
    assert models.OsseaVolume.select().count() == 0 and models.DeviceMapping.select().count() == 0
    ctx_row = models.VmReplicationContext.get_by_id(ctx.context_id)
    assert ctx_row.current_status == "discovered"
    assert ctx_row.last_operation_summary["failed_step"] == "Pre-flight Validation"
    assert power_state(lab, ctx) == "poweredOn"
    assert models.FailoverJob.select().where(models.FailoverJob.status != "failed").count() == 0


def test_a_restart_fails_interrupted_failover_work(db, oma_factory):
    """docs/design/failover.md#one-operation-per-vm-and-restarts: jobs this process left running fail "interrupted by restart"; a context whose volumes may be
    mid-move needs cleanup, one that had not got that far is left alone; another process's live job is kept."""
    def running_failover(status, context_status, worker, heartbeat_age=timedelta(0)):
        ctx = factories.context(current_status=context_status)
        job = models.JobTracking.create(job_type="failover", operation="unified-test-failover", status="running",
                                        context_id=ctx.context_id, job_category="failover", worker=worker,
                                        worker_heartbeat_at=models.utcnow() - heartbeat_age)
        models.JobStep.create(job=job.id, name="some-step", seq=1, status="running")
        models.FailoverJob.create(vm_context=ctx.context_id, job_id=job.id, vm_id=ctx.vmware_vm_id, job_type="test",
                                  status=status, source_vm_name=ctx.vm_name)
        return ctx.context_id, job.id

    moved = running_failover("switching_volume", "failed_over_test", "oma-a")
    early = running_failover("validating", "ready_for_failover", "oma-a")
    elsewhere = running_failover("powering_on", "failed_over_test", "oma-b")  # fresh heartbeat: alive
    # The lease of a process that died (no heartbeat for longer than the lease), and a job nobody leased.
    dead = running_failover("snapshotting", "failed_over_test", "oma-c", heartbeat_age=timedelta(hours=1))
    unleased = running_failover("creating_vm", "failed_over_test", None)
    oma_factory(instance_name="oma-a")

    for (context_id, job_id), context_status in ((moved, "cleanup_required"), (early, "ready_for_failover"),
                                                 (dead, "cleanup_required"), (unleased, "cleanup_required")):
        job = models.JobTracking.get_by_id(job_id)
        assert job.status == "failed" and "interrupted by restart" in job.error_message
        assert [s.status for s in job.steps] == ["failed"]
        record = models.FailoverJob.get(models.FailoverJob.job_id == job_id)
        assert record.status == "failed" and "interrupted by restart" in record.error_message
        assert models.VmReplicationContext.get_by_id(context_id).current_status == context_status
        assert job.worker == "oma-a"  # claimed (one conditional update) by the process that ended it
    context_id, job_id = elsewhere
    assert models.JobTracking.get_by_id(job_id).status == "running"
    assert models.FailoverJob.get(models.FailoverJob.job_id == job_id).status == "powering_on"
    assert models.VmReplicationContext.get_by_id(context_id).current_status == "failed_over_test"
