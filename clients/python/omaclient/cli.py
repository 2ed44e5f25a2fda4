"""omactl: the operator's command line for the OMA migration server.

A thin shell over :class:`omaclient.client.OmaClient`: every command is one RPC (a few when a VM or
group name has to be resolved to its id first), printed by :mod:`omaclient.output` as aligned text,
or with ``--json`` as the response message itself, so scripts read exactly what the API returns.

Connection: ``--target`` (else ``$OMA_TARGET``, else the target saved by ``omactl login``, else
127.0.0.1:9090) and ``--token`` (else ``$OMA_TOKEN``, else the token ``login`` saved for that same
target). ``login`` writes ``$OMACTL_CONFIG`` (default ~/.config/omactl/config.json) with mode 0600.
The global options are accepted before or after the command.

Secrets (vCenter passwords, CloudStack secret keys) are never flag values, which would show in
``ps`` and in shell history: ``--password-stdin`` reads one line from stdin, ``--password-env VAR``
reads an environment variable, otherwise omactl prompts without echo.

Output: text for people; ``--json`` prints one JSON document per command on stdout (proto field
names, every field present). ``replicate`` and ``watch`` follow a job and print one JSON document
per progress update instead (JSON Lines; ``replicate`` starts with the CreateReplication response).
Errors go to stderr as ``error: <gRPC status name>: <details>``.

Exit codes (gRPC status N is offset by 100 because 1 and 2, CANCELLED and UNKNOWN, would collide
with the generic failure and argparse's usage error; so ``exit - 100`` is the status for all >= 100):

    0      success (replicate/watch: the job completed)
    1      the command ran but reports a failure: the followed job failed or was cancelled, a
           connection test failed, a VM could not be added
    2      usage error: bad options or arguments, a secret that cannot be read
    100+N  an RPC failed with gRPC status N: 103 INVALID_ARGUMENT, 105 NOT_FOUND, 106 ALREADY_EXISTS,
           109 FAILED_PRECONDITION, 112 UNIMPLEMENTED, 114 UNAVAILABLE, 116 UNAUTHENTICATED, ...
           (a VM or group name omactl cannot resolve is 105 as well)
    130    interrupted (Ctrl-C); a job being watched keeps running
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import tempfile
import uuid
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc
from google.protobuf.message import Message
from oma.v1 import cloudstack_settings_pb2 as cloudstack_pb
from oma.v1 import discovery_pb2 as discovery_pb
from oma.v1 import job_log_pb2 as jobs_pb
from oma.v1 import machine_groups_pb2 as groups_pb
from oma.v1 import network_mappings_pb2 as mappings_pb
from oma.v1 import ossea_config_pb2 as ossea_pb
from oma.v1 import replications_pb2 as replications_pb
from oma.v1 import vm_contexts_pb2 as contexts_pb
from oma.v1 import vmware_credentials_pb2 as credentials_pb

from omaclient import output, progress
from omaclient.client import DEFAULT_TARGET, OmaClient, config_path, saved_settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_RPC_BASE = 100
EXIT_INTERRUPTED = 130

DEFAULT_TIMEOUT_S = 30.0
# vCenter discovery and CloudStack look-ups wait on remote systems (the VMA alone allows 60 s).
SLOW_TIMEOUT_S = 120.0
LIST_LIMIT = 50

_HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: "log in with: omactl login --target {target}",
    grpc.StatusCode.UNAVAILABLE: "is the OMA server running at {target}? (set it with --target or $OMA_TARGET)",
}


def exit_code_for(code: grpc.StatusCode) -> int:
    """The exit code of a command whose RPC failed with ``code``."""
    return EXIT_RPC_BASE + code.value[0]


class UsageError(Exception):
    """Options that parse but do not make sense together, or a secret that cannot be read."""


class CliError(Exception):
    """A failure omactl finds itself (e.g. an unknown group name), reported like the RPC error it stands for."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class Session:
    """What a command works with: its options, the connection (opened on first use) and the output form."""

    def __init__(self, args: argparse.Namespace):
        saved = saved_settings()
        self.json: bool = getattr(args, "json", False)
        explicit_timeout = getattr(args, "timeout", None)
        self.timeout = explicit_timeout or DEFAULT_TIMEOUT_S
        self.slow_timeout = explicit_timeout or SLOW_TIMEOUT_S
        self.target: str = (getattr(args, "target", None) or os.environ.get("OMA_TARGET")
                            or saved.get("target") or DEFAULT_TARGET)
        # A saved token belongs to the server that issued it.
        saved_token = saved.get("token") if saved.get("target") == self.target else None
        self.token: str = getattr(args, "token", None) or os.environ.get("OMA_TOKEN") or saved_token or ""
        self._client: OmaClient | None = None

    @property
    def client(self) -> OmaClient:
        if self._client is None:
            self._client = OmaClient(self.target, token=self.token, timeout=self.timeout)
        return self._client

    def call(self, method: Callable, request: Message, *, slow: bool = False) -> Any:
        """One unary RPC with the command's deadline."""
        return method(request, timeout=self.slow_timeout if slow else self.timeout)

    def show(self, message: Message, render: Callable[[Any], str]) -> None:
        print(output.to_json(message) if self.json else render(message))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


