"""A failure injected in each step of a replication ends the job ``failed`` with the step named,
releases the VM in the same transaction, and the next replication succeeds once the cause is gone.
Every fault is a real one (a refused login, CloudStack job errors, a busy port, a busy VM, a missing
datastore, change tracking turned off for one disk), not a mock."""
from __future__ import annotations

import contextlib
import socket
import time

import grpc
import pytest
from oma.v1 import discovery_pb2
from oma.v1 import replications_pb2 as pb
from oma.v1 import vmware_credentials_pb2 as cred_pb
from vma.v1 import replication_pb2 as vma_pb
from vma.v1 import replication_pb2_grpc as vma_grpc
from vma.v1 import vcenter_pb2

from oma_server.db import models
from omalab.lab import start_lab
from tests.fixtures.servers import VMA_TOKEN
from tests.helpers.faults import datastore_gone
from vma_agent.integrations.nbdkit import NbdkitServer, file_plugin_args


def _add(lab, name):
    added = lab.client.discovery.AddVMs(discovery_pb2.AddVMsRequest(
        source=discovery_pb2.VCenterSource(credential_id=lab.credential_id), vm_names=[name]), timeout=60)
    return added.processed_vms[0].context_id


def _run(lab, context_id):
    job_id = lab.client.replications.CreateReplication(
        pb.CreateReplicationRequest(context_id=context_id), timeout=30).job_id
    return job_id, list(lab.client.watch_replication(job_id, timeout=120))[-1]


@contextlib.contextmanager
def wrong_vcenter_password(lab):
    lab.client.credentials.UpdateCredential(cred_pb.UpdateCredentialRequest(
        id=lab.credential_id, password="not-the-password"), timeout=10)
    yield
    lab.client.credentials.UpdateCredential(cred_pb.UpdateCredentialRequest(
        id=lab.credential_id, password=lab.vcenter.password), timeout=10)


@contextlib.contextmanager
def cloudstack_job_fails(lab, command):
    lab.cloudstack.fail(command, times=None, errorcode=530, errortext=f"injected {command} failure", async_job=True)
    yield
    lab.cloudstack.clear_faults()


@contextlib.contextmanager
def no_free_nbd_port(lab):
    exports = lab.oma.components.exports
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    ports = exports._ports
    exports._ports = range(port, port + 1)  # the OMA's configured export ports: all taken
    yield
    holder.close()
    exports._ports = ports


@contextlib.contextmanager
def vm_busy_with_another_job(lab, vm_name, tmp_path):
    """A job started directly on the VMA for the same VM, writing to a slow target: the VMA refuses a
    second job for the VM until it ends."""
    target = tmp_path / "slow-target.img"
    with open(target, "wb") as f:
        f.truncate(1 << 30)
    slow = NbdkitServer(file_plugin_args(target, filters=["delay"], filter_params={"wdelay": "3"}))
    slow.start()
    import grpc as _grpc
    channel = _grpc.insecure_channel(f"127.0.0.1:{lab.vma.port}")
    stub = vma_grpc.ReplicationServiceStub(channel)
    vm = lab.vcenter.vm(vm_name)
    meta = (("authorization", f"Bearer {VMA_TOKEN}"),)
    stub.StartReplication(vma_pb.StartReplicationRequest(
        job_id="direct-busy-job", connection=vcenter_pb2.VCenterConnection(
            host=lab.vcenter.address, username=lab.vcenter.username, password=lab.vcenter.password,
            thumbprint=lab.vcenter.thumbprint_sha1),
        vm=vcenter_pb2.VMReference(path=vm["path"]), enable_cbt=True,
        disks=[vma_pb.ReplicationDisk(disk_id="disk-2000", vmware_disk_key=2000, target_nbd_uri=slow.uri)],
    ), metadata=meta, timeout=30)
    yield
    stub.CancelReplication(vma_pb.CancelReplicationRequest(job_id="direct-busy-job"), metadata=meta, timeout=30)
    deadline = time.monotonic() + 60
    while stub.GetReplicationStatus(vma_pb.GetReplicationStatusRequest(job_id="direct-busy-job"),
                                    metadata=meta, timeout=10).running:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    channel.close()
    slow.stop()


