from __future__ import annotations

from oma.v1 import network_mappings_pb2 as pb
from oma.v1 import network_mappings_pb2_grpc

from oma_server.convert import fill
from oma_server.domain import cloudstack_config, cloudstack_settings, network_mappings, paging
from oma_server.domain.text_rules import quote
from oma_server.errors import NotFound, require
from oma_server.services import messages


def _network(n) -> pb.AvailableNetwork:
    return pb.AvailableNetwork(id=n["id"], name=n.get("name", ""), description=n.get("displaytext", ""),
                               zone_id=n.get("zoneid", ""), zone_name=n.get("zonename", ""),
                               state=n.get("state", ""), network_type=n.get("type", ""),
                               is_default=bool(n.get("isdefault")))


def _test_flag(request):
    return request.is_test_network if request.HasField("is_test_network") else None


class NetworkMappingServicer(network_mappings_pb2_grpc.NetworkMappingServiceServicer):

    def __init__(self, runtime):
        self._runtime = runtime

    def _network_lookup(self):
        """A CloudStack network lookup when a CloudStack config is active, else None (not validated)."""
        return cloudstack_settings.network_lookup(self._runtime.secrets)

    def _cloudstack(self):
        return cloudstack_config.client(cloudstack_config.require_active(), self._runtime.secrets)

    def ListAvailableNetworks(self, request, context):
        page = paging.paginate_list(self._cloudstack().list_networks(request.zone_id), request.page_size,
                                    request.page_token)
        return pb.ListAvailableNetworksResponse(networks=[_network(n) for n in page.items],
                                                next_page_token=page.next_page_token)

    def ResolveNetwork(self, request, context):
        require(request.network_name, "network_name is required")
        for network in self._cloudstack().list_networks(request.zone_id):
            if network.get("name") == request.network_name:
                return pb.ResolveNetworkResponse(network_name=request.network_name, network_id=network["id"],
                                                 network=_network(network))
        raise NotFound(f"no CloudStack network named {quote(request.network_name)}")

    def ListServiceOfferings(self, request, context):
        page = paging.paginate_list(self._cloudstack().list_service_offerings(), request.page_size,
                                    request.page_token)
        return pb.ListServiceOfferingsResponse(
            service_offerings=[pb.AvailableServiceOffering(
                id=o["id"], name=o.get("name", ""), description=o.get("displaytext", ""),
                cpu=int(o.get("cpunumber") or 0), memory=int(o.get("memory") or 0),
                is_customized=bool(o.get("iscustomized"))) for o in page.items],
            next_page_token=page.next_page_token)

    def CreateNetworkMapping(self, request, context):
        row, created = network_mappings.create(
            vm_id=request.vm_id, vm_context_id=request.vm_context_id, vcenter_host=request.vcenter_host,
            source_network_name=request.source_network_name,
            destination_network_id=request.destination_network_id,
            destination_network_name=request.destination_network_name,
            is_test_network=request.is_test_network, mapping_type=request.mapping_type,
            network_strategy=request.network_strategy, lookup=self._network_lookup(),
        )
        return pb.CreateNetworkMappingResponse(network_mapping=messages.network_mapping(row), created=created)

    def ListNetworkMappings(self, request, context):
        page = network_mappings.list_all(
            vm_id=request.vm_id, vm_context_id=request.vm_context_id, is_test_network=_test_flag(request),
            page_size=request.page_size, page_token=request.page_token,
        )
        return pb.ListNetworkMappingsResponse(
            network_mappings=[messages.network_mapping(m) for m in page.items],
            next_page_token=page.next_page_token, total_count=page.total,
        )

    def ListVMNetworkMappings(self, request, context):
        page = network_mappings.list_for_vm(
            vm_id=request.vm_id, vm_context_id=request.vm_context_id, is_test_network=_test_flag(request),
            page_size=request.page_size, page_token=request.page_token,
        )
        return pb.ListVMNetworkMappingsResponse(
            network_mappings=[messages.network_mapping(m) for m in page.items],
            next_page_token=page.next_page_token, total_count=page.total,
        )

    def GetNetworkMappingStatus(self, request, context):
        return fill(pb.GetNetworkMappingStatusResponse(),
                    network_mappings.status(request.vm_id, request.vm_context_id))

    def DeleteNetworkMapping(self, request, context):
        deleted = network_mappings.delete(request.vm_id, request.source_network_name, _test_flag(request))
        return pb.DeleteNetworkMappingResponse(deleted_count=deleted)