# --- secrets --------------------------------------------------------------------------------------
def add_secret_options(parser: argparse.ArgumentParser, option: str, what: str, *, prompt_flag: bool = False) -> None:
    """--<option>-stdin / --<option>-env VAR (and, where a prompt is not the default, --<option>-prompt)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(f"--{option}-stdin", action="store_true", help=f"read the {what} from the first line of stdin")
    group.add_argument(f"--{option}-env", metavar="VAR", help=f"read the {what} from environment variable VAR")
    if prompt_flag:
        group.add_argument(f"--{option}-prompt", action="store_true", help=f"prompt for a new {what}")


def read_secret(args: argparse.Namespace, option: str, prompt: str, *, required: bool = True) -> str | None:
    """The secret from the options of ``add_secret_options``; None when it is optional and not given."""
    dest = option.replace("-", "_")
    if getattr(args, f"{dest}_stdin"):
        return sys.stdin.readline().rstrip("\r\n")
    variable = getattr(args, f"{dest}_env")
    if variable:
        if variable not in os.environ:
            raise UsageError(f"environment variable {variable} is not set")
        return os.environ[variable]
    if required or getattr(args, f"{dest}_prompt", False):
        try:
            return getpass.getpass(prompt)
        except EOFError:
            raise UsageError(f"no {option.replace('-', ' ')} given") from None
    return None


def _set_present(message: Message, **values: Any) -> Message:
    """Assign the values that were given (not None): for ``optional`` fields that means "change this"."""
    for name, value in values.items():
        if value is not None:
            setattr(message, name, value)
    return message


# --- names to ids ---------------------------------------------------------------------------------
def _context_id(s: Session, vm_name: str, vcenter: str | None) -> str:
    request = contexts_pb.GetVMContextByNameRequest(vm_name=vm_name, vcenter_host=vcenter or "")
    return s.call(s.client.contexts.GetVMContextByName, request).details.context.context_id


def _group_id(s: Session, ref: str) -> str:
    for group in s.client.pages(s.client.groups.ListGroups, groups_pb.ListGroupsRequest(), "groups"):
        if ref in (group.id, group.name):
            return group.id
    raise CliError(grpc.StatusCode.NOT_FOUND, f"no machine group named {ref!r}")


def _vcenter_source(s: Session, credential_id: int | None) -> discovery_pb.VCenterSource:
    if credential_id is None:
        response = s.call(s.client.credentials.GetDefaultCredential, credentials_pb.GetDefaultCredentialRequest())
        credential_id = response.credential.id
    return discovery_pb.VCenterSource(credential_id=credential_id)


# --- session --------------------------------------------------------------------------------------
def _write_private(path: Path, settings: dict[str, Any]) -> None:
    """Replace the config file atomically with a 0600 one (mkstemp creates it that way)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(settings, f, indent=2)
    os.replace(tmp, path)


def _login(s: Session, args: argparse.Namespace) -> None:
    password = read_secret(args, "password", f"Password for {args.username} on {s.target}: ")
    response = s.client.login(args.username, password or "")
    path = config_path()
    _write_private(path, {"target": s.target, "token": response.token, "username": response.username,
                          "expires_at": output.when(response.expires_at)})
    s.show(response, lambda r: f"logged in to {s.target} as {r.username} until {output.when(r.expires_at)}; "
                               f"token saved in {path}")


