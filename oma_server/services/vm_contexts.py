from __future__ import annotations

from oma.v1 import vm_contexts_pb2, vm_contexts_pb2_grpc

from oma_server.convert import fill, optional_fields
from oma_server.domain import contexts
from oma_server.rpc import caller_name
from oma_server.services import messages


class VMContextServicer(vm_contexts_pb2_grpc.VMContextServiceServicer):

    def __init__(self, runtime):
        self._runtime = runtime

    def ListVMContexts(self, request, context):
        page, groups = contexts.list_contexts(
            status=request.status, vcenter_host=request.vcenter_host, name_contains=request.name_contains,
            page_size=request.page_size, page_token=request.page_token,
        )
        return vm_contexts_pb2.ListVMContextsResponse(
            vm_contexts=[messages.vm_context(c, groups[c.context_id]) for c in page.items],
            count=page.total, next_page_token=page.next_page_token,
        )

    def GetVMContextByName(self, request, context):
        ctx = contexts.get_by_name(request.vm_name, request.vcenter_host)
        return vm_contexts_pb2.GetVMContextByNameResponse(details=messages.context_details(contexts.details(ctx)))

    def GetVMContext(self, request, context):
        ctx = contexts.get(request.context_id)
        return vm_contexts_pb2.GetVMContextResponse(details=messages.context_details(contexts.details(ctx)))

    def ListVMContextDisks(self, request, context):
        disks = contexts.disks(request.context_id)
        return vm_contexts_pb2.ListVMContextDisksResponse(
            disks=messages.vm_disks(disks), count=len(disks)
        )

    def ListRecentJobs(self, request, context):
        items = contexts.recent_jobs(request.context_id)
        return vm_contexts_pb2.ListRecentJobsResponse(
            context_id=request.context_id,
            jobs=[fill(vm_contexts_pb2.UnifiedJobItem(), i) for i in items], count=len(items),
        )

    def UpdateVMContext(self, request, context):
        changes = optional_fields(request, "scheduler_enabled", "credential_id")
        ctx = contexts.update(request.context_id, **changes)
        groups = contexts.groups_of([ctx.context_id])[ctx.context_id]
        return vm_contexts_pb2.UpdateVMContextResponse(context=messages.vm_context(ctx, groups))

    def DeleteVMContext(self, request, context):
        job_id = contexts.delete(request.context_id, caller_name())
        return vm_contexts_pb2.DeleteVMContextResponse(context_id=request.context_id, tracking_job_id=job_id)
