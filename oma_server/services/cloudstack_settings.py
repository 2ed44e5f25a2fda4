from __future__ import annotations

from google.protobuf import struct_pb2
from oma.v1 import cloudstack_settings_pb2 as pb
from oma.v1 import cloudstack_settings_pb2_grpc

from oma_server.convert import fill
from oma_server.domain import cloudstack_config, cloudstack_settings, paging
from oma_server.errors import DomainError
from oma_server.integrations.cloudstack import CloudStack
from oma_server.integrations.host import local_mac_addresses


def _zone(z):
    return pb.CloudStackZone(id=z["id"], name=z.get("name", ""))


def _template(t):
    return pb.CloudStackTemplate(id=t["id"], name=t.get("displaytext") or t.get("name", ""),
                                 description=t.get("ostypename", ""), os_type=t.get("ostypename", ""),
                                 size_gb=int(t.get("size") or 0) >> 30)


def _service_offering(o):
    return pb.ServiceOffering(id=o["id"], name=o.get("displaytext") or o.get("name", ""),
                              description=o.get("displaytext", ""), cpu=int(o.get("cpunumber") or 0),
                              memory=int(o.get("memory") or 0), is_customized=bool(o.get("iscustomized")))


def _disk_offering(o):
    return pb.DiskOffering(id=o["id"], name=o.get("displaytext") or o.get("name", ""),
                           description=o.get("displaytext", ""), disk_size_gb=int(o.get("disksize") or 0),
                           is_customized=bool(o.get("iscustomized")))


def _network(n):
    return pb.CloudStackNetwork(id=n["id"], name=n.get("name", ""), description=n.get("displaytext", ""),
                                zone_id=n.get("zoneid", ""), zone_name=n.get("zonename", ""),
                                state=n.get("state", ""), is_default=bool(n.get("isdefault")))


class CloudStackSettingsServicer(cloudstack_settings_pb2_grpc.CloudStackSettingsServiceServicer):

    def __init__(self, runtime):
        self._runtime = runtime

    def _client(self, request) -> CloudStack:
        s = self._runtime.settings
        return CloudStack(cloudstack_settings.endpoint(request.api_url, request.api_key, request.secret_key),
                          poll_interval=s.cloudstack_poll_interval_seconds, timeout=15)

    def TestConnection(self, request, context):
        ok, message, zones = cloudstack_settings.test_connection(self._client(request))
        return pb.TestConnectionResponse(success=ok, message=message if ok else "Connection failed",
                                         error="" if ok else message, zone_count=zones)

    def DetectOMAVM(self, request, context):
        cs = self._client(request)  # bad input is an error, not a failed detection
        try:
            found = cloudstack_settings.find_oma_vm(cs, local_mac_addresses())
        except DomainError as exc:
            return pb.DetectOMAVMResponse(success=False, message="detection failed",
                                          error=cloudstack_settings.friendly_error(exc))
        if found is None:
            return pb.DetectOMAVMResponse(success=False, message="no CloudStack VM has a MAC address of this host",
                                          error="OMA VM not found")
        response = pb.DetectOMAVMResponse(success=True, message=f"OMA VM detected: {found['vm_name']}",
                                          oma_info=pb.OMAVMInfo(**found))
        if request.persist:
            config = cloudstack_settings.persist_oma_vm_id(found["vm_id"])
            response.persisted, response.ossea_config_id = True, config.id
        return response

    def ListNetworks(self, request, context):
        config = cloudstack_config.require_active()
        networks = cloudstack_config.client(config, self._runtime.secrets).list_networks(request.zone_id)
        page = paging.paginate_list(networks, request.page_size, request.page_token)
        return pb.ListNetworksResponse(success=True, networks=[_network(n) for n in page.items], count=page.total,
                                       next_page_token=page.next_page_token)

    def ValidateSettings(self, request, context):
        result = cloudstack_settings.validate(
            self._client(request), local_mac_addresses(), oma_vm_id=request.oma_vm_id,
            service_offering_id=request.service_offering_id, network_id=request.network_id)
        message = pb.CloudStackValidationResult(overall_status=result["overall_status"], oma_vm_id=result["oma_vm_id"])
        for name, check in result["checks"].items():
            details = struct_pb2.Struct()
            details.update(check.details)
            getattr(message, name).CopyFrom(pb.CloudStackValidationCheck(
                status=check.status, message=check.message, details=details))
        overall = result["overall_status"]
        text = {"pass": "all checks passed", "warning": "settings usable, with warnings",
                "fail": "settings are not usable"}[overall]
        return pb.ValidateSettingsResponse(success=overall != "fail", result=message, message=text)

    def DiscoverAllResources(self, request, context):
        found = cloudstack_settings.discover_all(self._client(request), local_mac_addresses())
        return fill(pb.DiscoverAllResourcesResponse(), oma_vm_id=found["oma_vm_id"], oma_vm_name=found["oma_vm_name"],
                    zones=[_zone(z) for z in found["zones"]], templates=[_template(t) for t in found["templates"]],
                    service_offerings=[_service_offering(o) for o in found["service_offerings"]],
                    disk_offerings=[_disk_offering(o) for o in found["disk_offerings"]],
                    networks=[_network(n) for n in found["networks"]], warnings=found["warnings"])
