"""ValidationService (mapping: VM validation endpoints read vm_replication_contexts, replication_jobs,
vm_disks, network_mappings, device_mappings, nbd_exports) and the failover readiness checks the
failover workflow reuses (oma_server.domain.readiness). Every RPC here is read-only: each call is
made between two snapshots of the database."""
from __future__ import annotations

from datetime import timedelta

import grpc
from oma.v1 import discovery_pb2
from oma.v1 import network_mappings_pb2 as nm_pb
from oma.v1 import ossea_config_pb2 as ossea_pb
from oma.v1 import replications_pb2 as rep_pb
from oma.v1 import validation_pb2 as pb

from oma_server.db import models
from oma_server.domain import joblog, network_mappings, readiness
from omaclient.client import OmaClient
from tests import factories
from tests.factories import read_without_writes, refused_without_writes
from tests.fixtures.servers import ADMIN_PASSWORD


def _readiness(client, vm_id, failover_type=""):
    response = read_without_writes(lambda: client.validation.GetVMFailoverReadiness(
        pb.GetVMFailoverReadinessRequest(vm_id=vm_id, failover_type=failover_type), timeout=30))
    return response, {c.check_name: c for c in response.validation_result.checks}


def _failed(checks):
    return sorted(name for name, c in checks.items() if c.status == "fail")


