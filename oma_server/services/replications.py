from __future__ import annotations

from oma.v1 import replications_pb2 as pb
from oma.v1 import replications_pb2_grpc, resources_pb2

from oma_server.convert import fill, optional
from oma_server.domain import cloudstack_config, paging, replications, volumes
from oma_server.domain.job_lifecycle import tracking_job_id
from oma_server.errors import InvalidArgument, require
from oma_server.integrations.nbd_exports import ExportManager
from oma_server.rpc import caller_name
from oma_server.services import messages
from oma_server.workflows.replication import ReplicationEngine


def progress_message(job, disks=None, cbt_history=None) -> resources_pb2.ReplicationProgress:
    """The consolidated progress view (shared by GetReplicationProgress and the watch stream)."""
    view = replications.progress_view(job, disks, cbt_history)
    message = fill(resources_pb2.ReplicationProgress(), job, job_id=job.id, terminal=view["terminal"],
                   vm_name=job.source_vm_name)
    fill(message.vma_progress, view["vma"])
    message.disks.extend(fill(resources_pb2.DiskReplicationProgress(), d) for d in view["disks"])
    return message


class ReplicationServicer(replications_pb2_grpc.ReplicationServiceServicer):

    def __init__(self, runtime, engine: ReplicationEngine, exports: ExportManager):
        self._runtime = runtime
        self._engine, self._exports = engine, exports

    def CreateReplication(self, request, context):
        if request.HasField("source_vm") and not request.context_id:
            raise InvalidArgument(
                "give context_id: add the VM to management first (DiscoveryService.AddVMs); "
                "replication of unmanaged VMs from a source_vm description is not supported")
        if request.HasField("start_replication") and not request.start_replication:
            raise InvalidArgument("start_replication=false (add to management) is DiscoveryService.AddVMs")
        created = replications.create(replications.CreateRequest(
            context_id=request.context_id, replication_type=request.replication_type,
            ossea_config_id=optional(request, "ossea_config_id"),
            target_network=request.target_network, schedule_execution_id=request.schedule_execution_id,
            vm_group_id=request.vm_group_id, scheduled_by=request.scheduled_by, request_id=request.request_id,
        ), caller_name())
        if not created.repeated:
            self._engine.submit(created.job.id)
        return fill(pb.CreateReplicationResponse(), created.job, job_id=created.job.id,
                    context_id=created.context.context_id, tracking_job_id=created.tracking_job_id,
                    message=f"replication of {created.context.vm_name} queued")

    def GetReplication(self, request, context):
        job = replications.get(request.job_id)
        disks = replications.job_disks(job)
        history = replications.job_cbt_history(job)
        return pb.GetReplicationResponse(
            job=messages.replication_job(job, tracking_job_id(job.id) or ""),
            disks=messages.vm_disks(disks),
            cbt_history=[messages.cbt_entry(c) for c in history],
            disk_progress=progress_message(job, disks, history).disks,
        )

    def ListReplications(self, request, context):
        query = replications.list_jobs(
            vm_context_id=request.vm_context_id, statuses=list(request.statuses),
            since=optional(request, "since"),
        )
        page = paging.paginate(query, request.page_size, request.page_token)
        return pb.ListReplicationsResponse(jobs=[messages.replication_job(j) for j in page.items],
                                           count=page.total, next_page_token=page.next_page_token)

    def UpdateReplication(self, request, context):
        job, applied = replications.report_terminal(request.job_id, request.status, request.error_message)
        return pb.UpdateReplicationResponse(job=messages.replication_job(job), applied=applied)

    def CancelReplication(self, request, context):
        self._engine.cancel(request.job_id, request.reason)
        return pb.CancelReplicationResponse(job=messages.replication_job(replications.get(request.job_id)))

    def DeleteReplication(self, request, context):
        remove_volume = None
        if request.delete_volumes:
            cs = cloudstack_config.client(cloudstack_config.require_active(), self._runtime.secrets)
            exports = self._exports

            def remove_volume(volume):
                volumes.remove(cs, exports, volume)

        result = replications.delete(request.job_id, actor=caller_name(), remove_volume=remove_volume)
        return fill(pb.DeleteReplicationResponse(), result, database_cleaned=True)

    def GetPreviousChangeID(self, request, context):
        ctx = replications.resolve_context_for_change_id(
            vm_context_id=request.vm_context_id, job_id=request.job_id, vmware_vm_id=request.vmware_vm_id,
            vcenter_host=request.vcenter_host, vm_path=request.vm_path)
        change_id = replications.previous_change_id(ctx, request.disk_id)
        return pb.GetPreviousChangeIDResponse(
            vm_context_id=ctx.context_id, disk_id=request.disk_id, change_id=change_id,
            message="Previous change ID found" if change_id else "No previous successful replication of this disk")

    def StoreChangeID(self, request, context):
        require(request.change_id, "change_id is required")
        disk = replications.store_change_id(
            request.job_id, request.disk_id, request.change_id, previous=request.previous_change_id,
            sync_type=request.sync_type, bytes_transferred=request.bytes_transferred or None,
            duration_seconds=request.sync_duration_seconds or None)
        return pb.StoreChangeIDResponse(job_id=request.job_id, disk_id=disk.disk_id, change_id=disk.disk_change_id,
                                        message="change id stored")

    def GetReplicationProgress(self, request, context):
        return pb.GetReplicationProgressResponse(progress=progress_message(replications.get(request.job_id)))
