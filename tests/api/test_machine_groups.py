"""MachineGroupService (mapping: machine groups CRUD → vm_machine_groups; VM group assignment →
vm_group_memberships insert/delete/update) and ungrouped VMs (vm_replication_contexts not in
vm_group_memberships)."""
from __future__ import annotations

import threading

import grpc
import pytest
from oma.v1 import discovery_pb2
from oma.v1 import machine_groups_pb2 as pb

from oma_server.db import models
from tests import factories


def _error(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def _group(oma, name="gold", **kw):
    return oma.groups.CreateGroup(pb.CreateGroupRequest(name=name, **kw), timeout=5).group


def test_create_list_get_update_delete(oma):
    schedule = models.ReplicationSchedule.create(name="nightly", cron_expression="0 2 * * *")
    gold = _group(oma, "gold", description="tier 1", schedule_id=schedule.id, max_concurrent_vms=0 or 3, priority=0)
    row = models.VmMachineGroup.get_by_id(gold.id)
    assert (row.name, row.schedule_id, row.max_concurrent_vms, row.priority, row.created_by) == \
        ("gold", schedule.id, 3, 0, "admin")
    assert gold.schedule_name == "nightly" and gold.schedule.cron_expression == "0 2 * * *"
    silver = _group(oma, "silver")
    assert models.VmMachineGroup.get_by_id(silver.id).max_concurrent_vms == 5  # default when absent

    listed = oma.groups.ListGroups(pb.ListGroupsRequest(), timeout=5)
    assert [g.name for g in listed.groups] == ["gold", "silver"] and listed.total_count == 2
    assert [g.name for g in oma.groups.ListGroups(
        pb.ListGroupsRequest(schedule_id=schedule.id), timeout=5).groups] == ["gold"]

    updated = oma.groups.UpdateGroup(pb.UpdateGroupRequest(id=gold.id, priority=7, schedule_id=""), timeout=5).group
    row = models.VmMachineGroup.get_by_id(gold.id)
    assert updated.priority == 7 and row.priority == 7 and row.schedule_id is None  # explicit clear
    assert row.description == "tier 1"  # untouched

    oma.groups.DeleteGroup(pb.DeleteGroupRequest(id=silver.id), timeout=5)
    assert [g.name for g in models.VmMachineGroup.select()] == ["gold"]
    ops = [j.operation for j in models.JobTracking.select().order_by(models.JobTracking.started_at)]
    assert ops == ["create-group", "create-group", "update-group", "delete-group"]
    assert all(j.status == "completed" and j.job_type == "group-management" for j in models.JobTracking.select())


def test_bad_input_is_rejected_without_writes(oma):
    _group(oma, "gold")
    for kw, code in ((dict(name=""), grpc.StatusCode.INVALID_ARGUMENT),
                     (dict(name="x", max_concurrent_vms=0), grpc.StatusCode.INVALID_ARGUMENT),
                     (dict(name="x", priority=101), grpc.StatusCode.INVALID_ARGUMENT),
                     (dict(name="x", schedule_id="missing"), grpc.StatusCode.NOT_FOUND),
                     (dict(name="gold"), grpc.StatusCode.ALREADY_EXISTS)):
        assert _error(lambda: oma.groups.CreateGroup(pb.CreateGroupRequest(**kw), timeout=5))[0] == code
    assert models.VmMachineGroup.select().count() == 1 and models.JobTracking.select().count() == 1
    assert _error(lambda: oma.groups.GetGroup(pb.GetGroupRequest(id="nope"), timeout=5))[0] == \
        grpc.StatusCode.NOT_FOUND
    assert _error(lambda: oma.groups.UpdateGroup(pb.UpdateGroupRequest(id="nope", priority=1), timeout=5))[0] == \
        grpc.StatusCode.NOT_FOUND


def test_membership_assign_update_unassign_and_counts(oma):
    gold = _group(oma, "gold")
    a, b = factories.context(vm_name="a"), factories.context(vm_name="b")
    m = oma.groups.AssignVM(pb.AssignVMRequest(group_id=gold.id, vm_context_id=a.context_id, priority=2), timeout=5)
    assert (m.membership.vm_name, m.membership.group_name, m.membership.priority, m.membership.enabled) == \
        ("a", "gold", 2, True)
    oma.groups.AssignVM(pb.AssignVMRequest(group_id=gold.id, vm_context_id=b.context_id, enabled=False), timeout=5)
    group = oma.groups.GetGroup(pb.GetGroupRequest(id=gold.id), timeout=5).group
    assert (group.total_vms, group.enabled_vms, group.disabled_vms) == (2, 1, 1)
    assert [x.vm_name for x in group.memberships] == ["b", "a"]  # priority 0 before 2

    members = oma.groups.ListGroupMembers(pb.ListGroupMembersRequest(group_id=gold.id), timeout=5)
    assert [(x.vm_name, x.priority) for x in members.members] == [("a", 2)]  # enabled only
    vms = oma.groups.ListGroupVMs(pb.ListGroupVMsRequest(group_id=gold.id), timeout=5)
    assert vms.total_vms == 2 and vms.group_name == "gold"

    oma.groups.UpdateMembership(pb.UpdateMembershipRequest(
        group_id=gold.id, vm_context_id=b.context_id, enabled=True, priority=9), timeout=5)
    row = models.VmGroupMembership.get(models.VmGroupMembership.vm_context == b.context_id)
    assert row.enabled and row.priority == 9

    # Duplicate → ALREADY_EXISTS; another group → FAILED_PRECONDITION (one group per VM).
    silver = _group(oma, "silver")
    assert _error(lambda: oma.groups.AssignVM(pb.AssignVMRequest(
        group_id=gold.id, vm_context_id=a.context_id), timeout=5))[0] == grpc.StatusCode.ALREADY_EXISTS
    code, msg = _error(lambda: oma.groups.AssignVM(pb.AssignVMRequest(
        group_id=silver.id, vm_context_id=a.context_id), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "SetVMGroup" in msg
    assert _error(lambda: oma.groups.AssignVM(pb.AssignVMRequest(
        group_id=gold.id, vm_context_id="missing"), timeout=5))[0] == grpc.StatusCode.NOT_FOUND

    # A group with members cannot be deleted.
    code, msg = _error(lambda: oma.groups.DeleteGroup(pb.DeleteGroupRequest(id=gold.id), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "2 VMs" in msg

    oma.groups.UnassignVM(pb.UnassignVMRequest(group_id=gold.id, vm_context_id=a.context_id), timeout=5)
    assert models.VmGroupMembership.select().count() == 1
    assert _error(lambda: oma.groups.UnassignVM(pb.UnassignVMRequest(
        group_id=gold.id, vm_context_id=a.context_id), timeout=5))[0] == grpc.StatusCode.NOT_FOUND


def test_set_vm_group_moves_the_vm(oma):
    gold, silver = _group(oma, "gold"), _group(oma, "silver")
    ctx = factories.context()
    oma.groups.AssignVM(pb.AssignVMRequest(group_id=gold.id, vm_context_id=ctx.context_id), timeout=5)
    moved = oma.groups.SetVMGroup(pb.SetVMGroupRequest(
        vm_context_id=ctx.context_id, group_id=silver.id, priority=4), timeout=5)
    assert list(moved.removed_group_ids) == [gold.id] and moved.membership.group_id == silver.id
    rows = list(models.VmGroupMembership.select())
    assert [(r.group_id, r.priority) for r in rows] == [(silver.id, 4)]


def test_deleting_a_group_or_context_cascades_memberships(db):
    group = models.VmMachineGroup.create(name="g")
    ctx = factories.context()
    other = factories.context()
    models.VmGroupMembership.create(group=group.id, vm_context=ctx.context_id)
    models.VmGroupMembership.create(group=group.id, vm_context=other.context_id)
    ctx.delete_instance()
    assert models.VmGroupMembership.select().count() == 1
    group.delete_instance()
    assert models.VmGroupMembership.select().count() == 0


def test_ungrouped_vms(oma):
    gold = _group(oma, "gold")
    grouped = factories.context(vm_name="grouped")
    factories.context(vm_name="loner", auto_added=True)
    oma.groups.AssignVM(pb.AssignVMRequest(group_id=gold.id, vm_context_id=grouped.context_id), timeout=5)
    response = oma.discovery.ListUngroupedVMs(discovery_pb2.ListUngroupedVMsRequest(), timeout=5)
    assert [v.vm_name for v in response.vms] == ["loner"] and response.count == 1
    assert response.vms[0].auto_added and response.HasField("retrieved_at")


def test_concurrent_assigns_of_one_vm_to_different_groups_leave_it_in_exactly_one(oma):
    """Several AssignVM calls for the same VM, each to another group, released at the same moment:
    one wins, every other is refused with FAILED_PRECONDITION, and the VM ends in exactly one group
    with one recorded assignment (rounds repeat the race; before the check was locked, several won)."""
    callers = 4
    groups = [_group(oma, f"wave-{i}") for i in range(callers)]
    for round_ in range(8):
        ctx = factories.context(vm_name=f"racer-{round_}")
        barrier = threading.Barrier(callers)
        outcomes: list[tuple[str, grpc.StatusCode, str]] = []

        def assign(group):
            barrier.wait()
            try:
                oma.groups.AssignVM(pb.AssignVMRequest(group_id=group.id, vm_context_id=ctx.context_id), timeout=30)
                outcomes.append((group.id, grpc.StatusCode.OK, ""))
            except grpc.RpcError as exc:
                outcomes.append((group.id, exc.code(), exc.details()))

        threads = [threading.Thread(target=assign, args=(g,)) for g in groups]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        winners = [o for o in outcomes if o[1] == grpc.StatusCode.OK]
        losers = [o for o in outcomes if o[1] != grpc.StatusCode.OK]
        assert len(outcomes) == callers and len(winners) == 1, outcomes
        assert all(code == grpc.StatusCode.FAILED_PRECONDITION and "already belongs to another group" in msg
                   for _, code, msg in losers), losers
        rows = list(models.VmGroupMembership.select().where(models.VmGroupMembership.vm_context == ctx.context_id))
        assert [r.group_id for r in rows] == [winners[0][0]]
        recorded = models.JobTracking.select().where(models.JobTracking.context_id == ctx.context_id,
                                                     models.JobTracking.operation == "add-vm-membership")
        assert recorded.count() == 1


def test_concurrent_moves_and_assigns_of_one_vm_leave_it_in_exactly_one_group(oma):
    """SetVMGroup (move) racing AssignVM for the same VM: moves may all succeed one after the other,
    an assign succeeds only when it comes first, and the VM always ends in exactly one group."""
    groups = [_group(oma, f"wave-{i}") for i in range(4)]
    for round_ in range(6):
        ctx = factories.context(vm_name=f"mover-{round_}")
        barrier = threading.Barrier(len(groups))
        codes: list[grpc.StatusCode] = []

        def change(index, group):
            barrier.wait()
            try:
                if index % 2:
                    oma.groups.SetVMGroup(pb.SetVMGroupRequest(vm_context_id=ctx.context_id, group_id=group.id),
                                          timeout=30)
                else:
                    oma.groups.AssignVM(pb.AssignVMRequest(group_id=group.id, vm_context_id=ctx.context_id),
                                        timeout=30)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())

        threads = [threading.Thread(target=change, args=(i, g)) for i, g in enumerate(groups)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(codes) == len(groups)
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION}, codes
        assert models.VmGroupMembership.select().where(
            models.VmGroupMembership.vm_context == ctx.context_id).count() == 1
