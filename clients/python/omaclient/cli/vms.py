"""omactl discover, add and vms: vCenter VMs and the managed VMs (contexts)."""
from __future__ import annotations

import argparse
from typing import Any

from oma.v1 import discovery_pb2 as discovery_pb
from oma.v1 import vm_contexts_pb2 as contexts_pb

from omaclient import output
from omaclient.cli.common import EXIT_FAILED, EXIT_OK, Session, add_command, add_family, vcenter_source


# --- discovery ------------------------------------------------------------------------------------
def _discover(s: Session, args: argparse.Namespace) -> None:
    request = discovery_pb.PreviewDiscoveryRequest(source=vcenter_source(s, args.credential),
                                                   filter=args.filter or "")
    response = s.call(s.client.discovery.PreviewDiscovery, request, slow=True)
    s.show(response, lambda r: output.table(r.vms, output.DISCOVERED_VM_COLUMNS, empty="no VMs found")
           + f"\n\n{r.total_discovered} VMs in {r.vcenter}/{r.datacenter}: {r.new_vms} new, "
           f"{r.existing_vms} already managed")


def _add(s: Session, args: argparse.Namespace) -> int:
    request = discovery_pb.AddVMsRequest(source=vcenter_source(s, args.credential), vm_names=args.vms)
    response = s.call(s.client.discovery.AddVMs, request, slow=True)
    s.show(response, lambda r: output.table(r.processed_vms, output.PROCESSED_VM_COLUMNS) + f"\n\n{r.message}")
    return EXIT_OK if response.success else EXIT_FAILED


def register_discovery(commands: Any) -> None:
    p = add_command(commands, "discover", _discover, "list the VMs of a vCenter (nothing is added)")
    p.add_argument("--credential", type=int, help="credential ID (default: the default credential)")
    p.add_argument("--filter", help="VM name filter")
    p = add_command(commands, "add", _add, "put VMs under management")
    p.add_argument("vms", nargs="+", metavar="VM")
    p.add_argument("--credential", type=int, help="credential ID (default: the default credential)")


# --- VMs ------------------------------------------------------------------------------------------
def _vms_list(s: Session, args: argparse.Namespace) -> None:
    request = contexts_pb.ListVMContextsRequest(status=args.status or "", name_contains=args.name or "",
                                                vcenter_host=args.vcenter or "")
    contexts = list(s.client.pages(s.client.contexts.ListVMContexts, request, "vm_contexts"))
    s.show(contexts_pb.ListVMContextsResponse(vm_contexts=contexts, count=len(contexts)),
           lambda r: output.table(r.vm_contexts, output.VM_CONTEXT_COLUMNS, empty="no VMs"))


def _vm_context(s: Session, args: argparse.Namespace) -> Any:
    """GetVMContext(ByName) response for ``NAME | --id ID``."""
    if args.id:
        return s.call(s.client.contexts.GetVMContext, contexts_pb.GetVMContextRequest(context_id=args.id))
    request = contexts_pb.GetVMContextByNameRequest(vm_name=args.name, vcenter_host=args.vcenter or "")
    return s.call(s.client.contexts.GetVMContextByName, request)


def _vms_show(s: Session, args: argparse.Namespace) -> None:
    s.show(_vm_context(s, args), lambda r: output.vm_context_details(r.details))


def _vms_delete(s: Session, args: argparse.Namespace) -> None:
    context = _vm_context(s, args).details.context
    request = contexts_pb.DeleteVMContextRequest(context_id=context.context_id)
    response = s.call(s.client.contexts.DeleteVMContext, request)
    s.show(response, lambda r: f"removed {context.vm_name} from management (job {r.tracking_job_id})")


def _add_vm_reference(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("name", nargs="?", help="VM name")
    which.add_argument("--id", help="VM context id")
    p.add_argument("--vcenter", help="vCenter host, when the name exists in several")


def register_vms(commands: Any) -> None:
    actions = add_family(commands, "vms", "managed VMs (VM contexts)")
    p = add_command(actions, "list", _vms_list, "list managed VMs")
    p.add_argument("--status", help="e.g. discovered, replicating, ready_for_failover, failed")
    p.add_argument("--name", help="part of the VM name")
    p.add_argument("--vcenter")
    p = add_command(actions, "show", _vms_show, "show a VM with its disks and jobs")
    _add_vm_reference(p)
    p = add_command(actions, "delete", _vms_delete, "remove a VM from management (refused while a job runs)")
    _add_vm_reference(p)
