from __future__ import annotations

from oma.v1 import cloudstack_settings_pb2 as pb
from oma.v1 import cloudstack_settings_pb2_grpc

from oma_server.convert import fill, struct
from oma_server.domain import cloudstack_settings, paging
from oma_server.services import cloudstack_messages


class CloudStackSettingsServicer(cloudstack_settings_pb2_grpc.CloudStackSettingsServiceServicer):

    def __init__(self, runtime):
        self._runtime = runtime

    def _client(self, request):
        return cloudstack_settings.settings_client(request.api_url, request.api_key, request.secret_key,
                                                   poll_interval=self._runtime.settings.cloudstack_poll_interval_seconds)

    def TestConnection(self, request, context):
        ok, message, zones = cloudstack_settings.test_connection(self._client(request))
        return pb.TestConnectionResponse(success=ok, message=message if ok else "Connection failed",
                                         error="" if ok else message, zone_count=zones)

    def DetectOMAVM(self, request, context):
        found = cloudstack_settings.detect_oma_vm(self._client(request), persist=request.persist)
        return fill(pb.DetectOMAVMResponse(), found,
                    oma_info=fill(pb.OMAVMInfo(), found.oma_info) if found.oma_info else None)

    def ListNetworks(self, request, context):
        networks = cloudstack_settings.active_networks(self._runtime.secrets, request.zone_id)
        page = paging.paginate_list(networks, request.page_size, request.page_token)
        return pb.ListNetworksResponse(
            success=True, networks=[cloudstack_messages.network(pb.CloudStackNetwork(), n) for n in page.items],
            count=page.total, next_page_token=page.next_page_token)

    def ValidateSettings(self, request, context):
        result = cloudstack_settings.validate(
            self._client(request), oma_vm_id=request.oma_vm_id,
            service_offering_id=request.service_offering_id, network_id=request.network_id)
        message = pb.CloudStackValidationResult(overall_status=result.overall_status, oma_vm_id=result.oma_vm_id)
        for name, check in result.checks.items():
            getattr(message, name).CopyFrom(fill(pb.CloudStackValidationCheck(), check,
                                                 details=struct(check.details, keep_empty=True)))
        overall = result.overall_status
        text = {"pass": "all checks passed", "warning": "settings usable, with warnings",
                "fail": "settings are not usable"}[overall]
        return pb.ValidateSettingsResponse(success=overall != "fail", result=message, message=text)

    def DiscoverAllResources(self, request, context):
        found = cloudstack_settings.discover_all(self._client(request))
        return fill(pb.DiscoverAllResourcesResponse(), oma_vm_id=found.oma_vm_id, oma_vm_name=found.oma_vm_name,
                    zones=[cloudstack_messages.zone(pb.CloudStackZone(), z) for z in found.zones],
                    templates=[cloudstack_messages.template(pb.CloudStackTemplate(), t) for t in found.templates],
                    service_offerings=[cloudstack_messages.service_offering(pb.ServiceOffering(), o)
                                       for o in found.service_offerings],
                    disk_offerings=[cloudstack_messages.disk_offering(pb.DiskOffering(), o)
                                    for o in found.disk_offerings],
                    networks=[cloudstack_messages.network(pb.CloudStackNetwork(), n) for n in found.networks],
                    warnings=found.warnings)
