from __future__ import annotations

from oma.v1 import machine_groups_pb2 as pb
from oma.v1 import machine_groups_pb2_grpc

from oma_server.convert import fill, optional, optional_fields, timestamp
from oma_server.db.models import utcnow
from oma_server.domain import groups
from oma_server.rpc import caller_name
from oma_server.services import messages


class MachineGroupServicer(machine_groups_pb2_grpc.MachineGroupServiceServicer):

    def __init__(self, runtime):
        self._runtime = runtime

    def CreateGroup(self, request, context):
        summary = groups.create_group(
            name=request.name, description=request.description, schedule_id=request.schedule_id,
            max_concurrent_vms=optional(request, "max_concurrent_vms"),
            priority=optional(request, "priority"),
            created_by=request.created_by or caller_name(),
        )
        return pb.CreateGroupResponse(group=messages.group(summary))

    def ListGroups(self, request, context):
        summaries, page = groups.list_groups(
            schedule_id=request.schedule_id, include_memberships=request.include_memberships,
            page_size=request.page_size, page_token=request.page_token,
        )
        return pb.ListGroupsResponse(
            groups=[messages.group(s) for s in summaries], total_count=page.total,
            next_page_token=page.next_page_token,
        )

    def GetGroup(self, request, context):
        return pb.GetGroupResponse(group=messages.group(groups.get_group(request.id)))

    def UpdateGroup(self, request, context):
        changes = optional_fields(request, "name", "description", "schedule_id", "max_concurrent_vms", "priority")
        return pb.UpdateGroupResponse(group=messages.group(groups.update_group(request.id, changes, caller_name())))

    def DeleteGroup(self, request, context):
        groups.delete_group(request.id, caller_name())
        return pb.DeleteGroupResponse()

    def AssignVM(self, request, context):
        m = groups.assign_vm(
            group_id=request.group_id, context_id=request.vm_context_id,
            priority=optional(request, "priority"),
            enabled=optional(request, "enabled"),
            schedule_override_id=request.schedule_override_id, added_by=request.added_by or caller_name(),
        )
        return pb.AssignVMResponse(membership=messages.membership(m))

    def UnassignVM(self, request, context):
        groups.unassign_vm(request.group_id, request.vm_context_id, caller_name())
        return pb.UnassignVMResponse()

    def UpdateMembership(self, request, context):
        changes = optional_fields(request, "priority", "enabled", "schedule_override_id")
        m = groups.update_membership(request.group_id, request.vm_context_id, changes, caller_name())
        return pb.UpdateMembershipResponse(membership=messages.membership(m))

    def ListGroupVMs(self, request, context):
        group, page = groups.group_vms(request.group_id, request.page_size, request.page_token)
        return pb.ListGroupVMsResponse(
            group_id=group.id, group_name=group.name, total_vms=page.total,
            memberships=[messages.membership(m) for m in page.items], retrieved_at=timestamp(utcnow()),
            next_page_token=page.next_page_token,
        )

    def ListGroupMembers(self, request, context):
        page = groups.group_members(request.group_id, request.page_size, request.page_token)
        return pb.ListGroupMembersResponse(
            members=[fill(pb.MachineGroupMember(), c, context_id=c.context_id,
                          priority=c.vmgroupmembership.priority) for c in page.items],
            count=page.total, next_page_token=page.next_page_token,
        )

    def SetVMGroup(self, request, context):
        m, removed = groups.set_vm_group(
            context_id=request.vm_context_id, group_id=request.group_id,
            priority=optional(request, "priority"),
            enabled=optional(request, "enabled"),
            added_by=request.added_by or caller_name(),
        )
        return pb.SetVMGroupResponse(membership=messages.membership(m), removed_group_ids=removed)