def test_readiness_after_a_real_replication_passes_and_fails_for_each_cause(lab_private):
    lab = lab_private
    client = lab.client
    added = client.discovery.AddVMs(discovery_pb2.AddVMsRequest(
        source=discovery_pb2.VCenterSource(credential_id=lab.credential_id), vm_names=[lab.vcenter.data_vms[0]]),
        timeout=60)
    context_id = added.processed_vms[0].context_id
    job_id = client.replications.CreateReplication(rep_pb.CreateReplicationRequest(context_id=context_id),
                                                   timeout=30).job_id
    assert list(client.watch_replication(job_id, timeout=120))[-1].status == "completed"
    ctx = models.VmReplicationContext.get_by_id(context_id)

    # Replicated, but the networks are unmapped and the configuration has no template yet.
    response, checks = _readiness(client, context_id)
    assert not response.is_ready and _failed(checks) == ["Network Mappings", "OSSEA Config"]
    assert "template_id" in checks["OSSEA Config"].message and response.readiness_score == 80
    assert len(response.required_actions) == 2 and len(response.validation_result.validation_errors) == 2

    sources = network_mappings.source_networks(context_id)
    assert sources
    for name in sources:
        for test in (False, True):
            client.network_mappings.CreateNetworkMapping(nm_pb.CreateNetworkMappingRequest(
                vm_context_id=context_id, source_network_name=name, destination_network_id=lab.cloudstack.network_id,
                is_test_network=test), timeout=10)
    client.ossea.UpdateConfig(ossea_pb.UpdateConfigRequest(
        id=lab.ossea_config_id, template_id=lab.cloudstack.template_id,
        service_offering_id=lab.cloudstack.service_offering_id), timeout=10)

    for failover_type, names in (("live", 10), ("test", 8)):
        response, checks = _readiness(client, context_id, failover_type)
        assert response.is_ready and response.readiness_score == 100, response.validation_result.validation_errors
        assert len(checks) == names and all(c.check_type == "critical" for c in checks.values())
        assert not response.required_actions and response.validation_result.is_valid
    assert set(checks) == {"VM Status", "Active Jobs", "VM Existence", "Sync Status", "Volume State", "OS Disk",
                           "Network Mappings", "OSSEA Config"}
    response, checks = _readiness(client, ctx.vmware_vm_id)  # the VMware id names the same VM
    assert response.context_id == context_id and response.vm_name == ctx.vm_name and response.is_ready
    assert checks["VMA Connectivity"].status == "pass" and checks["vCenter Credentials"].status == "pass"
    assert checks["OS Disk"].details["disk_id"] == "disk-2000"
    assert checks["Sync Status"].details["job_id"] == job_id

    # The other read views of the same VM.
    sync = read_without_writes(lambda: client.validation.GetVMSyncStatus(pb.GetVMSyncStatusRequest(vm_id=context_id), timeout=10))
    job = models.ReplicationJob.get_by_id(job_id)
    assert sync.sync_status.has_valid_change_id and sync.sync_status.is_sync_up_to_date
    assert (sync.sync_status.sync_completion_rate, sync.sync_status.sync_jobs_active) == (100, 0)
    assert sync.sync_status.total_synced_bytes == job.bytes_transferred > 0
    volumes = read_without_writes(lambda: client.validation.GetVMVolumeStatus(pb.GetVMVolumeStatusRequest(vm_id=context_id),
                                                                timeout=10)).volume_status
    assert (volumes.total_volumes, volumes.ready_volumes, volumes.all_volumes_ready) == (2, 2, True)
    assert volumes.volume_integrity_checked and volumes.has_ossea_volumes and not volumes.volume_issues
    assert {v.placement for v in volumes.volumes} == {"on_oma"}
    assert {v.attached_vm_id for v in volumes.volumes} == {lab.cloudstack.oma_vm_id}

    # Each cause makes it fail, and names itself.
    active = factories.replication_job(ctx, status="replicating", progress_percent=40)
    _, checks = _readiness(client, context_id)
    assert _failed(checks) == ["Active Jobs"] and active.id in checks["Active Jobs"].message
    active.delete_instance()

    models.NetworkMapping.delete().where(models.NetworkMapping.vm_context == context_id,
                                         models.NetworkMapping.is_test_network == True).execute()  # noqa: E712
    _, checks = _readiness(client, context_id, "test")
    assert _failed(checks) == ["Network Mappings"] and sources[0] in checks["Network Mappings"].message
    assert _readiness(client, context_id, "live")[0].is_ready  # live mappings still cover every network
    status = read_without_writes(lambda: client.validation.GetVMNetworkMappingStatus(pb.GetVMNetworkMappingStatusRequest(
        vm_id=context_id, failover_type="test"), timeout=10))
    assert list(status.network_status.unmapped_networks) == sources and not status.network_status.all_networks_mapped

    first, second = (models.DeviceMapping.select().where(models.DeviceMapping.vm_context == context_id)
                     .order_by(models.DeviceMapping.volume_uuid))
    for change, placement in ((dict(operation_mode="failover"), "on_oma_locked"),
                              (dict(vm_id="destination-vm"), "on_destination")):
        models.DeviceMapping.update(**change).where(models.DeviceMapping.id == first.id).execute()
        _, checks = _readiness(client, context_id)
        assert _failed(checks) == ["Volume State"] and first.volume_uuid in checks["Volume State"].message
        by_volume = {v.volume_id: v for v in read_without_writes(lambda: client.validation.GetVMVolumeStatus(
            pb.GetVMVolumeStatusRequest(vm_id=context_id), timeout=10)).volume_status.volumes}
        assert (by_volume[first.volume_uuid].placement, by_volume[first.volume_uuid].ready) == (placement, False)
        assert by_volume[second.volume_uuid].placement == "on_oma"
    models.DeviceMapping.delete().where(models.DeviceMapping.id == first.id).execute()
    volumes = read_without_writes(lambda: client.validation.GetVMVolumeStatus(pb.GetVMVolumeStatusRequest(vm_id=context_id),
                                                                timeout=10)).volume_status
    assert volumes.ready_volumes == 1 and not volumes.all_volumes_ready
    assert [v.placement for v in volumes.volumes if v.volume_id == first.volume_uuid] == ["detached"]


def _replicated_context(**overrides):
    """A context that looks replicated (rows only): a completed job with change ids, one disk whose
    replica volume is attached to the OMA, its network mapped for both failover types."""
    ctx = factories.context(current_status="ready_for_failover", **overrides)
    job = factories.replication_job(ctx, bytes_transferred=1000)
    volume = models.OsseaVolume.create(vm_context=ctx.context_id, volume_id=f"vol-{ctx.vm_name}", volume_name="v",
                                       size_gb=1)
    factories.disk(ctx, job=job.id, ossea_volume_id=volume.id, disk_change_id="52 aa/1",
                   network_config=[{"network_name": "VM Network"}])
    models.DeviceMapping.create(vm_context=ctx.context_id, volume_uuid=volume.volume_id, vm_id="oma-vm",
                                device_path=f"/dev/{ctx.vm_name}", cloudstack_state="attached", linux_state="present",
                                size=1 << 30)
    models.CbtHistory.create(vm_context=ctx.context_id, job=job.id, disk_id="disk-2000", change_id="52 aa/1",
                             sync_type="full", sync_success=True)
    models.NetworkMapping.create(vm_id=ctx.vm_name, vm_context=ctx.context_id, source_network_name="VM Network",
                                 destination_network_id="net-1", destination_network_name="prod", mapping_type="both")
    return ctx, job