@contextlib.contextmanager
def one_disk_untracked(lab, vm_name):
    """The VM's second disk has change tracking off (``scsi0:1.ctkEnabled = false`` in its extraConfig, as
    vSphere allows per disk): it is copied, but vCenter gives its snapshot no change id to continue from."""
    from pyVim.connect import Disconnect
    from pyVmomi import vim

    si = lab.vcenter.connect()
    view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.VirtualMachine], True)
    vm = next(v for v in view.view if v.name == vm_name)

    def set_ctk(value: str) -> None:
        task = vm.ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key="scsi0:1.ctkEnabled",
                                                                                          value=value)]))
        while task.info.state not in ("success", "error"):
            time.sleep(0.05)
        assert task.info.state == "success", task.info.error

    set_ctk("false")
    try:
        yield
    finally:
        set_ctk("true")
        Disconnect(si)


FAULTS = {
    "prepare-disks": lambda lab, vm, tmp: wrong_vcenter_password(lab),
    "provision-volumes": lambda lab, vm, tmp: cloudstack_job_fails(lab, "createVolume"),
    "attach-volumes": lambda lab, vm, tmp: cloudstack_job_fails(lab, "attachVolume"),
    "start-exports": lambda lab, vm, tmp: no_free_nbd_port(lab),
    "start-transfer": lambda lab, vm, tmp: vm_busy_with_another_job(lab, vm, tmp),
    "transfer": lambda lab, vm, tmp: datastore_gone(lab),
    "finalize": lambda lab, vm, tmp: one_disk_untracked(lab, vm),
}


@pytest.mark.parametrize("step", list(FAULTS))
def test_failure_in_each_step_releases_the_vm(step, db, tmp_path):
    with start_lab(tmp_path, existing_database=db, vms=2, data_vms=1) as lab:
        vm = lab.vcenter.data_vms[0]
        context_id = _add(lab, vm)
        with FAULTS[step](lab, vm, tmp_path):
            job_id, final = _run(lab, context_id)
        assert final.status == "failed", final
        assert f"step {step!r} failed" in final.error_message
        job = models.ReplicationJob.get_by_id(job_id)
        assert job.completed_at and job.error_message == final.error_message
        ctx = models.VmReplicationContext.get_by_id(context_id)
        assert (ctx.current_job_id, ctx.current_status, ctx.failed_jobs) == (None, "failed", 1)
        tracking = models.JobTracking.get(models.JobTracking.external_job_id == job_id)
        assert tracking.status == "failed" and [s.name for s in tracking.steps if s.status == "failed"] == [step]
        disks = {d.disk_id: d for d in models.VmDisk.select().where(models.VmDisk.vm_context == context_id)}
        if step == "finalize":  # the tracked disk is complete with its change id; the other one is not
            assert (disks["disk-2000"].sync_status, bool(disks["disk-2000"].disk_change_id)) == ("completed", True)
            assert (disks["disk-2001"].sync_status, disks["disk-2001"].disk_change_id) == ("failed", None)
            assert "disk-2001" in final.error_message and "change tracking" in final.error_message
        else:
            assert all(d.sync_status in ("failed", "pending") for d in disks.values())

        _, retry = _run(lab, context_id)
        assert retry.status == "completed", retry.error_message
        ctx = models.VmReplicationContext.get_by_id(context_id)
        assert (ctx.current_job_id, ctx.current_status, ctx.successful_jobs) == (None, "ready_for_failover", 1)


def test_update_replication_completes_only_with_stored_change_ids(lab_private):
    lab = lab_private
    context_id = _add(lab, lab.vm_names()[0])
    lab.cloudstack.set_job_delay(2.0, command="createVolume")
    job_id = lab.client.replications.CreateReplication(pb.CreateReplicationRequest(context_id=context_id), timeout=30).job_id
    with pytest.raises(grpc.RpcError) as err:
        lab.client.replications.UpdateReplication(pb.UpdateReplicationRequest(job_id=job_id, status="completed"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no change id stored" in err.value.details()
    failed = lab.client.replications.UpdateReplication(pb.UpdateReplicationRequest(
        job_id=job_id, status="failed", error_message="operator gave up"), timeout=10)
    assert failed.applied and failed.job.status == "failed"
    again = lab.client.replications.UpdateReplication(pb.UpdateReplicationRequest(
        job_id=job_id, status="failed", error_message="twice"), timeout=10)
    assert not again.applied and again.job.error_message == "operator gave up"
    assert models.VmReplicationContext.get_by_id(context_id).current_job_id is None
