from __future__ import annotations

from oma.v1 import network_mappings_pb2 as pb
from oma.v1 import network_mappings_pb2_grpc

from oma_server.convert import fill, optional
from oma_server.domain import cloudstack_settings, network_mappings, paging
from oma_server.services import cloudstack_messages, messages


def _test_flag(request):
    return optional(request, "is_test_network")


class NetworkMappingServicer(network_mappings_pb2_grpc.NetworkMappingServiceServicer):

    def __init__(self, runtime):
        self._runtime = runtime

    def _network_lookup(self):
        """A CloudStack network lookup when a CloudStack config is active, else None (not validated)."""
        return cloudstack_settings.network_lookup(self._runtime.secrets)

    def ListAvailableNetworks(self, request, context):
        networks = cloudstack_settings.active_networks(self._runtime.secrets, request.zone_id)
        page = paging.paginate_list(networks, request.page_size, request.page_token)
        return pb.ListAvailableNetworksResponse(
            networks=[cloudstack_messages.network(pb.AvailableNetwork(), n) for n in page.items],
            next_page_token=page.next_page_token)

    def ResolveNetwork(self, request, context):
        network = cloudstack_settings.resolve_network(self._runtime.secrets, request.network_name, request.zone_id)
        return pb.ResolveNetworkResponse(network_name=request.network_name, network_id=network.id,
                                         network=cloudstack_messages.network(pb.AvailableNetwork(), network))

    def ListServiceOfferings(self, request, context):
        page = paging.paginate_list(cloudstack_settings.active_service_offerings(self._runtime.secrets),
                                    request.page_size, request.page_token)
        return pb.ListServiceOfferingsResponse(
            service_offerings=[cloudstack_messages.service_offering(pb.AvailableServiceOffering(), o, name=o.name)
                               for o in page.items],
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