def _logout(s: Session, args: argparse.Namespace) -> None:
    settings = saved_settings()
    if not settings.get("token"):
        print("not logged in")
        return
    _write_private(config_path(), {"target": settings.get("target", s.target)})
    print(f"removed the saved token for {settings.get('target')} (the server does not revoke tokens; "
          f"it stays valid until {settings.get('expires_at', 'it expires')})")


def _register_session(commands: Any) -> None:
    p = _command(commands, "login", _login, "log in and save the target and token for later commands")
    p.add_argument("--username", default="admin")
    add_secret_options(p, "password", "password")
    _command(commands, "logout", _logout, "forget the saved token")


# --- vCenter credentials --------------------------------------------------------------------------
def _credentials_add(s: Session, args: argparse.Namespace) -> None:
    request = credentials_pb.CreateCredentialRequest(
        credential_name=args.name, vcenter_host=args.vcenter, username=args.username,
        datacenter=args.datacenter, is_default=args.default, tls_thumbprint=args.thumbprint or "",
        tls_insecure=args.insecure,
        password=read_secret(args, "password", f"vCenter password for {args.username}@{args.vcenter}: "),
    )
    _set_present(request, is_active=args.active)
    response = s.call(s.client.credentials.CreateCredential, request)
    s.show(response, lambda r: f"added credential {r.credential.id} ({r.credential.credential_name})")


def _credentials_list(s: Session, args: argparse.Namespace) -> None:
    request = credentials_pb.ListCredentialsRequest(active_only=args.active)
    response = s.call(s.client.credentials.ListCredentials, request)
    s.show(response, lambda r: output.table(r.credentials, output.CREDENTIAL_COLUMNS, empty="no credentials"))


def _credentials_show(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.credentials.GetCredential, credentials_pb.GetCredentialRequest(id=args.id))
    s.show(response, lambda r: output.credential_details(r.credential))


def _credentials_update(s: Session, args: argparse.Namespace) -> None:
    request = _set_present(
        credentials_pb.UpdateCredentialRequest(id=args.id), credential_name=args.name,
        vcenter_host=args.vcenter, username=args.username, datacenter=args.datacenter,
        tls_thumbprint=args.thumbprint, tls_insecure=args.insecure, is_active=args.active,
        password=read_secret(args, "password", "New vCenter password: ", required=False),
    )
    response = s.call(s.client.credentials.UpdateCredential, request)
    s.show(response, lambda r: f"updated credential {r.credential.id} ({r.credential.credential_name})")


def _credentials_delete(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.credentials.DeleteCredential, credentials_pb.DeleteCredentialRequest(id=args.id))
    s.show(response, lambda r: f"deleted credential {r.id}")


def _credentials_default(s: Session, args: argparse.Namespace) -> None:
    if args.action == "set":
        if args.id is None:
            raise UsageError("credentials default set needs the credential ID")
        request: Message = credentials_pb.SetDefaultCredentialRequest(id=args.id)
        response = s.call(s.client.credentials.SetDefaultCredential, request)
    else:
        request = credentials_pb.GetDefaultCredentialRequest()
        response = s.call(s.client.credentials.GetDefaultCredential, request)
    s.show(response, lambda r: output.credential_details(r.credential))


def _credentials_test(s: Session, args: argparse.Namespace) -> int:
    request = credentials_pb.TestCredentialRequest(id=args.id)
    response = s.call(s.client.credentials.TestCredential, request, slow=True)
    s.show(response, lambda r: f"ok: {r.message} (vCenter {r.vcenter_version}; datacenters: "
                               f"{', '.join(r.datacenters) or '-'})" if r.success else f"failed: {r.error or r.message}")
    return EXIT_OK if response.success else EXIT_FAILED


