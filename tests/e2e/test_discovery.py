"""DiscoveryService on the simulated vCenter through the VMA (mapping: discover-vms writes contexts
when create_context; add-vms/bulk-add write vm_replication_contexts without replication_jobs;
preview is read-only) and VMwareCredentialService.TestCredential."""
from __future__ import annotations

import socket

import grpc
import pytest
from oma.v1 import discovery_pb2 as pb
from oma.v1 import vmware_credentials_pb2 as cred_pb

from oma_server.db import models
from tests import factories


def _error(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def _source(lab, **kw):
    return pb.VCenterSource(credential_id=lab.credential_id, **kw)


def test_preview_is_read_only_and_lists_every_vm(lab):
    before = factories.db_snapshot()
    preview = lab.client.discovery.PreviewDiscovery(pb.PreviewDiscoveryRequest(source=_source(lab)), timeout=60)
    assert preview.total_discovered == len(lab.vm_names()) and preview.new_vms == preview.total_discovered
    assert {v.vm.name for v in preview.vms} == set(lab.vm_names())
    assert all(len(v.vm.disks) == 2 and v.vm.disks[0].capacity_bytes for v in preview.vms)
    assert factories.db_snapshot() == before  # read-only on the database, credential counters included
    lab.client.discovery.DiscoverVMs(pb.DiscoverVMsRequest(source=_source(lab)), timeout=60)
    cred = models.VmwareCredential.get_by_id(lab.credential_id)
    assert cred.usage_count == 1 and cred.last_used is not None  # using a saved credential is recorded


def test_add_vms_writes_contexts_and_disks_but_no_jobs(lab):
    names = lab.vm_names()[:2]
    added = lab.client.discovery.AddVMs(pb.AddVMsRequest(
        source=_source(lab), vm_names=[*names, "no-such-vm"], added_by="ops"), timeout=60)
    assert (added.vms_added, added.vms_not_found, added.success) == (2, 1, False)
    outcomes = {p.vm_name: p.outcome for p in added.processed_vms}
    assert outcomes == {names[0]: "added", names[1]: "added", "no-such-vm": "not_found"}
    assert models.ReplicationJob.select().count() == 0
    for p in added.processed_vms[:2]:
        ctx = models.VmReplicationContext.get_by_id(p.context_id)
        manifest = lab.vcenter.vm(ctx.vm_name)
        assert (ctx.current_status, ctx.auto_added, ctx.scheduler_enabled) == ("discovered", True, True)
        assert ctx.credential_id == lab.credential_id and ctx.ossea_config_id == lab.ossea_config_id
        assert ctx.vcenter_host == lab.vcenter.address and ctx.vm_path == manifest["path"]
        assert ctx.os_type in ("windows", "linux") and ctx.cpu_count > 0
        disks = sorted(models.VmDisk.select().where(models.VmDisk.vm_context == ctx.context_id),
                       key=lambda d: d.unit_number)
        assert [d.disk_id for d in disks] == [f"disk-{d['key']}" for d in manifest["disks"]]
        assert all(d.job_id is None and d.capacity_bytes == 64 << 20 and d.size_gb == 1 for d in disks)
        assert disks[0].vmdk_path == manifest["disks"][0]["file_name"] and disks[0].network_config
    job = models.JobTracking.get_by_id(added.tracking_job_id)
    assert (job.job_type, job.operation, job.status) == ("discovery", "bulk-add-vms", "failed")
    assert [s.name for s in job.steps] == ["vma-discovery", "add-contexts"]

    # Adding the same set again changes nothing: both are reported skipped with their context.
    contexts_before = models.VmReplicationContext.select().count()
    again = lab.client.discovery.AddVMs(pb.AddVMsRequest(source=_source(lab), vm_names=names), timeout=60)
    assert again.vms_skipped == 2 and again.success and all(p.existing_context_id for p in again.processed_vms)
    assert models.VmReplicationContext.select().count() == contexts_before


def test_discover_vms_with_create_context_reuses_the_inventory(lab):
    name = lab.vm_names()[0]
    code, _ = _error(lambda: lab.client.discovery.DiscoverVMs(
        pb.DiscoverVMsRequest(source=_source(lab), create_context=True), timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT  # an empty selection never adds everything
    response = lab.client.discovery.DiscoverVMs(pb.DiscoverVMsRequest(
        source=_source(lab), create_context=True, selected_vms=[name]), timeout=60)
    assert response.addition_result.vms_added == 1 and response.status == "success"
    existing = [v for v in response.discovered_vms if v.existing]
    assert [v.vm.name for v in existing] == [name] and existing[0].context_id
    vm = existing[0].vm
    assert vm.disks[0].id == "disk-2000" and vm.networks and vm.moref and vm.id


def test_bulk_add_with_explicit_credentials(lab):
    names = lab.vm_names()[2:4]
    response = lab.client.discovery.BulkAddVMs(pb.BulkAddVMsRequest(
        vcenter=lab.vcenter.address, username=lab.vcenter.username, password=lab.vcenter.password,
        datacenter=lab.vcenter.datacenters[0], thumbprint=lab.vcenter.thumbprint_sha1, selected_vms=names), timeout=60)
    assert response.successfully_added == 2 and [v.vm_name for v in response.added_vms] == names
    assert all(c.credential_id is None for c in models.VmReplicationContext.select())


def test_bad_input_and_vcenter_failures_leave_the_database_alone(lab):
    before = {m: m.select().count() for m in (models.VmReplicationContext, models.JobTracking)}
    code, msg = _error(lambda: lab.client.discovery.AddVMs(pb.AddVMsRequest(
        source=pb.VCenterSource(vcenter="x", username="u"), vm_names=["a"]), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "password" in msg
    assert _error(lambda: lab.client.discovery.AddVMs(pb.AddVMsRequest(
        source=pb.VCenterSource(credential_id=999), vm_names=["a"]), timeout=30))[0] == grpc.StatusCode.NOT_FOUND
    code, msg = _error(lambda: lab.client.discovery.AddVMs(pb.AddVMsRequest(source=pb.VCenterSource(
        vcenter=lab.vcenter.address, username=lab.vcenter.username, password="wrong-password",
        datacenter=lab.vcenter.datacenters[0], insecure=True), vm_names=["a"]), timeout=30))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "wrong-password" not in msg
    code, msg = _error(lambda: lab.client.discovery.PreviewDiscovery(pb.PreviewDiscoveryRequest(source=pb.VCenterSource(
        vcenter="127.0.0.1:9", username="u", password="p", datacenter="DC0", insecure=True)), timeout=60))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert {m: m.select().count() for m in before} == before


def test_test_credential_reports_success_or_the_reason(lab):
    ok = lab.client.credentials.TestCredential(cred_pb.TestCredentialRequest(id=lab.credential_id), timeout=60)
    assert ok.success and lab.vcenter.datacenters[0] in ok.datacenters
    bad = lab.client.credentials.CreateCredential(cred_pb.CreateCredentialRequest(
        credential_name="bad", vcenter_host=lab.vcenter.address, username=lab.vcenter.username,
        password="nope-wrong", datacenter="DC0", tls_insecure=True), timeout=10).credential
    failed = lab.client.credentials.TestCredential(cred_pb.TestCredentialRequest(id=bad.id), timeout=60)
    assert not failed.success and failed.error and "nope-wrong" not in failed.error
    assert models.VmwareCredential.get_by_id(bad.id).usage_count == 1


def test_vma_down_is_unavailable(lab):
    lab.vma.stop(grace=None)
    code, msg = _error(lambda: lab.client.discovery.PreviewDiscovery(
        pb.PreviewDiscoveryRequest(source=_source(lab)), timeout=60))
    assert code == grpc.StatusCode.UNAVAILABLE and "VMA agent" in msg


def test_a_saved_password_is_never_sent_to_a_host_the_caller_chooses(lab):
    """Issue 9 item 3: neither an edit without the password nor connection details next to a
    credential_id can make the OMA log in elsewhere with the stored password."""
    with socket.socket() as trap:  # a host the caller controls: it must never see a connection
        trap.bind(("127.0.0.1", 0))
        trap.listen(4)
        trap.settimeout(0.5)
        elsewhere = f"127.0.0.1:{trap.getsockname()[1]}"
        for change in (dict(vcenter_host=elsewhere), dict(tls_insecure=True), dict(tls_thumbprint="")):
            code = factories.refused_without_writes(lambda: lab.client.credentials.UpdateCredential(
                cred_pb.UpdateCredentialRequest(id=lab.credential_id, **change), timeout=10))
            assert code == grpc.StatusCode.FAILED_PRECONDITION
        for mixed in (dict(vcenter=elsewhere), dict(insecure=True), dict(thumbprint="AA:" * 31 + "AA")):
            code = factories.refused_without_writes(lambda: lab.client.discovery.PreviewDiscovery(
                pb.PreviewDiscoveryRequest(source=_source(lab, **mixed)), timeout=30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
        # TestCredential still logs in where the credential was saved for.
        ok = lab.client.credentials.TestCredential(cred_pb.TestCredentialRequest(id=lab.credential_id), timeout=60)
        assert ok.success
        with pytest.raises(socket.timeout):
            trap.accept()
