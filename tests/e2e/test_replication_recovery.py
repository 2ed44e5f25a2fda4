"""An OMA restart never leaves a VM blocked: a job cut during setup fails ("interrupted"), a job that
was copying is followed again from the VMA's progress stream and completes."""
from __future__ import annotations

import os
import time

from oma.v1 import discovery_pb2
from oma.v1 import replications_pb2 as pb

from oma_server.db import models
from omaclient.client import OmaClient
from omalab.lab import sha256_prefix, start_lab
from tests.fixtures.servers import ADMIN_PASSWORD, start_oma

# Source reads throttled (the agent's rate limit) so a copy of the 64 MiB data disks lasts seconds.
THROTTLED = {"source_rate_limit_mbps": 16}


def _wait_status(job_id, statuses, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = models.ReplicationJob.get_by_id(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {statuses}")


def _restart_oma(lab, db, tmp_path):
    """Stop the lab's OMA and start another on the same database and settings."""
    settings = lab.oma.runtime.settings
    lab.oma.stop(grace=None)
    return start_oma(tmp_path / "oma", db, **{k: getattr(settings, k) for k in (
        "vma_address", "device_dir", "device_wait_seconds", "replica_extra_gib", "nbd_port_min", "nbd_port_max")})


def test_a_copying_job_is_followed_again_after_a_restart(db, tmp_path):
    with start_lab(tmp_path, existing_database=db, vms=1, data_vms=1, vma_settings=THROTTLED) as lab:
        vm = lab.vcenter.data_vms[0]
        context_id = lab.client.discovery.AddVMs(discovery_pb2.AddVMsRequest(
            source=discovery_pb2.VCenterSource(credential_id=lab.credential_id), vm_names=[vm]),
            timeout=60).processed_vms[0].context_id
        job_id = lab.client.replications.CreateReplication(
            pb.CreateReplicationRequest(context_id=context_id), timeout=30).job_id
        _wait_status(job_id, ("replicating",))
        with _restart_oma(lab, db, tmp_path) as second:
            assert models.ReplicationJob.get_by_id(job_id).status == "replicating"  # left for the next OMA
            client = OmaClient(f"127.0.0.1:{second.port}", token="")
            client.login("admin", ADMIN_PASSWORD)
            final = list(client.watch_replication(job_id, timeout=120))[-1]
            client.close()
            assert final.status == "completed", final.error_message
            ctx = models.VmReplicationContext.get_by_id(context_id)
            assert ctx.current_job_id is None and ctx.current_status == "ready_for_failover"
            steps = [s.name for s in models.JobTracking.get(models.JobTracking.external_job_id == job_id).steps]
            assert steps[-3:] == ["restore-exports", "transfer", "finalize"]  # the resumed part
            for disk in models.VmDisk.select().where(models.VmDisk.vm_context == context_id):
                volume = models.OsseaVolume.get_by_id(disk.ossea_volume_id)
                source = lab.vcenter.disk_file(vm, disk.disk_id)
                size = os.path.getsize(source)
                assert sha256_prefix(lab.volume_file(volume.volume_id), size) == sha256_prefix(source, size)


def test_a_job_cut_during_setup_fails_and_releases_the_vm(db, tmp_path):
    with start_lab(tmp_path, existing_database=db, vms=1, data_vms=1) as lab:
        lab.cloudstack.set_job_delay(3.0, command="createVolume")
        context_id = lab.client.discovery.AddVMs(discovery_pb2.AddVMsRequest(
            source=discovery_pb2.VCenterSource(credential_id=lab.credential_id), vm_names=[lab.vcenter.data_vms[0]]),
            timeout=60).processed_vms[0].context_id
        job_id = lab.client.replications.CreateReplication(
            pb.CreateReplicationRequest(context_id=context_id), timeout=30).job_id
        _wait_status(job_id, ("provisioning",))
        with _restart_oma(lab, db, tmp_path):
            job = models.ReplicationJob.get_by_id(job_id)
            assert job.status == "failed" and "interrupted: the OMA process running its setup stopped" in job.error_message
            ctx = models.VmReplicationContext.get_by_id(context_id)
            assert ctx.current_job_id is None and ctx.current_status == "failed"


def test_another_oma_process_takes_over_and_never_steals_a_live_job(db, tmp_path):
    with start_lab(tmp_path, existing_database=db, vms=1, data_vms=1, vma_settings=THROTTLED,
                   oma_settings={"instance_name": "oma-a", "worker_lease_seconds": 1.5}) as lab:
        settings = lab.oma.runtime.settings
        shared = {k: getattr(settings, k) for k in (
            "vma_address", "device_dir", "device_wait_seconds", "replica_extra_gib", "nbd_port_min", "nbd_port_max")}
        # Processes sharing a database share its keys: same data dir (or OMA_ENCRYPTION_KEY/OMA_TOKEN_SECRET).
        with start_oma(tmp_path / "oma", db, instance_name="oma-b", worker_lease_seconds=1.5, **shared) as other:
            vm = lab.vcenter.data_vms[0]
            context_id = lab.client.discovery.AddVMs(discovery_pb2.AddVMsRequest(
                source=discovery_pb2.VCenterSource(credential_id=lab.credential_id), vm_names=[vm]),
                timeout=60).processed_vms[0].context_id
            job_id = lab.client.replications.CreateReplication(
                pb.CreateReplicationRequest(context_id=context_id), timeout=30).job_id
            _wait_status(job_id, ("replicating",))
            time.sleep(2.0)  # longer than a lease: B sweeps, but A renews its lease, so B leaves it
            job = models.ReplicationJob.get_by_id(job_id)
            assert (job.worker, job.status) == ("oma-a", "replicating")
            lab.oma.stop(grace=None)  # A goes away and hands its lease back
            client = OmaClient(f"127.0.0.1:{other.port}", token="")
            client.login("admin", ADMIN_PASSWORD)
            final = list(client.watch_replication(job_id, timeout=120))[-1]
            client.close()
            assert final.status == "completed", final.error_message
            job = models.ReplicationJob.get_by_id(job_id)
            steps = [s.name for s in models.JobTracking.get(models.JobTracking.external_job_id == job_id).steps]
            assert steps[-3:] == ["restore-exports", "transfer", "finalize"] and job.worker == "oma-b"
            for disk in models.VmDisk.select().where(models.VmDisk.vm_context == context_id):
                volume = models.OsseaVolume.get_by_id(disk.ossea_volume_id)
                source = lab.vcenter.disk_file(vm, disk.disk_id)
                size = os.path.getsize(source)
                assert sha256_prefix(lab.volume_file(volume.volume_id), size) == sha256_prefix(source, size)