def _complete_config(**overrides):
    values = dict(name="cs", api_url="http://127.0.0.1:9/client/api", api_key="k", secret_key="s", zone="zone-a",
                  template_id="tpl", service_offering_id="so", oma_vm_id="oma-vm")
    values.update(overrides)
    return models.OsseaConfig.create(**values)


def test_readiness_without_a_replication_names_every_cause(oma):
    ctx = factories.context()
    factories.disk(ctx, network_config=[{"network_name": "VM Network"}])
    response, checks = _readiness(oma, ctx.context_id)
    assert _failed(checks) == ["Network Mappings", "OSSEA Config", "Sync Status", "VM Existence", "VM Status",
                               "Volume State", "vCenter Credentials"]
    assert {n for n, c in checks.items() if c.status == "pass"} == {"Active Jobs", "OS Disk", "VMA Connectivity"}
    assert response.readiness_score == 30 and not response.is_ready
    assert "discovered" in checks["VM Status"].message and "never replicated" in checks["Volume State"].message
    assert len(response.required_actions) == 7 and response.message.startswith(f"{ctx.vm_name} is not ready")


def test_readiness_reports_an_unreachable_vma_and_the_callers_own_failover(oma_factory):
    server = oma_factory(vma_address="127.0.0.1:9", vma_retries=0)
    ctx, _ = _replicated_context()
    _complete_config()
    models.VmwareCredential.create(credential_name="vc", vcenter_host=ctx.vcenter_host, username="u",
                                   password_encrypted="x", datacenter="DC0", is_default=True)
    with OmaClient(f"127.0.0.1:{server.port}", token="") as client:
        client.login("admin", ADMIN_PASSWORD)
        response, checks = _readiness(client, ctx.context_id, "live")
        assert _failed(checks) == ["VMA Connectivity"] and "127.0.0.1:9" in checks["VMA Connectivity"].message
        assert _readiness(client, ctx.context_id, "test")[0].is_ready  # a test failover needs no VMA

    # The failover workflow passes its own record so it does not block itself; without a VMA client
    # the connectivity check is skipped.
    models.FailoverJob.create(vm_context=ctx.context_id, job_id="fo-own", vm_id=ctx.vmware_vm_id, job_type="live",
                              status="validating", source_vm_name=ctx.vm_name)
    assert [c.check_name for c in readiness.failover_readiness(ctx, "live").checks if c.status == "fail"] == \
        ["Active Jobs"]
    result = readiness.failover_readiness(ctx, "live", own_failover_job_id="fo-own")
    assert result.is_valid and result.score == 90 and result.checks[-1].status == "skip"


def test_sync_status_comes_from_cbt_history_jobs_and_disks(oma):
    ctx = factories.context()
    now = models.utcnow()
    old = factories.replication_job(ctx, status="failed", bytes_transferred=5, created_at=now - timedelta(hours=2))
    done = factories.replication_job(ctx, bytes_transferred=100, created_at=now - timedelta(hours=1))
    factories.disk(ctx, disk_change_id="52 aa/7")
    models.CbtHistory.create(vm_context=ctx.context_id, job=done.id, disk_id="disk-2000", change_id="52 aa/7",
                             sync_type="full", sync_success=True, created_at=now - timedelta(minutes=50))
    models.CbtHistory.create(vm_context=ctx.context_id, job=old.id, disk_id="disk-2000", change_id="52 zz/1",
                             sync_type="full", sync_success=False, created_at=now - timedelta(minutes=40))
    models.CbtHistory.create(job=done.id, disk_id="disk-2000", change_id="", sync_type="full", sync_success=True,
                             created_at=now - timedelta(minutes=30))

    def status():
        return read_without_writes(lambda: oma.validation.GetVMSyncStatus(pb.GetVMSyncStatusRequest(vm_id=ctx.vmware_vm_id),
                                                            timeout=10)).sync_status

    sync = status()
    assert (sync.has_valid_change_id, sync.last_change_id, sync.sync_completion_rate) == (True, "52 aa/7", 50)
    assert sync.last_sync_time.ToDatetime() == now - timedelta(minutes=50)
    assert (sync.is_sync_up_to_date, sync.total_synced_bytes, sync.sync_jobs_active) == (True, 105, 0)

    factories.replication_job(ctx, status="replicating", created_at=now)
    sync = status()
    assert (sync.sync_jobs_active, sync.is_sync_up_to_date) == (1, False)

    empty = factories.context()
    sync = read_without_writes(lambda: oma.validation.GetVMSyncStatus(pb.GetVMSyncStatusRequest(vm_id=empty.context_id),
                                                        timeout=10)).sync_status
    assert not sync.has_valid_change_id and not sync.HasField("last_sync_time") and sync.sync_completion_rate == 0


