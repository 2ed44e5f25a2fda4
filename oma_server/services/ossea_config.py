from __future__ import annotations

from oma.v1 import ossea_config_pb2 as pb
from oma.v1 import ossea_config_pb2_grpc

from oma_server.convert import fill, optional, optional_fields
from oma_server.db.models import OsseaConfig
from oma_server.domain import cloudstack_config, cloudstack_settings
from oma_server.services import cloudstack_messages

_FIELDS = ("name", "api_url", "api_key", "secret_key", "zone", "domain", "oma_vm_id", "template_id",
           "network_id", "service_offering_id", "disk_offering_id")


class OSSEAConfigServicer(ossea_config_pb2_grpc.OSSEAConfigServiceServicer):

    def __init__(self, runtime):
        self._runtime = runtime
        self._box = runtime.secrets

    def _message(self, config: OsseaConfig) -> pb.OSSEAConfig:
        return fill(pb.OSSEAConfig(), config, api_key_hint=cloudstack_config.api_key_hint(config, self._box))

    def CreateConfig(self, request, context):
        values = {name: getattr(request, name) for name in _FIELDS}
        activate = optional(request, "activate", True)
        return pb.CreateConfigResponse(config=self._message(cloudstack_config.create(self._box, values, activate=activate)))

    def GetConfig(self, request, context):
        config = cloudstack_config.get(request.id) if request.id else cloudstack_config.require_active()
        return pb.GetConfigResponse(config=self._message(config))

    def ListConfigs(self, request, context):
        page = cloudstack_config.list_configs(request.include_inactive, request.page_size, request.page_token)
        return pb.ListConfigsResponse(configs=[self._message(c) for c in page.items],
                                      next_page_token=page.next_page_token)

    def UpdateConfig(self, request, context):
        config = cloudstack_config.update(self._box, request.id, optional_fields(request, *_FIELDS))
        return pb.UpdateConfigResponse(config=self._message(config))

    def DeleteConfig(self, request, context):
        config = cloudstack_config.deactivate_or_purge(request.id, request.purge)
        return pb.DeleteConfigResponse(config=self._message(config))

    def ActivateConfig(self, request, context):
        return pb.ActivateConfigResponse(config=self._message(cloudstack_config.activate(request.id)))

    def TestConfig(self, request, context):
        s = request.settings
        cs, zone = cloudstack_settings.test_client(self._box, request.id, s.api_url, s.api_key, s.secret_key, s.zone,
                                                   given=request.HasField("settings"))
        result = cloudstack_settings.test_zone(cs, zone)
        return fill(pb.TestConfigResponse(), result)

    def DiscoverResources(self, request, context):
        found = cloudstack_settings.discover_with_credentials(request.base_url, request.api_key, request.secret_key)
        domain = request.domain or "ROOT"
        return pb.DiscoverResourcesResponse(
            success=True, zones=[cloudstack_messages.zone(pb.OSSEAZone(), z) for z in found.zones],
            domains=[pb.OSSEADomain(id=domain, name=domain, path=domain)],
            templates=[cloudstack_messages.template(pb.OSSEATemplate(), t) for t in found.templates],
            service_offerings=[cloudstack_messages.service_offering(pb.OSSEAServiceOffering(), o)
                               for o in found.service_offerings],
            disk_offerings=[cloudstack_messages.disk_offering(pb.OSSEADiskOffering(), o) for o in found.disk_offerings],
            networks=[cloudstack_messages.network(pb.OSSEANetwork(), n) for n in found.networks],
            warnings=found.warnings,
        )

    def SaveStreamlinedConfig(self, request, context):
        values = {name: getattr(request, name) for name in (
            "base_url", "api_key", "secret_key", "zone_id", "disk_offering_id", "domain", "domain_name",
            "template_id", "service_offering_id", "network_id", "oma_vm_id")}
        config, created = cloudstack_settings.save_streamlined(self._box, values)
        return pb.SaveStreamlinedConfigResponse(success=True, message="configuration saved and active",
                                                config=self._message(config), created=created)
