from __future__ import annotations

from oma.v1 import ossea_config_pb2 as pb
from oma.v1 import ossea_config_pb2_grpc

from oma_server.convert import fill, optional_fields, timestamp
from oma_server.db.models import OsseaConfig, utcnow
from oma_server.domain import cloudstack_config, cloudstack_settings, paging
from oma_server.domain.text_rules import quote
from oma_server.errors import DomainError, InvalidArgument, require
from oma_server.integrations.cloudstack import CloudStack, Endpoint
from oma_server.integrations.host import local_mac_addresses

_FIELDS = ("name", "api_url", "api_key", "secret_key", "zone", "domain", "oma_vm_id", "template_id",
           "network_id", "service_offering_id", "disk_offering_id")
STREAMLINED_NAME = "production-ossea"


class OSSEAConfigServicer(ossea_config_pb2_grpc.OSSEAConfigServiceServicer):

    def __init__(self, runtime):
        self._runtime = runtime
        self._box = runtime.secrets

    def _message(self, config: OsseaConfig) -> pb.OSSEAConfig:
        return fill(pb.OSSEAConfig(), config, api_key_hint=cloudstack_config.api_key_hint(config, self._box))

    def CreateConfig(self, request, context):
        values = {name: getattr(request, name) for name in _FIELDS}
        activate = request.activate if request.HasField("activate") else True
        return pb.CreateConfigResponse(config=self._message(cloudstack_config.create(self._box, values, activate=activate)))

    def GetConfig(self, request, context):
        config = cloudstack_config.get(request.id) if request.id else cloudstack_config.require_active()
        return pb.GetConfigResponse(config=self._message(config))

    def ListConfigs(self, request, context):
        query = OsseaConfig.select()
        if not request.include_inactive:
            query = query.where(OsseaConfig.is_active == True)  # noqa: E712
        page = paging.paginate(query.order_by(OsseaConfig.id), request.page_size, request.page_token)
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
        if request.HasField("settings"):
            s = request.settings
            cs = CloudStack(cloudstack_settings.endpoint(s.api_url, s.api_key, s.secret_key), timeout=15)
            zone = s.zone
        else:
            config = cloudstack_config.get(request.id) if request.id else cloudstack_config.require_active()
            cs, zone = cloudstack_config.client(config, self._box, timeout=15), config.zone
        try:
            zones = cs.list_zones()
        except DomainError as exc:
            return pb.TestConfigResponse(success=False, message="connection failed",
                                         error=cloudstack_settings.friendly_error(exc), zone=zone,
                                         tested_at=timestamp(utcnow()))
        names = [z.get("name", z["id"]) for z in zones]
        match = next((z for z in zones if zone in (z["id"], z.get("name"))), None)
        if match is None:
            return pb.TestConfigResponse(success=False, message=f"zone {quote(zone)} not found", zone=zone,
                                         available_zones=names, error=f"zone {quote(zone)} not found",
                                         tested_at=timestamp(utcnow()))
        return pb.TestConfigResponse(success=True, message=f"connected; zone {match.get('name')} found", zone=zone,
                                     zone_id=match["id"], zone_name=match.get("name", ""), available_zones=names,
                                     tested_at=timestamp(utcnow()))

    def DiscoverResources(self, request, context):
        require(request.base_url and request.api_key and request.secret_key,
                "base_url, api_key and secret_key are required")
        cs = CloudStack(cloudstack_settings.endpoint(request.base_url, request.api_key, request.secret_key,
                                                     "base_url"), timeout=15)
        try:
            found = cloudstack_settings.discover_all(cs, local_mac_addresses())
        except DomainError as exc:
            raise InvalidArgument(f"failed to connect to CloudStack: {cloudstack_settings.friendly_error(exc)}") from None
        domain = request.domain or "ROOT"
        return pb.DiscoverResourcesResponse(
            success=True, zones=[pb.OSSEAZone(id=z["id"], name=z.get("name", "")) for z in found["zones"]],
            domains=[pb.OSSEADomain(id=domain, name=domain, path=domain)],
            templates=[pb.OSSEATemplate(id=t["id"], name=t.get("displaytext") or t.get("name", ""),
                                        description=t.get("ostypename", ""), os_type=t.get("ostypename", ""))
                       for t in found["templates"]],
            service_offerings=[pb.OSSEAServiceOffering(
                id=o["id"], name=o.get("displaytext") or o.get("name", ""), description=o.get("displaytext", ""),
                cpu=int(o.get("cpunumber") or 0), memory=int(o.get("memory") or 0),
                is_customized=bool(o.get("iscustomized"))) for o in found["service_offerings"]],
            disk_offerings=[pb.OSSEADiskOffering(id=o["id"], name=o.get("displaytext") or o.get("name", ""),
                                                 description=o.get("displaytext", ""),
                                                 disk_size_gb=int(o.get("disksize") or 0))
                            for o in found["disk_offerings"]],
            networks=[pb.OSSEANetwork(id=n["id"], name=n.get("name", ""), description=n.get("displaytext", ""),
                                      zone_id=n.get("zoneid", "")) for n in found["networks"]],
            warnings=found["warnings"],
        )

    def SaveStreamlinedConfig(self, request, context):
        missing = [name for name in ("base_url", "api_key", "secret_key", "zone_id", "disk_offering_id")
                   if not getattr(request, name)]
        if missing:
            raise InvalidArgument(f"missing required fields: {', '.join(missing)}")
        url = cloudstack_settings.api_url(request.base_url, "base_url")
        cs = CloudStack(Endpoint(url, request.api_key, request.secret_key), timeout=15)
        try:
            zone = cloudstack_settings.resolve_zone(cs, request.zone_id)
        except DomainError as exc:
            raise InvalidArgument(f"CloudStack connection test failed: {cloudstack_settings.friendly_error(exc)}") from None
        if zone is None:
            raise InvalidArgument(f"zone {quote(request.zone_id)} does not exist in CloudStack")
        values = {"name": STREAMLINED_NAME, "api_url": url, "api_key": request.api_key,
                  "secret_key": request.secret_key, "zone": zone[0], "domain": request.domain or request.domain_name,
                  "template_id": request.template_id, "service_offering_id": request.service_offering_id,
                  "disk_offering_id": request.disk_offering_id, "network_id": request.network_id,
                  "oma_vm_id": request.oma_vm_id}
        existing = OsseaConfig.get_or_none(OsseaConfig.name == STREAMLINED_NAME)
        if existing is None:
            config, created = cloudstack_config.create(self._box, values), True
        else:
            cloudstack_config.update(self._box, existing.id, values)
            config, created = cloudstack_config.activate(existing.id), False
        return pb.SaveStreamlinedConfigResponse(success=True, message="configuration saved and active",
                                                config=self._message(config), created=created)
