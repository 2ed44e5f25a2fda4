"""omactl groups: machine groups (VMs replicated together on a schedule)."""
from __future__ import annotations

import argparse
from typing import Any

from oma.v1 import machine_groups_pb2 as groups_pb

from omaclient import output
from omaclient.cli.common import (
    Session,
    UsageError,
    add_command,
    add_family,
    context_id_of,
    group_id_of,
    say,
    schedule_id_of,
    set_present,
)


def _groups_create(s: Session, args: argparse.Namespace) -> None:
    request = set_present(
        groups_pb.CreateGroupRequest(name=args.name, description=args.description or "",
                                     schedule_id=schedule_id_of(s, args.schedule) if args.schedule else ""),
        max_concurrent_vms=args.max_concurrent, priority=args.priority,
    )
    response = s.call(s.client.groups.CreateGroup, request)
    s.show(response, lambda r: f"created group {r.group.name} ({r.group.id})")


def _groups_list(s: Session, args: argparse.Namespace) -> None:
    groups = list(s.client.pages(s.client.groups.ListGroups, groups_pb.ListGroupsRequest(), "groups"))
    s.show(groups_pb.ListGroupsResponse(groups=groups, total_count=len(groups)),
           lambda r: output.table(r.groups, output.GROUP_COLUMNS, empty="no machine groups"))


def _groups_show(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.groups.GetGroup, groups_pb.GetGroupRequest(id=group_id_of(s, args.group)))
    s.show(response, lambda r: output.group_details(r.group))


def _groups_assign(s: Session, args: argparse.Namespace) -> None:
    group_id = group_id_of(s, args.group)
    for vm in args.vms:
        request = set_present(
            groups_pb.AssignVMRequest(group_id=group_id, vm_context_id=context_id_of(s, vm, args.vcenter)),
            priority=args.priority, enabled=args.enabled,
        )
        membership = s.call(s.client.groups.AssignVM, request).membership
        if not s.json:
            say(f"assigned {membership.vm_name} to {membership.group_name}")
    if s.json:
        print(output.to_json(s.call(s.client.groups.GetGroup, groups_pb.GetGroupRequest(id=group_id))))


def _groups_unassign(s: Session, args: argparse.Namespace) -> None:
    group_id = group_id_of(s, args.group)
    for vm in args.vms:
        request = groups_pb.UnassignVMRequest(group_id=group_id, vm_context_id=context_id_of(s, vm, args.vcenter))
        s.call(s.client.groups.UnassignVM, request)
        if not s.json:
            say(f"removed {vm} from {args.group}")
    if s.json:
        print(output.to_json(s.call(s.client.groups.GetGroup, groups_pb.GetGroupRequest(id=group_id))))


def _groups_update(s: Session, args: argparse.Namespace) -> None:
    if args.schedule and args.no_schedule:
        raise UsageError("give --schedule or --no-schedule, not both")
    schedule = "" if args.no_schedule else (schedule_id_of(s, args.schedule) if args.schedule else None)
    request = set_present(groups_pb.UpdateGroupRequest(id=group_id_of(s, args.group)), name=args.name,
                           description=args.description, schedule_id=schedule,
                           max_concurrent_vms=args.max_concurrent, priority=args.priority)
    response = s.call(s.client.groups.UpdateGroup, request)

    def render(r: Any) -> str:
        g = r.group
        return f"updated group {g.name} ({g.id}); schedule: {g.schedule_name or g.schedule_id or 'none'}"

    s.show(response, render)


def _groups_delete(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.groups.DeleteGroup, groups_pb.DeleteGroupRequest(id=group_id_of(s, args.group)))
    s.show(response, lambda r: f"deleted group {args.group}")


def register_groups(commands: Any) -> None:
    actions = add_family(commands, "groups", "machine groups (VMs replicated on one schedule)")
    p = add_command(actions, "create", _groups_create, "create a group")
    p.add_argument("name")
    p.add_argument("--description")
    p.add_argument("--schedule", help="schedule name or id")
    p.add_argument("--max-concurrent", type=int, help="concurrent scheduled jobs, 1-100 (default 5)")
    p.add_argument("--priority", type=int, help="0-100, lower runs first (default 0)")
    add_command(actions, "list", _groups_list, "list groups")
    p = add_command(actions, "update", _groups_update,
                 "change a group (only the given fields); --schedule attaches it to a schedule")
    p.add_argument("group", metavar="GROUP", help="group name or id")
    p.add_argument("--name", help="new name")
    p.add_argument("--description")
    p.add_argument("--schedule", metavar="SCHEDULE", help="schedule name or id: its VMs replicate on that schedule")
    p.add_argument("--no-schedule", action="store_true", help="detach the group from its schedule")
    p.add_argument("--max-concurrent", type=int, help="concurrent scheduled jobs, 1-100")
    p.add_argument("--priority", type=int, help="0-100, lower runs first")
    p = add_command(actions, "show", _groups_show, "show a group with its members")
    p.add_argument("group", metavar="GROUP", help="group name or id")
    p = add_command(actions, "assign", _groups_assign, "add VMs to a group (a VM is in at most one group)")
    p.add_argument("group", metavar="GROUP", help="group name or id")
    p.add_argument("vms", nargs="+", metavar="VM", help="VM name")
    p.add_argument("--priority", type=int, help="lower runs first (default 0)")
    p.add_argument("--enabled", action=argparse.BooleanOptionalAction, help="(default: enabled)")
    p.add_argument("--vcenter", help="vCenter host, when a name exists in several")
    p = add_command(actions, "unassign", _groups_unassign, "remove VMs from a group")
    p.add_argument("group", metavar="GROUP", help="group name or id")
    p.add_argument("vms", nargs="+", metavar="VM", help="VM name")
    p.add_argument("--vcenter", help="vCenter host, when a name exists in several")
    p = add_command(actions, "delete", _groups_delete, "delete an empty group")
    p.add_argument("group", metavar="GROUP", help="group name or id")
