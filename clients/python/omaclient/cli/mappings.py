"""omactl mappings: a CloudStack network for each source network of a VM."""
from __future__ import annotations

import argparse
from typing import Any

from oma.v1 import network_mappings_pb2 as mappings_pb

from omaclient import output
from omaclient.cli.common import Session, add_command, add_family, set_present


def _mappings_add(s: Session, args: argparse.Namespace) -> None:
    request = mappings_pb.CreateNetworkMappingRequest(
        vm_id=args.vm, vcenter_host=args.vcenter or "", source_network_name=args.source_network,
        destination_network_id=args.destination_network_id, destination_network_name=args.destination_name or "",
        is_test_network=args.test, mapping_type=args.type or "", network_strategy=args.strategy or "",
    )
    response = s.call(s.client.network_mappings.CreateNetworkMapping, request)

    def render(r: Any) -> str:
        m = r.network_mapping
        kind = "test" if m.is_test_network else "live"
        return (f"{'created' if r.created else 'updated'} {kind} mapping of {m.vm_id}: {m.source_network_name} -> "
                f"{m.destination_network_name} ({m.validation_status})")

    s.show(response, render)


def _mappings_list(s: Session, args: argparse.Namespace) -> None:
    request = set_present(mappings_pb.ListNetworkMappingsRequest(vm_id=args.vm or ""),
                           is_test_network=args.is_test_network)
    mappings = list(s.client.pages(s.client.network_mappings.ListNetworkMappings, request, "network_mappings"))
    s.show(mappings_pb.ListNetworkMappingsResponse(network_mappings=mappings, total_count=len(mappings)),
           lambda r: output.table(r.network_mappings, output.NETWORK_MAPPING_COLUMNS, empty="no network mappings"))


def _mappings_status(s: Session, args: argparse.Namespace) -> None:
    request = mappings_pb.GetNetworkMappingStatusRequest(vm_id=args.vm)
    response = s.call(s.client.network_mappings.GetNetworkMappingStatus, request)
    s.show(response, output.network_mapping_status)


def _mappings_delete(s: Session, args: argparse.Namespace) -> None:
    request = set_present(
        mappings_pb.DeleteNetworkMappingRequest(vm_id=args.vm, source_network_name=args.source_network),
        is_test_network=args.is_test_network,
    )
    response = s.call(s.client.network_mappings.DeleteNetworkMapping, request)
    s.show(response, lambda r: f"deleted {r.deleted_count} mapping(s) of {args.vm}/{args.source_network}")


def _add_live_or_test(p: argparse.ArgumentParser, default_help: str) -> None:
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--live", dest="is_test_network", action="store_const", const=False,
                      help=f"live-failover mappings only (default: {default_help})")
    kind.add_argument("--test", dest="is_test_network", action="store_const", const=True,
                      help="test-failover mappings only")


def register_mappings(commands: Any) -> None:
    actions = add_family(commands, "mappings", "source network -> CloudStack network mappings")
    p = add_command(actions, "add", _mappings_add, "map a source network of a VM (replaces the existing mapping)")
    p.add_argument("vm", metavar="VM", help="VM name")
    p.add_argument("source_network", metavar="SOURCE_NETWORK", help="vSphere port group")
    p.add_argument("destination_network_id", metavar="DESTINATION_NETWORK_ID", help="CloudStack network id")
    p.add_argument("--destination-name", help="CloudStack network name (default: looked up)")
    p.add_argument("--test", action="store_true", help="the mapping for test failovers")
    p.add_argument("--type", choices=["live", "test", "both"], help="mapping type (default: from --test)")
    p.add_argument("--strategy", help="free text, e.g. production, isolated")
    p.add_argument("--vcenter", help="vCenter host, when the name exists in several")
    p = add_command(actions, "list", _mappings_list, "list mappings")
    p.add_argument("--vm", help="VM name")
    _add_live_or_test(p, "both")
    p = add_command(actions, "status", _mappings_status, "which source networks of a VM are mapped")
    p.add_argument("vm", metavar="VM", help="VM name or context id")
    p = add_command(actions, "delete", _mappings_delete, "delete the mapping(s) of one source network")
    p.add_argument("vm", metavar="VM", help="VM name or context id")
    p.add_argument("source_network", metavar="SOURCE_NETWORK")
    _add_live_or_test(p, "live and test")