def test_network_mapping_status_per_failover_type(oma):
    ctx = factories.context()
    factories.disk(ctx, network_config=[{"network_name": "VM Network"}, {"network_name": "Backup"}])

    def status(failover_type):
        return read_without_writes(lambda: oma.validation.GetVMNetworkMappingStatus(pb.GetVMNetworkMappingStatusRequest(
            vm_id=ctx.context_id, failover_type=failover_type), timeout=10))

    none = status("").network_status
    assert (none.total_source_networks, none.mapped_networks, list(none.unmapped_networks)) == \
        (2, 0, ["Backup", "VM Network"])
    assert not none.test_network_configured and status("").failover_type == "live"

    common = dict(vm_id=ctx.vm_name, vm_context=ctx.context_id, destination_network_id="net-1")
    models.NetworkMapping.create(source_network_name="VM Network", destination_network_name="prod", **common)
    models.NetworkMapping.create(source_network_name="Backup", destination_network_name="backup", mapping_type="both",
                                 **common)
    models.NetworkMapping.create(source_network_name="VM Network", destination_network_name="lab",
                                 is_test_network=True, mapping_type="test", validation_status="invalid", **common)
    live = status("live").network_status
    assert (live.mapped_networks, live.all_networks_mapped, live.test_network_configured) == (2, True, True)
    test = status("test")
    assert test.failover_type == "test"
    assert (list(test.network_status.unmapped_networks), list(test.network_status.invalid_mappings)) == \
        (["VM Network"], ["VM Network → lab"])
    assert test.network_status.mapped_networks == 1 and not test.network_status.all_networks_mapped


def test_active_jobs_list_replications_failovers_and_joblog_work_once(oma):
    ctx, _ = _replicated_context()
    other = factories.context()
    now = models.utcnow()
    copying = factories.replication_job(ctx, status="replicating", progress_percent=40,
                                        started_at=now - timedelta(minutes=9))
    joblog.start_job("migration", "replication", context_id=ctx.context_id, external_job_id=copying.id)
    models.FailoverJob.create(vm_context=ctx.context_id, job_id="fo-legacy", vm_id=ctx.vmware_vm_id, job_type="test",
                              status="validating", source_vm_name=ctx.vm_name, created_at=now - timedelta(minutes=8))
    tracked = joblog.start_job("failover", "unified-live-failover", context_id=ctx.context_id, category="failover",
                               expected_steps=4)
    with joblog.step(tracked, "validation"):
        pass
    models.FailoverJob.create(vm_context=ctx.context_id, job_id=tracked, vm_id=ctx.vmware_vm_id, job_type="live",
                              status="snapshotting", source_vm_name=ctx.vm_name, started_at=now - timedelta(minutes=7))
    models.FailoverJob.create(vm_context=ctx.context_id, job_id="fo-done", vm_id=ctx.vmware_vm_id, job_type="test",
                              status="completed", source_vm_name=ctx.vm_name)
    cleanup = joblog.start_job("cleanup", "test-failover-cleanup", context_id=ctx.context_id)
    finished = joblog.start_job("cleanup", "old-cleanup", context_id=ctx.context_id)
    joblog.end_job(finished, "completed")
    joblog.start_job("cleanup", "elsewhere", context_id=other.context_id)
    factories.replication_job(other, status="pending")

    response = read_without_writes(lambda: oma.validation.GetVMActiveJobs(pb.GetVMActiveJobsRequest(vm_id=ctx.context_id),
                                                            timeout=10))
    listed = [(j.kind, j.id, j.status, j.progress, j.operation) for j in response.active_jobs]
    assert listed == [
        ("replication", copying.id, "replicating", 40, "initial"),
        ("failover", "fo-legacy", "validating", 10, "test"),
        ("failover", tracked, "snapshotting", 25, "live"),  # 1 of 4 expected steps
        ("job", cleanup, "running", 0, "test-failover-cleanup"),
    ]
    assert response.jobs_count == 4 and response.has_active_jobs
    quiet = factories.context()
    idle = read_without_writes(lambda: oma.validation.GetVMActiveJobs(pb.GetVMActiveJobsRequest(vm_id=quiet.context_id), timeout=10))
    assert (idle.jobs_count, idle.has_active_jobs, list(idle.active_jobs)) == (0, False, [])


