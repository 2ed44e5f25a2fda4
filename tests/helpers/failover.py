"""Failover on the lab (``omalab.lab.Lab``): the expected step names, a prepared VM (added, replicated, networks
mapped, CloudStack complete), starting and watching a failover, and checks of where its volumes are."""
from __future__ import annotations

import time

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