def _register_credentials(commands: Any) -> None:
    actions = _family(commands, "credentials", "saved vCenter credentials")
    p = _command(actions, "add", _credentials_add, "save a vCenter credential")
    p.add_argument("name")
    p.add_argument("--vcenter", required=True, help="vCenter host name")
    p.add_argument("--username", required=True)
    p.add_argument("--datacenter", required=True)
    p.add_argument("--default", action="store_true", help="make it the default credential")
    p.add_argument("--active", action=argparse.BooleanOptionalAction, help="(default: active)")
    p.add_argument("--thumbprint", help="pin the vCenter TLS certificate (SHA-1 thumbprint)")
    p.add_argument("--insecure", action="store_true", help="do not verify the vCenter TLS certificate")
    add_secret_options(p, "password", "vCenter password")
    p = _command(actions, "list", _credentials_list, "list credentials")
    p.add_argument("--active", action="store_true", help="active ones only")
    p = _command(actions, "show", _credentials_show, "show one credential")
    p.add_argument("id", type=int)
    p = _command(actions, "update", _credentials_update, "change a credential (only the given fields)")
    p.add_argument("id", type=int)
    p.add_argument("--name")
    p.add_argument("--vcenter")
    p.add_argument("--username")
    p.add_argument("--datacenter")
    p.add_argument("--thumbprint")
    p.add_argument("--insecure", action=argparse.BooleanOptionalAction)
    p.add_argument("--active", action=argparse.BooleanOptionalAction)
    add_secret_options(p, "password", "vCenter password", prompt_flag=True)
    p = _command(actions, "delete", _credentials_delete, "delete a credential")
    p.add_argument("id", type=int)
    p = _command(actions, "default", _credentials_default, "show the default credential, or 'set ID'")
    p.add_argument("action", nargs="?", choices=["set"])
    p.add_argument("id", nargs="?", type=int)
    p = _command(actions, "test", _credentials_test, "log in to vCenter with a credential (through the VMA)")
    p.add_argument("id", type=int)


