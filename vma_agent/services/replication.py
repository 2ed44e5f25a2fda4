from __future__ import annotations

from datetime import datetime

from vma.v1 import replication_pb2 as pb
from vma.v1 import replication_pb2_grpc

from vma_agent import errors, validation
from vma_agent.integrations import vsphere
from vma_agent.replication import SNAPSHOT_PREFIX, DiskRequest, JobRequest, ReplicationJobs, TargetTls
from vma_agent.services import timestamp


def vcenter_params(connection, timeout: float) -> vsphere.VCenterParams:
    for name in ("host", "username", "password"):
        if not getattr(connection, name):
            raise errors.InvalidArgument(f"connection.{name} is required")
    return vsphere.VCenterParams(connection.host, connection.username, connection.password,
                                 thumbprint=connection.thumbprint, ca_pem=connection.ca_pem,
                                 insecure=connection.insecure, timeout=timeout)


def vm_ref(vm) -> vsphere.VMRef:
    if not (vm.uuid or vm.moref or vm.path):
        raise errors.InvalidArgument("vm needs one of uuid, moref or path")
    return vsphere.VMRef(uuid=vm.uuid, moref=vm.moref, path=vm.path)


class ReplicationServicer(replication_pb2_grpc.ReplicationServiceServicer):
    def __init__(self, jobs: ReplicationJobs, timeout: float):
        self._jobs, self._timeout = jobs, timeout

    def StartReplication(self, request, context):
        job = self._jobs.start(JobRequest(
            job_id=request.job_id, context_id=request.context_id,
            connection=vcenter_params(request.connection, self._timeout), datacenter=request.connection.datacenter,
            vm=vm_ref(request.vm),
            disks=tuple(DiskRequest(d.disk_id, d.vmware_disk_key, d.target_nbd_uri, d.previous_change_id,
                                    resume_offset=d.resume_offset)
                        for d in request.disks),
            quiesce=request.quiesce, enable_cbt=request.enable_cbt,
            target_tls=TargetTls(request.target_tls.psk_identity, request.target_tls.psk)
            if request.HasField("target_tls") else None,
            resume_snapshot_moref=request.resume_snapshot.moref, resume_snapshot_name=request.resume_snapshot.name,
        ))
        return pb.StartReplicationResponse(job_id=request.job_id, started_at=timestamp(job.started_at),
                                           snapshot_name=SNAPSHOT_PREFIX + request.job_id,
                                           snapshot_moref=job.journal.snapshot_moref if job.journal else "")

    def GetReplicationStatus(self, request, context):
        validation.identifier("job_id", request.job_id)
        job = self._jobs.get(request.job_id)
        return pb.GetReplicationStatusResponse(
            job_id=request.job_id, status=job.status.value, running=bool(job.thread and job.thread.is_alive()),
            last_error=job.last_error, started_at=timestamp(job.started_at), finished_at=timestamp(job.finished_at))

    def CancelReplication(self, request, context):
        validation.identifier("job_id", request.job_id)
        cancelled = self._jobs.cancel(request.job_id, request.reason)
        return pb.CancelReplicationResponse(job_id=request.job_id, cancelled=cancelled,
                                            status=self._jobs.get(request.job_id).status.value)

    def CleanupSnapshots(self, request, context):
        if request.job_id:
            validation.identifier("job_id", request.job_id)
        if request.older_than_seconds < 0:
            raise errors.InvalidArgument("older_than_seconds cannot be negative")
        removed = self._jobs.cleanup_snapshots(vcenter_params(request.connection, self._timeout),
                                               request.connection.datacenter, vm_ref(request.vm), request.job_id,
                                               older_than_seconds=request.older_than_seconds)
        return pb.CleanupSnapshotsResponse(removed_snapshots=removed)

    def ListInterruptedJobs(self, request, context):
        response = pb.ListInterruptedJobsResponse()
        for entry, expired in self._jobs.interrupted_jobs():
            job = response.jobs.add(
                job_id=entry.job_id, context_id=entry.context_id, vcenter=entry.vcenter, vm_moref=entry.vm_moref,
                snapshot_moref=entry.snapshot_moref, snapshot_name=entry.snapshot_name, expired=expired,
                started_at=timestamp(datetime.fromisoformat(entry.started_at)),
                updated_at=timestamp(datetime.fromisoformat(entry.updated_at or entry.started_at)))
            for d in entry.disks.values():
                job.disks.add(disk_id=d.disk_id, vmware_disk_key=d.key, checkpoint_offset=d.checkpoint_offset,
                              previous_change_id=d.previous_change_id, completed=d.completed, change_id=d.change_id)
        return response