def test_configuration_check_overall_pass_warning_fail(oma):
    ctx, _ = _replicated_context()
    config = _complete_config()
    credential = models.VmwareCredential.create(credential_name="vc", vcenter_host=ctx.vcenter_host, username="u",
                                                password_encrypted="x", datacenter="DC0", is_default=True)

    def check():
        response = read_without_writes(lambda: oma.validation.ValidateVMConfiguration(pb.ValidateVMConfigurationRequest(
            vm_id=ctx.context_id), timeout=10))
        return response, {c.check_name: c.status for c in response.checks}

    response, statuses = check()
    assert response.overall_status == "pass" and set(statuses.values()) == {"pass"}
    assert (response.total_checks, response.passed_checks, response.warning_checks, response.failed_checks) == \
        (5, 5, 0, 0)
    assert set(statuses) == {"Network Mappings", "Volume State", "VM Existence", "OSSEA Config", "Credentials"}

    models.OsseaConfig.update(template_id=None).where(models.OsseaConfig.id == config.id).execute()
    models.VmDisk.update(network_config=[{"network_name": "VM Network"}, {"network_name": "DMZ"}]).where(
        models.VmDisk.vm_context == ctx.context_id).execute()
    response, statuses = check()
    assert response.overall_status == "warning" and (response.passed_checks, response.warning_checks) == (3, 2)
    assert statuses["OSSEA Config"] == statuses["Network Mappings"] == "warning"

    models.VmwareCredential.update(is_active=False, is_default=False).where(
        models.VmwareCredential.id == credential.id).execute()
    response, statuses = check()
    assert response.overall_status == "fail" and statuses["Credentials"] == "fail" and response.failed_checks == 1


def test_unknown_vms_and_bad_input_are_rejected(oma):
    ctx = factories.context(vmware_vm_id="uuid-shared")
    factories.context(vmware_vm_id="uuid-shared", vcenter_host="vc2.lab")
    calls = {
        "GetVMFailoverReadiness": lambda vm_id: oma.validation.GetVMFailoverReadiness(
            pb.GetVMFailoverReadinessRequest(vm_id=vm_id), timeout=10),
        "GetVMSyncStatus": lambda vm_id: oma.validation.GetVMSyncStatus(pb.GetVMSyncStatusRequest(vm_id=vm_id),
                                                                        timeout=10),
        "GetVMNetworkMappingStatus": lambda vm_id: oma.validation.GetVMNetworkMappingStatus(
            pb.GetVMNetworkMappingStatusRequest(vm_id=vm_id), timeout=10),
        "GetVMVolumeStatus": lambda vm_id: oma.validation.GetVMVolumeStatus(pb.GetVMVolumeStatusRequest(vm_id=vm_id),
                                                                            timeout=10),
        "GetVMActiveJobs": lambda vm_id: oma.validation.GetVMActiveJobs(pb.GetVMActiveJobsRequest(vm_id=vm_id),
                                                                        timeout=10),
        "ValidateVMConfiguration": lambda vm_id: oma.validation.ValidateVMConfiguration(
            pb.ValidateVMConfigurationRequest(vm_id=vm_id), timeout=10),
    }
    for name, call in calls.items():
        assert refused_without_writes(lambda: call("no-such-vm")) == grpc.StatusCode.NOT_FOUND, name
        assert refused_without_writes(lambda: call("")) == grpc.StatusCode.INVALID_ARGUMENT, name
        assert refused_without_writes(lambda: call("uuid-shared")) == grpc.StatusCode.FAILED_PRECONDITION, name
        assert read_without_writes(lambda: call(ctx.context_id)).context_id == ctx.context_id, name
    assert refused_without_writes(lambda: oma.validation.GetVMFailoverReadiness(pb.GetVMFailoverReadinessRequest(
        vm_id=ctx.context_id, failover_type="sideways"), timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    assert refused_without_writes(lambda: oma.validation.GetVMNetworkMappingStatus(pb.GetVMNetworkMappingStatusRequest(
        vm_id=ctx.context_id, failover_type="LIVE"), timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
