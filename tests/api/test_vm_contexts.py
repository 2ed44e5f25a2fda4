"""VMContextService: reads of vm_replication_contexts with groups, jobs, disks and CBT history
(mapping: GET /vm-contexts, /vm-contexts/{vm_name}, /vm-contexts/{id}/recent-jobs), updates and the
delete cascade."""
from __future__ import annotations

import grpc
import pytest
from oma.v1 import vm_contexts_pb2 as pb

from oma_server.db import models
from oma_server.domain import joblog
from tests import factories


def _code(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_list_is_ordered_filtered_paged_and_carries_groups(oma):
    a = factories.context(vm_name="alpha", current_status="ready_for_failover")
    factories.context(vm_name="bravo")
    factories.context(vm_name="charlie", vcenter_host="vc2.lab")
    group = models.VmMachineGroup.create(name="gold")
    models.VmGroupMembership.create(group=group.id, vm_context=a.context_id, priority=3, enabled=False)

    listed = oma.contexts.ListVMContexts(pb.ListVMContextsRequest(), timeout=5)
    assert [c.vm_name for c in listed.vm_contexts] == ["alpha", "bravo", "charlie"] and listed.count == 3
    alpha = listed.vm_contexts[0]
    assert alpha.group_count == 1
    assert (alpha.groups[0].group_name, alpha.groups[0].priority, alpha.groups[0].enabled) == ("gold", 3, False)
    assert alpha.current_status == "ready_for_failover" and alpha.cpu_count == 2 and alpha.HasField("created_at")

    assert [c.vm_name for c in oma.contexts.ListVMContexts(
        pb.ListVMContextsRequest(vcenter_host="vc2.lab"), timeout=5).vm_contexts] == ["charlie"]
    assert [c.vm_name for c in oma.contexts.ListVMContexts(
        pb.ListVMContextsRequest(name_contains="RAV"), timeout=5).vm_contexts] == ["bravo"]
    assert [c.vm_name for c in oma.contexts.ListVMContexts(
        pb.ListVMContextsRequest(status="ready_for_failover"), timeout=5).vm_contexts] == ["alpha"]

    first = oma.contexts.ListVMContexts(pb.ListVMContextsRequest(page_size=2), timeout=5)
    second = oma.contexts.ListVMContexts(
        pb.ListVMContextsRequest(page_size=2, page_token=first.next_page_token), timeout=5)
    assert [c.vm_name for c in first.vm_contexts] == ["alpha", "bravo"] and first.next_page_token
    assert [c.vm_name for c in second.vm_contexts] == ["charlie"] and not second.next_page_token

    code, msg = _code(lambda: oma.contexts.ListVMContexts(pb.ListVMContextsRequest(status="bogus"), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown status" in msg
    code, _ = _code(lambda: oma.contexts.ListVMContexts(pb.ListVMContextsRequest(page_token="zzz"), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_get_by_name_and_id_return_details_even_without_jobs(oma):
    ctx = factories.context(vm_name="web01")
    factories.disk(ctx, 2001, unit_number=1)
    factories.disk(ctx, 16000, unit_number=0, disk_id="disk-16000")
    factories.disk(ctx, 2000, unit_number=0)

    details = oma.contexts.GetVMContextByName(pb.GetVMContextByNameRequest(vm_name="web01"), timeout=5).details
    assert details.context.context_id == ctx.context_id
    # Disks are returned for a VM that never replicated, ordered by unit number then numeric key.
    assert [d.disk_id for d in details.disks] == ["disk-2000", "disk-16000", "disk-2001"]
    assert not details.HasField("current_job") and list(details.job_history) == []

    job = factories.replication_job(ctx, status="replicating")
    models.VmReplicationContext.update(current_job=job.id).where(
        models.VmReplicationContext.context_id == ctx.context_id).execute()
    models.CbtHistory.create(vm_context=ctx.context_id, job=job.id, disk_id="disk-2000",
                             change_id="52 aa/1", sync_type="full", sync_success=True)
    models.VmReplicationContext.update(last_operation_summary={"status": "completed"}).where(
        models.VmReplicationContext.context_id == ctx.context_id).execute()
    details = oma.contexts.GetVMContext(pb.GetVMContextRequest(context_id=ctx.context_id), timeout=5).details
    assert details.current_job.job_id == job.id and details.current_job.status == "replicating"
    assert [j.job_id for j in details.job_history] == [job.id]
    assert details.cbt_history[0].change_id == "52 aa/1" and details.cbt_history[0].sync_success
    assert '"status": "completed"' in details.last_operation

    disks = oma.contexts.ListVMContextDisks(pb.ListVMContextDisksRequest(context_id=ctx.context_id), timeout=5)
    assert disks.count == 3

    assert _code(lambda: oma.contexts.GetVMContextByName(pb.GetVMContextByNameRequest(), timeout=5))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: oma.contexts.GetVMContext(pb.GetVMContextRequest(context_id="nope"), timeout=5))[0] == \
        grpc.StatusCode.NOT_FOUND
    assert _code(lambda: oma.contexts.ListVMContextDisks(
        pb.ListVMContextDisksRequest(context_id="nope"), timeout=5))[0] == grpc.StatusCode.NOT_FOUND


def test_same_name_in_two_vcenters_needs_the_vcenter(oma):
    factories.context(vm_name="dup", vcenter_host="vc1.lab")
    other = factories.context(vm_name="dup", vcenter_host="vc2.lab")
    code, msg = _code(lambda: oma.contexts.GetVMContextByName(pb.GetVMContextByNameRequest(vm_name="dup"), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "vc1.lab" in msg and "vc2.lab" in msg
    got = oma.contexts.GetVMContextByName(
        pb.GetVMContextByNameRequest(vm_name="dup", vcenter_host="vc2.lab"), timeout=5)
    assert got.details.context.context_id == other.context_id


def test_recent_jobs_merge_replications_and_failover_jobs(oma):
    ctx = factories.context()
    factories.replication_job(ctx, status="completed")
    factories.replication_job(ctx, status="failed", replication_type="incremental", error_message="boom")
    failover = joblog.start_job("failover", "unified-test-failover", context_id=ctx.context_id,
                                external_job_id="unified-test-failover-x", category="failover")
    with joblog.step(failover, "validation"):
        pass
    try:
        with joblog.step(failover, "vm-creation"):
            raise RuntimeError("no capacity")
    except joblog.StepFailed:
        pass
    joblog.end_job(failover, "failed", "no capacity")
    joblog.start_job("discovery", "bulk-add-vms", context_id=ctx.context_id)  # not a failover/cleanup job
    cleanup = joblog.start_job("cleanup", "test-failover-cleanup", context_id=ctx.context_id,
                               parent_job_id=failover)

    jobs = oma.contexts.ListRecentJobs(pb.ListRecentJobsRequest(context_id=ctx.context_id), timeout=5)
    assert jobs.count == 4
    tracked_jobs = {j.job_id: j for j in jobs.jobs if j.data_source == "job_tracking"}
    # The end of a test failover is a cleanup, though its operation name contains "test-failover".
    assert (tracked_jobs[cleanup].job_type, tracked_jobs[cleanup].display_name) == ("cleanup", "Cleanup")
    tracked = tracked_jobs[failover]
    assert tracked.job_type == "test_failover" and tracked.status == "failed"
    assert tracked.progress == 50.0 and tracked.error_message == "no capacity"
    assert tracked.current_step == "Pre-flight Validation"
    assert tracked.external_job_id == "unified-test-failover-x"
    names = sorted(j.display_name for j in jobs.jobs if j.data_source == "replication_jobs")
    assert names == ["Incremental Replication", "Replication Completed"]
    assert list(jobs.jobs) == sorted(jobs.jobs, key=lambda j: j.started_at.ToDatetime(), reverse=True)
    assert _code(lambda: oma.contexts.ListRecentJobs(pb.ListRecentJobsRequest(), timeout=5))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_update_context_links_a_credential_of_the_same_vcenter(oma, oma_server):
    from oma_server.domain import credentials

    ctx = factories.context()
    same = credentials.create(oma_server.runtime.secrets, credential_name="c1", vcenter_host="vcenter.lab",
                              username="u", password="p", datacenter="DC0", created_by="t")
    other = credentials.create(oma_server.runtime.secrets, credential_name="c2", vcenter_host="elsewhere",
                               username="u", password="p", datacenter="DC0", created_by="t")
    updated = oma.contexts.UpdateVMContext(pb.UpdateVMContextRequest(
        context_id=ctx.context_id, scheduler_enabled=False, credential_id=same.id), timeout=5).context
    assert updated.credential_id == same.id and updated.scheduler_enabled is False
    row = models.VmReplicationContext.get_by_id(ctx.context_id)
    assert row.credential_id == same.id and row.scheduler_enabled is False
    code, msg = _code(lambda: oma.contexts.UpdateVMContext(pb.UpdateVMContextRequest(
        context_id=ctx.context_id, credential_id=other.id), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "elsewhere" in msg
    assert models.VmReplicationContext.get_by_id(ctx.context_id).credential_id == same.id
    unlinked = oma.contexts.UpdateVMContext(pb.UpdateVMContextRequest(
        context_id=ctx.context_id, credential_id=0), timeout=5).context
    assert not unlinked.HasField("credential_id")


def test_delete_context_cascades_everything_it_owns(oma):
    ctx = factories.context()
    keep = factories.context()
    disk = factories.disk(ctx)
    job = factories.replication_job(ctx)
    models.CbtHistory.create(vm_context=ctx.context_id, job=job.id, disk_id="disk-2000", change_id="u/1",
                             sync_type="full")
    volume = models.OsseaVolume.create(vm_context=ctx.context_id, volume_id="vol-1", volume_name="v", size_gb=1)
    mapping = models.DeviceMapping.create(vm_context=ctx.context_id, volume_uuid="vol-1", vm_id="oma",
                                          device_path="/dev/x", cloudstack_state="attached",
                                          linux_state="present", size=1)
    models.NbdExport.create(vm_context=ctx.context_id, job=job.id, volume_id="vol-1", vm_disk=disk.id,
                            device_mapping="vol-1", export_name="migration-vol-1", port=10809, device_path="/dev/x")
    models.NetworkMapping.create(vm_id=ctx.vm_name, vm_context=ctx.context_id, source_network_name="VM Network",
                                 destination_network_id="n1", destination_network_name="net")
    models.FailoverJob.create(vm_context=ctx.context_id, job_id="fo-1", vm_id=ctx.vmware_vm_id, job_type="test",
                              status="completed", source_vm_name=ctx.vm_name)
    group = models.VmMachineGroup.create(name="g")
    models.VmGroupMembership.create(group=group.id, vm_context=ctx.context_id)

    response = oma.contexts.DeleteVMContext(pb.DeleteVMContextRequest(context_id=ctx.context_id), timeout=5)
    owned = (models.ReplicationJob, models.VmDisk, models.CbtHistory, models.OsseaVolume, models.DeviceMapping,
             models.NbdExport, models.NetworkMapping, models.FailoverJob, models.VmGroupMembership)
    assert all(m.select().count() == 0 for m in owned), [m.__name__ for m in owned if m.select().count()]
    assert models.VmReplicationContext.select().count() == 1 and models.VmMachineGroup.select().count() == 1
    assert models.VmReplicationContext.get_by_id(keep.context_id)
    tracking = models.JobTracking.get_by_id(response.tracking_job_id)
    assert (tracking.operation, tracking.status, tracking.context_id) == \
        ("delete-vm-context", "completed", ctx.context_id)
    assert [s.name for s in tracking.steps] == ["delete-context-rows"]
    assert volume and mapping


def test_delete_is_refused_while_a_job_or_failover_is_active(oma):
    busy = factories.context()
    job = factories.replication_job(busy, status="replicating")
    models.VmReplicationContext.update(current_job=job.id).where(
        models.VmReplicationContext.context_id == busy.context_id).execute()
    failed_over = factories.context(current_status="failed_over_test")
    for ctx, needle in ((busy, "active replication job"), (failed_over, "failed_over_test")):
        code, msg = _code(lambda: oma.contexts.DeleteVMContext(
            pb.DeleteVMContextRequest(context_id=ctx.context_id), timeout=5))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and needle in msg
    assert models.VmReplicationContext.select().count() == 2 and models.ReplicationJob.select().count() == 1
    assert models.JobTracking.select().count() == 0  # refused operations leave nothing behind
    assert _code(lambda: oma.contexts.DeleteVMContext(
        pb.DeleteVMContextRequest(context_id="missing"), timeout=5))[0] == grpc.StatusCode.NOT_FOUND
