"""omactl cloudstack: CloudStack configurations, connection tests, discovery and the OMA VM."""
from __future__ import annotations

import argparse
from typing import Any

from google.protobuf.message import Message
from oma.v1 import cloudstack_settings_pb2 as cloudstack_pb
from oma.v1 import ossea_config_pb2 as ossea_pb

from omaclient import output
from omaclient.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    Session,
    UsageError,
    add_command,
    add_family,
    add_secret_options,
    read_secret,
    set_present,
)


def _add_endpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-url", required=True, help="http(s)://host:port/client/api")
    p.add_argument("--api-key", required=True)
    add_secret_options(p, "secret-key", "CloudStack secret key")


def _secret_key(args: argparse.Namespace, *, required: bool = True) -> str | None:
    return read_secret(args, "secret-key", "CloudStack secret key: ", required=required)


def _cloudstack_set(s: Session, args: argparse.Namespace) -> None:
    configs = s.client.pages(s.client.ossea.ListConfigs, ossea_pb.ListConfigsRequest(include_inactive=True), "configs")
    existing = next((c for c in configs if c.name == args.name), None)
    values = {"api_url": args.api_url, "api_key": args.api_key, "zone": args.zone, "domain": args.domain,
              "template_id": args.template_id, "network_id": args.network_id,
              "service_offering_id": args.service_offering_id, "disk_offering_id": args.disk_offering_id,
              "oma_vm_id": args.oma_vm_id}
    if existing is not None:
        request: Message = set_present(ossea_pb.UpdateConfigRequest(id=existing.id), **values,
                                        secret_key=_secret_key(args, required=False))
        response, verb = s.call(s.client.ossea.UpdateConfig, request), "updated"
    else:
        request = set_present(ossea_pb.CreateConfigRequest(name=args.name, activate=args.activate), **values,
                               secret_key=_secret_key(args))
        response, verb = s.call(s.client.ossea.CreateConfig, request), "created"
    s.show(response, lambda r: f"{verb} CloudStack config {r.config.id} ({r.config.name})"
                               + (", active" if r.config.is_active else ""))


def _cloudstack_list(s: Session, args: argparse.Namespace) -> None:
    request = ossea_pb.ListConfigsRequest(include_inactive=args.all)
    configs = list(s.client.pages(s.client.ossea.ListConfigs, request, "configs"))
    s.show(ossea_pb.ListConfigsResponse(configs=configs),
           lambda r: output.table(r.configs, output.CLOUDSTACK_CONFIG_COLUMNS, empty="no CloudStack configs"))


def _cloudstack_show(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.ossea.GetConfig, ossea_pb.GetConfigRequest(id=args.id or 0))
    s.show(response, lambda r: output.cloudstack_config_details(r.config))


def _cloudstack_activate(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.ossea.ActivateConfig, ossea_pb.ActivateConfigRequest(id=args.id))
    s.show(response, lambda r: f"CloudStack config {r.config.id} ({r.config.name}) is now the active one")


def _cloudstack_test(s: Session, args: argparse.Namespace) -> int:
    if args.api_url:
        if args.id or not args.api_key:
            raise UsageError("test either a stored config (ID) or --api-url with --api-key")
        settings = ossea_pb.OSSEAConnectionSettings(api_url=args.api_url, api_key=args.api_key,
                                                    secret_key=_secret_key(args), zone=args.zone or "",
                                                    domain=args.domain or "")
        request = ossea_pb.TestConfigRequest(settings=settings)
    else:
        request = ossea_pb.TestConfigRequest(id=args.id) if args.id else ossea_pb.TestConfigRequest()
    response = s.call(s.client.ossea.TestConfig, request, slow=True)

    def render(r: Any) -> str:
        if r.success:
            return f"ok: {r.message} (zone {r.zone_name} {r.zone_id})"
        zones = f"; available zones: {', '.join(r.available_zones)}" if r.available_zones else ""
        return f"failed: {r.error or r.message}{zones}"

    s.show(response, render)
    return EXIT_OK if response.success else EXIT_FAILED