# --- CloudStack -----------------------------------------------------------------------------------
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
        request: Message = _set_present(ossea_pb.UpdateConfigRequest(id=existing.id), **values,
                                        secret_key=_secret_key(args, required=False))
        response, verb = s.call(s.client.ossea.UpdateConfig, request), "updated"
    else:
        request = _set_present(ossea_pb.CreateConfigRequest(name=args.name, activate=args.activate), **values,
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


def _register_cloudstack(commands: Any) -> None:
    actions = _family(commands, "cloudstack", "CloudStack (OSSEA) connection settings")
    p = _command(actions, "set", _cloudstack_set,
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
    p = _command(actions, "list", _cloudstack_list, "list the active config (all with --all)")
    p.add_argument("--all", action="store_true", help="include inactive configs")
    p = _command(actions, "show", _cloudstack_show, "show a config (default: the active one)")
    p.add_argument("id", nargs="?", type=int)
    p = _command(actions, "activate", _cloudstack_activate, "make a config the active one")
    p.add_argument("id", type=int)
    p = _command(actions, "test", _cloudstack_test,
                 "test a stored config (default: the active one) or --api-url/--api-key settings")
    p.add_argument("id", nargs="?", type=int)
    p.add_argument("--api-url")
    p.add_argument("--api-key")
    p.add_argument("--zone")
    p.add_argument("--domain")
    add_secret_options(p, "secret-key", "CloudStack secret key")
    p = _command(actions, "discover", _cloudstack_discover,
                 "list zones, templates, offerings and networks reachable with these credentials")
    _add_endpoint_options(p)
    p.add_argument("--domain")
    p = _command(actions, "detect-oma-vm", _cloudstack_detect_oma_vm,
                 "find the CloudStack VM this OMA runs in (by MAC address)")
    _add_endpoint_options(p)
    p.add_argument("--persist", action="store_true", help="store it in the active config")
    p = _command(actions, "validate", _cloudstack_validate, "check OMA VM, compute offering, account and network")
    _add_endpoint_options(p)
    p.add_argument("--oma-vm-id")
    p.add_argument("--service-offering-id")
    p.add_argument("--network-id")


# --- discovery ------------------------------------------------------------------------------------
def _discover(s: Session, args: argparse.Namespace) -> None:
    request = discovery_pb.PreviewDiscoveryRequest(source=_vcenter_source(s, args.credential),
                                                   filter=args.filter or "")
    response = s.call(s.client.discovery.PreviewDiscovery, request, slow=True)
    s.show(response, lambda r: output.table(r.vms, output.DISCOVERED_VM_COLUMNS, empty="no VMs found")
           + f"\n\n{r.total_discovered} VMs in {r.vcenter}/{r.datacenter}: {r.new_vms} new, "
           f"{r.existing_vms} already managed")


def _add(s: Session, args: argparse.Namespace) -> int:
    request = discovery_pb.AddVMsRequest(source=_vcenter_source(s, args.credential), vm_names=args.vms)
    response = s.call(s.client.discovery.AddVMs, request, slow=True)
    s.show(response, lambda r: output.table(r.processed_vms, output.PROCESSED_VM_COLUMNS) + f"\n\n{r.message}")
    return EXIT_OK if response.success else EXIT_FAILED


def _register_discovery(commands: Any) -> None:
    p = _command(commands, "discover", _discover, "list the VMs of a vCenter (nothing is added)")
    p.add_argument("--credential", type=int, help="credential ID (default: the default credential)")
    p.add_argument("--filter", help="VM name filter")
    p = _command(commands, "add", _add, "put VMs under management")
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


def _register_vms(commands: Any) -> None:
    actions = _family(commands, "vms", "managed VMs (VM contexts)")
    p = _command(actions, "list", _vms_list, "list managed VMs")
    p.add_argument("--status", help="e.g. discovered, replicating, ready_for_failover, failed")
    p.add_argument("--name", help="part of the VM name")
    p.add_argument("--vcenter")
    p = _command(actions, "show", _vms_show, "show a VM with its disks and jobs")
    _add_vm_reference(p)
    p = _command(actions, "delete", _vms_delete, "remove a VM from management (refused while a job runs)")
    _add_vm_reference(p)


# --- replication ----------------------------------------------------------------------------------
def _replicate(s: Session, args: argparse.Namespace) -> int:
    request = replications_pb.CreateReplicationRequest(
        context_id=_context_id(s, args.vm, args.vcenter), replication_type=args.type or "",
        # Makes the call safe to retry: a repeated request id returns the job created the first time.
        request_id=str(uuid.uuid4()),
    )
    response = s.call(s.client.replications.CreateReplication, request)
    if s.json:
        print(output.to_json(response, compact=not args.no_follow))
    else:
        print(f"started {response.replication_type or 'a'} replication of {args.vm}: job {response.job_id}")
    if args.no_follow:
        if not s.json:
            print(f"follow it with: omactl watch {response.job_id}")
        return EXIT_OK
    return _follow(s, response.job_id)


def _watch(s: Session, args: argparse.Namespace) -> int:
    return _follow(s, args.job)


def _follow(s: Session, job_id: str) -> int:
    display: progress.Display
    if s.json:
        display = progress.JsonLinesDisplay(sys.stdout)
    elif sys.stderr.isatty():
        display = progress.TerminalDisplay(sys.stderr)
    else:
        display = progress.PlainDisplay(sys.stderr)
    try:
        final = progress.follow(s.client, job_id, display)
    except KeyboardInterrupt:
        print(f"\nstopped watching; job {job_id} keeps running. Resume with: omactl watch {job_id}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if not s.json:
        if final.status == "completed":
            print(f"job {job_id} completed: {output.size(final.bytes_transferred)} in "
                  f"{output.elapsed(final.started_at, final.completed_at)}")
        else:
            print(f"job {job_id} {final.status}: {final.error_message or 'no error message'}")
    return EXIT_OK if final.status == "completed" else EXIT_FAILED


def _cancel(s: Session, args: argparse.Namespace) -> None:
    request = replications_pb.CancelReplicationRequest(job_id=args.job, reason=args.reason or "")
    response = s.call(s.client.replications.CancelReplication, request)
    s.show(response, lambda r: f"job {r.job.job_id} is {r.job.status}")


def _replications_list(s: Session, args: argparse.Namespace) -> None:
    request = replications_pb.ListReplicationsRequest(
        vm_context_id=_context_id(s, args.vm, args.vcenter) if args.vm else "", statuses=args.status or [],
    )
    jobs = _limited(s, s.client.replications.ListReplications, request, "jobs", args.limit)
    s.show(replications_pb.ListReplicationsResponse(jobs=jobs, count=len(jobs)),
           lambda r: output.table(r.jobs, output.REPLICATION_COLUMNS, empty="no replication jobs"))


def _replications_show(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.replications.GetReplication, replications_pb.GetReplicationRequest(job_id=args.job))
    s.show(response, output.replication_details)


def _register_replication(commands: Any) -> None:
    p = _command(commands, "replicate", _replicate,
                 "start replicating a VM and follow the job (Ctrl-C stops watching, not the job)")
    p.add_argument("vm", metavar="VM", help="VM name")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--full", dest="type", action="store_const", const="initial", help="copy every disk in full")
    kind.add_argument("--incremental", dest="type", action="store_const", const="incremental",
                      help="copy the changes since the last run (default: decided from the stored change ids)")
    p.add_argument("--no-follow", action="store_true", help="return once the job is created")
    p.add_argument("--vcenter", help="vCenter host, when the name exists in several")
    p = _command(commands, "watch", _watch, "follow a replication job until it ends")
    p.add_argument("job", metavar="JOB")
    p = _command(commands, "cancel", _cancel, "cancel a replication job")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--reason")
    actions = _family(commands, "replications", "replication jobs")
    p = _command(actions, "list", _replications_list, "list replication jobs, newest first")
    p.add_argument("--vm", help="VM name")
    p.add_argument("--vcenter", help="vCenter host, when the name exists in several")
    p.add_argument("--status", action="append", help="repeatable: pending, replicating, completed, failed, ...")
    _add_limit(p)
    p = _command(actions, "show", _replications_show, "show a replication job with its disks")
    p.add_argument("job", metavar="JOB")


# --- JobLog ---------------------------------------------------------------------------------------
def _jobs_list(s: Session, args: argparse.Namespace) -> None:
    request = jobs_pb.ListJobsRequest(
        context_id=_context_id(s, args.vm, args.vcenter) if args.vm else "", statuses=args.status or [],
        job_type=args.type or "",
    )
    jobs = _limited(s, s.client.jobs.ListJobs, request, "jobs", args.limit)
    s.show(jobs_pb.ListJobsResponse(jobs=jobs, count=len(jobs)),
           lambda r: output.table(r.jobs, output.JOB_COLUMNS, empty="no jobs"))


def _jobs_show(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.jobs.GetJob, jobs_pb.GetJobRequest(job_id=args.id))
    s.show(response, lambda r: output.job_details(r.job))


def _register_jobs(commands: Any) -> None:
    actions = _family(commands, "jobs", "the JobLog: every operation with its steps")
    p = _command(actions, "list", _jobs_list, "list jobs, newest first")
    p.add_argument("--vm", help="VM name")
    p.add_argument("--vcenter", help="vCenter host, when the name exists in several")
    p.add_argument("--status", action="append", help="repeatable: pending, running, completed, failed, cancelled")
    p.add_argument("--type", help="e.g. replication, discovery, cleanup")
    _add_limit(p)
    p = _command(actions, "show", _jobs_show, "show a job with its steps")
    p.add_argument("id", help="job id (or external job id)")


# --- network mappings -----------------------------------------------------------------------------
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
    request = _set_present(mappings_pb.ListNetworkMappingsRequest(vm_id=args.vm or ""),
                           is_test_network=args.is_test_network)
    mappings = list(s.client.pages(s.client.network_mappings.ListNetworkMappings, request, "network_mappings"))
    s.show(mappings_pb.ListNetworkMappingsResponse(network_mappings=mappings, total_count=len(mappings)),
           lambda r: output.table(r.network_mappings, output.NETWORK_MAPPING_COLUMNS, empty="no network mappings"))


def _mappings_status(s: Session, args: argparse.Namespace) -> None:
    request = mappings_pb.GetNetworkMappingStatusRequest(vm_id=args.vm)
    response = s.call(s.client.network_mappings.GetNetworkMappingStatus, request)
    s.show(response, output.network_mapping_status)


def _mappings_delete(s: Session, args: argparse.Namespace) -> None:
    request = _set_present(
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


def _register_mappings(commands: Any) -> None:
    actions = _family(commands, "mappings", "source network -> CloudStack network mappings")
    p = _command(actions, "add", _mappings_add, "map a source network of a VM (replaces the existing mapping)")
    p.add_argument("vm", metavar="VM", help="VM name")
    p.add_argument("source_network", metavar="SOURCE_NETWORK", help="vSphere port group")
    p.add_argument("destination_network_id", metavar="DESTINATION_NETWORK_ID", help="CloudStack network id")
    p.add_argument("--destination-name", help="CloudStack network name (default: looked up)")
    p.add_argument("--test", action="store_true", help="the mapping for test failovers")
    p.add_argument("--type", choices=["live", "test", "both"], help="mapping type (default: from --test)")
    p.add_argument("--strategy", help="free text, e.g. production, isolated")
    p.add_argument("--vcenter", help="vCenter host, when the name exists in several")
    p = _command(actions, "list", _mappings_list, "list mappings")
    p.add_argument("--vm", help="VM name")
    _add_live_or_test(p, "both")
    p = _command(actions, "status", _mappings_status, "which source networks of a VM are mapped")
    p.add_argument("vm", metavar="VM", help="VM name or context id")
    p = _command(actions, "delete", _mappings_delete, "delete the mapping(s) of one source network")
    p.add_argument("vm", metavar="VM", help="VM name or context id")
    p.add_argument("source_network", metavar="SOURCE_NETWORK")
    _add_live_or_test(p, "live and test")


# --- machine groups -------------------------------------------------------------------------------
def _groups_create(s: Session, args: argparse.Namespace) -> None:
    request = _set_present(
        groups_pb.CreateGroupRequest(name=args.name, description=args.description or "",
                                     schedule_id=args.schedule or ""),
        max_concurrent_vms=args.max_concurrent, priority=args.priority,
    )
    response = s.call(s.client.groups.CreateGroup, request)
    s.show(response, lambda r: f"created group {r.group.name} ({r.group.id})")


def _groups_list(s: Session, args: argparse.Namespace) -> None:
    groups = list(s.client.pages(s.client.groups.ListGroups, groups_pb.ListGroupsRequest(), "groups"))
    s.show(groups_pb.ListGroupsResponse(groups=groups, total_count=len(groups)),
           lambda r: output.table(r.groups, output.GROUP_COLUMNS, empty="no machine groups"))


def _groups_show(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.groups.GetGroup, groups_pb.GetGroupRequest(id=_group_id(s, args.group)))
    s.show(response, lambda r: output.group_details(r.group))


def _groups_assign(s: Session, args: argparse.Namespace) -> None:
    group_id = _group_id(s, args.group)
    for vm in args.vms:
        request = _set_present(
            groups_pb.AssignVMRequest(group_id=group_id, vm_context_id=_context_id(s, vm, args.vcenter)),
            priority=args.priority, enabled=args.enabled,
        )
        membership = s.call(s.client.groups.AssignVM, request).membership
        if not s.json:
            print(f"assigned {membership.vm_name} to {membership.group_name}")
    if s.json:
        print(output.to_json(s.call(s.client.groups.GetGroup, groups_pb.GetGroupRequest(id=group_id))))


def _groups_unassign(s: Session, args: argparse.Namespace) -> None:
    group_id = _group_id(s, args.group)
    for vm in args.vms:
        request = groups_pb.UnassignVMRequest(group_id=group_id, vm_context_id=_context_id(s, vm, args.vcenter))
        s.call(s.client.groups.UnassignVM, request)
        if not s.json:
            print(f"removed {vm} from {args.group}")
    if s.json:
        print(output.to_json(s.call(s.client.groups.GetGroup, groups_pb.GetGroupRequest(id=group_id))))


def _groups_delete(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.groups.DeleteGroup, groups_pb.DeleteGroupRequest(id=_group_id(s, args.group)))
    s.show(response, lambda r: f"deleted group {args.group}")


def _register_groups(commands: Any) -> None:
    actions = _family(commands, "groups", "machine groups (VMs replicated on one schedule)")
    p = _command(actions, "create", _groups_create, "create a group")
    p.add_argument("name")
    p.add_argument("--description")
    p.add_argument("--schedule", help="schedule id")
    p.add_argument("--max-concurrent", type=int, help="concurrent scheduled jobs, 1-100 (default 5)")
    p.add_argument("--priority", type=int, help="0-100, lower runs first (default 0)")
    _command(actions, "list", _groups_list, "list groups")
    p = _command(actions, "show", _groups_show, "show a group with its members")
    p.add_argument("group", metavar="GROUP", help="group name or id")
    p = _command(actions, "assign", _groups_assign, "add VMs to a group (a VM is in at most one group)")
    p.add_argument("group", metavar="GROUP", help="group name or id")
    p.add_argument("vms", nargs="+", metavar="VM", help="VM name")
    p.add_argument("--priority", type=int, help="lower runs first (default 0)")
    p.add_argument("--enabled", action=argparse.BooleanOptionalAction, help="(default: enabled)")
    p.add_argument("--vcenter", help="vCenter host, when a name exists in several")
    p = _command(actions, "unassign", _groups_unassign, "remove VMs from a group")
    p.add_argument("group", metavar="GROUP", help="group name or id")
    p.add_argument("vms", nargs="+", metavar="VM", help="VM name")
    p.add_argument("--vcenter", help="vCenter host, when a name exists in several")
    p = _command(actions, "delete", _groups_delete, "delete an empty group")
    p.add_argument("group", metavar="GROUP", help="group name or id")


# --- parser ---------------------------------------------------------------------------------------
def _limited(s: Session, method: Callable, request: Message, field: str, limit: int) -> list[Any]:
    """The first ``limit`` items of a paged list (all of them for 0)."""
    items = s.client.pages(method, request, field, page_size=min(limit, 200) if limit else 200)
    return list(islice(items, limit or None))


def _add_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=LIST_LIMIT, help=f"at most this many (default {LIST_LIMIT}, 0 = all)")


def _positive_seconds(value: str) -> float:
    seconds = float(value)
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return seconds


def _global_options() -> argparse.ArgumentParser:
    # SUPPRESS keeps a value given before the command from being reset by the command's own parser.
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--target", default=argparse.SUPPRESS, metavar="HOST:PORT",
                   help=f"OMA server (default: $OMA_TARGET, the saved login, {DEFAULT_TARGET})")
    p.add_argument("--token", default=argparse.SUPPRESS, help="bearer token (default: $OMA_TOKEN, the saved login)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts")
    p.add_argument("--timeout", type=_positive_seconds, default=argparse.SUPPRESS, metavar="SECONDS",
                   help=f"deadline of each call (default {DEFAULT_TIMEOUT_S:g}; {SLOW_TIMEOUT_S:g} for "
                        f"vCenter and CloudStack look-ups)")
    return p


_GLOBAL_OPTIONS = _global_options()


def _family(commands: Any, name: str, help_text: str) -> Any:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(dest=f"{name}_action", required=True, metavar="ACTION")


def _command(commands: Any, name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text, parents=[_GLOBAL_OPTIONS])
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omactl", parents=[_GLOBAL_OPTIONS],
        description="Operate the OMA migration server: VMs, credentials, CloudStack, replication, jobs.",
        epilog="exit codes: 0 ok, 1 the command reports a failure (e.g. the job failed), 2 usage error, "
               "100+N the RPC failed with gRPC status N (105 NOT_FOUND, 112 UNIMPLEMENTED, "
               "116 UNAUTHENTICATED), 130 interrupted",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (_register_session, _register_credentials, _register_cloudstack, _register_discovery,
                     _register_vms, _register_replication, _register_jobs, _register_mappings, _register_groups):
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2), already printed by argparse
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    session = Session(args)
    try:
        return args.handler(session, args) or EXIT_OK
    except grpc.RpcError as err:
        return _report(session, err.code(), err.details() or "", hint=args.handler is not _login)
    except CliError as err:
        return _report(session, err.code, err.details)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        session.close()


def _report(session: Session, code: grpc.StatusCode, details: str, *, hint: bool = True) -> int:
    print(f"error: {code.name}: {details}", file=sys.stderr)
    if hint and code in _HINTS:
        print(f"hint: {_HINTS[code].format(target=session.target)}", file=sys.stderr)
    return exit_code_for(code)


if __name__ == "__main__":
    sys.exit(main())