def _cloudstack_discover(s: Session, args: argparse.Namespace) -> None:
    request = cloudstack_pb.DiscoverAllResourcesRequest(api_url=args.api_url, api_key=args.api_key,
                                                        secret_key=_secret_key(args), domain=args.domain or "")
    response = s.call(s.client.cloudstack.DiscoverAllResources, request, slow=True)
    s.show(response, output.cloudstack_resources)


def _cloudstack_detect_oma_vm(s: Session, args: argparse.Namespace) -> int:
    request = cloudstack_pb.DetectOMAVMRequest(api_url=args.api_url, api_key=args.api_key,
                                               secret_key=_secret_key(args), persist=args.persist)
    response = s.call(s.client.cloudstack.DetectOMAVM, request, slow=True)

    def render(r: Any) -> str:
        if not r.success:
            return f"failed: {r.error or r.message}"
        vm = r.oma_info
        saved = f"\nsaved as oma_vm_id of CloudStack config {r.ossea_config_id}" if r.persisted else ""
        return output.fields([("OMA VM", f"{vm.vm_name} ({vm.vm_id})"), ("MAC", vm.mac_address),
                              ("IP", vm.ip_address), ("Account", vm.account)]) + saved

    s.show(response, render)
    return EXIT_OK if response.success else EXIT_FAILED


def _cloudstack_validate(s: Session, args: argparse.Namespace) -> int:
    request = cloudstack_pb.ValidateSettingsRequest(
        api_url=args.api_url, api_key=args.api_key, secret_key=_secret_key(args),
        oma_vm_id=args.oma_vm_id or "", service_offering_id=args.service_offering_id or "",
        network_id=args.network_id or "",
    )
    response = s.call(s.client.cloudstack.ValidateSettings, request, slow=True)
    s.show(response, output.cloudstack_validation)
    return EXIT_OK if response.success else EXIT_FAILED


def register_cloudstack(commands: Any) -> None:
    actions = add_family(commands, "cloudstack", "CloudStack (OSSEA) connection settings")
    p = add_command(actions, "set", _cloudstack_set,
                 "create the named config, or change the given fields of it (the secret key only when given)")
    p.add_argument("name")
    p.add_argument("--api-url", help="http(s)://host:port/client/api")
    p.add_argument("--api-key")
    p.add_argument("--zone", help="zone id or name")
    p.add_argument("--domain")
    p.add_argument("--template-id")
    p.add_argument("--network-id")
    p.add_argument("--service-offering-id")
    p.add_argument("--disk-offering-id")
    p.add_argument("--oma-vm-id", help="CloudStack VM id of the OMA appliance")
    p.add_argument("--no-activate", dest="activate", action="store_false",
                   help="store a new config without making it the active one")
    add_secret_options(p, "secret-key", "CloudStack secret key")
    p = add_command(actions, "list", _cloudstack_list, "list the active config (all with --all)")
    p.add_argument("--all", action="store_true", help="include inactive configs")
    p = add_command(actions, "show", _cloudstack_show, "show a config (default: the active one)")
    p.add_argument("id", nargs="?", type=int)
    p = add_command(actions, "activate", _cloudstack_activate, "make a config the active one")
    p.add_argument("id", type=int)
    p = add_command(actions, "test", _cloudstack_test,
                 "test a stored config (default: the active one) or --api-url/--api-key settings")
    p.add_argument("id", nargs="?", type=int)
    p.add_argument("--api-url")
    p.add_argument("--api-key")
    p.add_argument("--zone")
    p.add_argument("--domain")
    add_secret_options(p, "secret-key", "CloudStack secret key")
    p = add_command(actions, "discover", _cloudstack_discover,
                 "list zones, templates, offerings and networks reachable with these credentials")
    _add_endpoint_options(p)
    p.add_argument("--domain")
    p = add_command(actions, "detect-oma-vm", _cloudstack_detect_oma_vm,
                 "find the CloudStack VM this OMA runs in (by MAC address)")
    _add_endpoint_options(p)
    p.add_argument("--persist", action="store_true", help="store it in the active config")
    p = add_command(actions, "validate", _cloudstack_validate, "check OMA VM, compute offering, account and network")
    _add_endpoint_options(p)
    p.add_argument("--oma-vm-id")
    p.add_argument("--service-offering-id")
    p.add_argument("--network-id")
