"""omactl: the operator's command line for the OMA migration server.

A thin shell over :class:`omaclient.client.OmaClient`: every command is one RPC (a few when a VM or
group name has to be resolved to its id first), printed by :mod:`omaclient.output` as aligned text,
or with ``--json`` as the response message itself, so scripts read exactly what the API returns.

Connection: ``--target`` (else ``$OMA_TARGET``, else the target saved by ``omactl login``, else
127.0.0.1:9090) and ``--token`` (else ``$OMA_TOKEN``, else the token ``login`` saved for that same
target). ``login`` writes ``$OMACTL_CONFIG`` (default ~/.config/omactl/config.json) with mode 0600.
``--tls-ca FILE`` (else ``$OMA_TLS_CA``, else the one saved by ``login`` for that target) speaks TLS to
the OMA's TLS listener, trusting that PEM root: for the OMA's generated self-signed certificate, the
certificate itself (``<data_dir>/oma-tls.crt``); ``--tls-server-name`` when the target's host is not
a name in the certificate.
The global options are accepted before or after the command.

Users: ``login`` saves a token; ``logout`` ends it on the server and forgets it; ``passwd`` changes your own
password (every earlier token ends, the saved login gets the fresh one); ``users`` (admin only) creates, lists,
disables, enables and deletes users and ends all of a user's tokens.

Secrets (vCenter passwords, CloudStack secret keys, passwords) are never flag values, which would show in
``ps`` and in shell history: ``--password-stdin`` reads one line from stdin, ``--password-env VAR``
reads an environment variable, otherwise omactl prompts without echo.

Output: text for people; ``--json`` prints one JSON document per command on stdout (proto field
names, every field present). ``replicate`` and ``watch`` follow a job and print one JSON document
per progress update instead (JSON Lines; ``replicate`` starts with the CreateReplication response);
so do the ``failover`` commands that start a job (unless ``--no-wait``: the start response first, then
one WatchFailoverJobResponse per change) and ``failover watch``. Live progress goes to stderr (bars or
steps redrawn on a terminal, plain lines otherwise), the final line to stdout. Errors go to stderr as
``error: <gRPC status name>: <details>``.

Confirmation: ``failover live`` powers off the source VM and ``failover rollback --type live`` destroys
the CloudStack VM that took over; both ask on the terminal, or take ``--yes``. Without a terminal and
without ``--yes`` they stop with a usage error before any call.

Exit codes (gRPC status N is offset by 100 because 1 and 2, CANCELLED and UNKNOWN, would collide
with the generic failure and argparse's usage error; so ``exit - 100`` is the status for all >= 100):

    0      success (replicate/watch/failover: the followed job completed; readiness: the VM is ready)
    1      the command ran but reports a failure: the followed job failed or was cancelled, a
           connection test failed, a VM could not be added, a VM is not ready for failover, a
           confirmation was answered no
    2      usage error: bad options or arguments, a secret that cannot be read, a live failover or
           live rollback without --yes and no terminal to confirm on
    100+N  an RPC failed with gRPC status N: 103 INVALID_ARGUMENT, 105 NOT_FOUND, 106 ALREADY_EXISTS,
           107 PERMISSION_DENIED (an operator managing users or enrollments), 108 RESOURCE_EXHAUSTED
           (too many failed logins: the message says when to try again), 109 FAILED_PRECONDITION,
           112 UNIMPLEMENTED, 114 UNAVAILABLE, 116 UNAUTHENTICATED, ...
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
from oma.v1 import auth_pb2 as auth_pb
from oma.v1 import cloudstack_settings_pb2 as cloudstack_pb
from oma.v1 import discovery_pb2 as discovery_pb
from oma.v1 import enrollment_admin_pb2 as enrollment_pb
from oma.v1 import failover_pb2 as failover_pb
from oma.v1 import job_log_pb2 as jobs_pb
from oma.v1 import machine_groups_pb2 as groups_pb
from oma.v1 import network_mappings_pb2 as mappings_pb
from oma.v1 import ossea_config_pb2 as ossea_pb
from oma.v1 import replications_pb2 as replications_pb
from oma.v1 import schedules_pb2 as schedules_pb
from oma.v1 import users_pb2 as users_pb
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
    grpc.StatusCode.PERMISSION_DENIED: "ask an admin: users and VMA enrollment need the admin role",
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
        same_target = saved.get("target") == self.target
        self.tls_ca: str = (getattr(args, "tls_ca", None) or os.environ.get("OMA_TLS_CA")
                            or (saved.get("tls_ca") if same_target else None) or "")
        self.tls_server_name: str = (getattr(args, "tls_server_name", None)
                                     or (saved.get("tls_server_name") if same_target else None) or "")
        self._client: OmaClient | None = None

    @property
    def client(self) -> OmaClient:
        if self._client is None:
            try:
                self._client = OmaClient(self.target, token=self.token, timeout=self.timeout,
                                         tls_ca=self.tls_ca or None, tls_server_name=self.tls_server_name or None)
            except ValueError as err:  # an unreadable CA file: the operator's to fix, before any call
                raise UsageError(str(err)) from None
        return self._client

    def call(self, method: Callable, request: Message, *, slow: bool = False) -> Any:
        """One unary RPC with the command's deadline."""
        return method(request, timeout=self.slow_timeout if slow else self.timeout)

    def show(self, message: Message, render: Callable[[Any], str]) -> None:
        if self.json:
            print(output.to_json(message))
        else:
            say(render(message))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def say(text: str, **print_options: Any) -> None:
    """Print text for a person: control and invisible characters in it (from names, messages, any
    value the server returned) are shown escaped, never sent to the terminal raw."""
    print(output.printable(text, keep_newlines=True), **print_options)


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
def _vm(s: Session, vm_name: str, vcenter: str | None) -> Any:
    """The VMContext of a managed VM given by name (NOT_FOUND when there is none)."""
    request = contexts_pb.GetVMContextByNameRequest(vm_name=vm_name, vcenter_host=vcenter or "")
    return s.call(s.client.contexts.GetVMContextByName, request).details.context


def _context_id(s: Session, vm_name: str, vcenter: str | None) -> str:
    return _vm(s, vm_name, vcenter).context_id


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
    saved = {"target": s.target, "token": response.token, "username": response.username,
             "expires_at": output.when(response.expires_at)}
    if s.tls_ca:  # kept as an absolute path, so later commands work from any directory
        saved["tls_ca"] = str(Path(s.tls_ca).expanduser().resolve())
    if s.tls_server_name:
        saved["tls_server_name"] = s.tls_server_name
    _write_private(path, saved)
    s.show(response, lambda r: f"logged in to {s.target} as {r.username} until {output.when(r.expires_at)}; "
                               f"token saved in {path}")


def _logout(s: Session, args: argparse.Namespace) -> int:
    settings = saved_settings()
    if not settings.get("token"):
        say("not logged in")
        return EXIT_OK
    target = settings.get("target") or s.target
    failure: grpc.RpcError | None = None
    try:  # end the token on the server first: a copy of it elsewhere must stop working too
        s.token = settings["token"]
        s.target = target
        s.call(s.client.auth.Logout, auth_pb.LogoutRequest())
    except grpc.RpcError as err:
        failure = err
    _write_private(config_path(), {key: settings[key] for key in ("target", "tls_ca", "tls_server_name")
                                   if key in settings} or {"target": s.target})
    if failure is None or failure.code() == grpc.StatusCode.UNAUTHENTICATED:  # ended, expired or revoked already
        say(f"logged out of {target}: the server ended the token; removed the saved token")
        return EXIT_OK
    say(f"removed the saved token for {target}, but the server could not end it "
          f"({failure.code().name}: {failure.details()}); it stays valid until "
          f"{settings.get('expires_at', 'it expires')}", file=sys.stderr)
    return exit_code_for(failure.code())


def _passwd(s: Session, args: argparse.Namespace) -> None:
    current = read_secret(args, "current_password", f"Current password on {s.target}: ")
    new = read_secret(args, "new_password", "New password: ")
    if not (args.new_password_stdin or args.new_password_env):
        if getpass.getpass("New password again: ") != new:
            raise UsageError("the two new passwords differ")
    response = s.call(s.client.auth.ChangePassword,
                      auth_pb.ChangePasswordRequest(current_password=current or "", new_password=new or ""))
    saved = saved_settings()
    kept = saved.get("target") == s.target and saved.get("token")
    if kept:  # every earlier token has ended: keep the session going with the fresh one
        _write_private(config_path(), {**saved, "token": response.login.token, "username": response.login.username,
                                       "expires_at": output.when(response.login.expires_at)})
    s.show(response, lambda r: f"changed the password of {r.login.username}; every earlier token has ended"
                               + ("; the saved login uses the new token" if kept else ""))


def _register_session(commands: Any) -> None:
    p = _command(commands, "login", _login, "log in and save the target and token for later commands")
    p.add_argument("--username", default="admin")
    add_secret_options(p, "password", "password")
    _command(commands, "logout", _logout, "end the saved token on the server and forget it")
    p = _command(commands, "passwd", _passwd,
                 "change your own password (ends all your tokens; the saved login gets a fresh one)")
    add_secret_options(p, "current-password", "current password (with --new-password-stdin: the first line)")
    add_secret_options(p, "new-password", "new password (with --current-password-stdin: the second line)")


# --- users ----------------------------------------------------------------------------------------
def _users_list(s: Session, args: argparse.Namespace) -> None:
    found = list(s.client.pages(s.client.users.ListUsers, users_pb.ListUsersRequest(), "users"))
    s.show(users_pb.ListUsersResponse(users=found, count=len(found)),
           lambda r: output.table(r.users, output.USER_COLUMNS, empty="no users"))


def _users_create(s: Session, args: argparse.Namespace) -> None:
    password = read_secret(args, "password", f"Password for the new user {args.username}: ")
    request = users_pb.CreateUserRequest(username=args.username, password=password or "", role=args.role)
    response = s.call(s.client.users.CreateUser, request)
    s.show(response, lambda r: f"created user {r.user.username} ({r.user.role})")


def _users_set_disabled(disabled: bool) -> Callable[[Session, argparse.Namespace], None]:
    def handler(s: Session, args: argparse.Namespace) -> None:
        request = users_pb.SetUserDisabledRequest(username=args.username, disabled=disabled)
        response = s.call(s.client.users.SetUserDisabled, request)
        s.show(response, lambda r: f"disabled user {r.user.username}; its tokens have ended" if disabled
               else f"enabled user {r.user.username}; it can log in again")

    return handler


def _users_delete(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.users.DeleteUser, users_pb.DeleteUserRequest(username=args.username))
    s.show(response, lambda r: f"deleted user {r.username}; its tokens have ended")


def _users_revoke_tokens(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.auth.RevokeUserTokens, auth_pb.RevokeUserTokensRequest(username=args.username))
    s.show(response, lambda r: f"ended every token of {r.username} issued before "
                               f"{output.when(r.tokens_valid_after)}")


def _register_users(commands: Any) -> None:
    actions = _family(commands, "users", "users of the OMA API and their roles (admin only)")
    _command(actions, "list", _users_list, "list users")
    p = _command(actions, "create", _users_create, "create a user")
    p.add_argument("username")
    p.add_argument("--role", choices=["operator", "admin"], default="operator",
                   help="operator: everything but users and VMA enrollment (default); admin: everything")
    add_secret_options(p, "password", "password of the new user")
    for name, disabled, help_text in (("disable", True, "disable a user and end its tokens"),
                                      ("enable", False, "let a disabled user log in again")):
        p = _command(actions, name, _users_set_disabled(disabled), help_text)
        p.add_argument("username")
    p = _command(actions, "delete", _users_delete, "delete a user and end its tokens")
    p.add_argument("username")
    p = _command(actions, "revoke-tokens", _users_revoke_tokens, "end every token of a user (it may log in again)")
    p.add_argument("username")


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
    retarget = "; changing it needs the password again (--password-stdin, -env or -prompt)"
    p.add_argument("--vcenter", help="vCenter host[:port]" + retarget)
    p.add_argument("--username")
    p.add_argument("--datacenter")
    p.add_argument("--thumbprint", help="SHA-1/SHA-256 certificate fingerprint" + retarget)
    p.add_argument("--insecure", action=argparse.BooleanOptionalAction, help="skip certificate checks" + retarget)
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
        say(f"started {response.replication_type or 'a'} replication of {args.vm}: job {response.job_id}")
    if args.no_follow:
        if not s.json:
            say(f"follow it with: omactl watch {response.job_id}")
        return EXIT_OK
    return _follow(s, response.job_id)


def _watch(s: Session, args: argparse.Namespace) -> int:
    return _follow(s, args.job)


def _display(s: Session, terminal: Callable[[Any], Any], plain: Callable[[Any], Any]) -> progress.Display:
    """JSON Lines on stdout with --json; otherwise redrawn on a terminal, or plain lines, on stderr."""
    if s.json:
        return progress.JsonLinesDisplay(sys.stdout)
    return terminal(sys.stderr) if sys.stderr.isatty() else plain(sys.stderr)


def _stopped_watching(job_id: str, resume: str) -> int:
    say(f"\nstopped watching; job {job_id} keeps running. Resume with: {resume}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _follow(s: Session, job_id: str) -> int:
    display = _display(s, progress.TerminalDisplay, progress.PlainDisplay)
    try:
        final = progress.follow(s.client, job_id, display)
    except KeyboardInterrupt:
        return _stopped_watching(job_id, f"omactl watch {job_id}")
    if not s.json:
        if final.status == "completed":
            say(f"job {job_id} completed: {output.size(final.bytes_transferred)} in "
                  f"{output.elapsed(final.started_at, final.completed_at)}")
        else:
            say(f"job {job_id} {final.status}: {final.error_message or 'no error message'}")
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
                                     schedule_id=_schedule_id(s, args.schedule) if args.schedule else ""),
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
            say(f"assigned {membership.vm_name} to {membership.group_name}")
    if s.json:
        print(output.to_json(s.call(s.client.groups.GetGroup, groups_pb.GetGroupRequest(id=group_id))))


def _groups_unassign(s: Session, args: argparse.Namespace) -> None:
    group_id = _group_id(s, args.group)
    for vm in args.vms:
        request = groups_pb.UnassignVMRequest(group_id=group_id, vm_context_id=_context_id(s, vm, args.vcenter))
        s.call(s.client.groups.UnassignVM, request)
        if not s.json:
            say(f"removed {vm} from {args.group}")
    if s.json:
        print(output.to_json(s.call(s.client.groups.GetGroup, groups_pb.GetGroupRequest(id=group_id))))


def _groups_update(s: Session, args: argparse.Namespace) -> None:
    if args.schedule and args.no_schedule:
        raise UsageError("give --schedule or --no-schedule, not both")
    schedule = "" if args.no_schedule else (_schedule_id(s, args.schedule) if args.schedule else None)
    request = _set_present(groups_pb.UpdateGroupRequest(id=_group_id(s, args.group)), name=args.name,
                           description=args.description, schedule_id=schedule,
                           max_concurrent_vms=args.max_concurrent, priority=args.priority)
    response = s.call(s.client.groups.UpdateGroup, request)

    def render(r: Any) -> str:
        g = r.group
        return f"updated group {g.name} ({g.id}); schedule: {g.schedule_name or g.schedule_id or 'none'}"

    s.show(response, render)


def _groups_delete(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.groups.DeleteGroup, groups_pb.DeleteGroupRequest(id=_group_id(s, args.group)))
    s.show(response, lambda r: f"deleted group {args.group}")


def _register_groups(commands: Any) -> None:
    actions = _family(commands, "groups", "machine groups (VMs replicated on one schedule)")
    p = _command(actions, "create", _groups_create, "create a group")
    p.add_argument("name")
    p.add_argument("--description")
    p.add_argument("--schedule", help="schedule name or id")
    p.add_argument("--max-concurrent", type=int, help="concurrent scheduled jobs, 1-100 (default 5)")
    p.add_argument("--priority", type=int, help="0-100, lower runs first (default 0)")
    _command(actions, "list", _groups_list, "list groups")
    p = _command(actions, "update", _groups_update,
                 "change a group (only the given fields); --schedule attaches it to a schedule")
    p.add_argument("group", metavar="GROUP", help="group name or id")
    p.add_argument("--name", help="new name")
    p.add_argument("--description")
    p.add_argument("--schedule", metavar="SCHEDULE", help="schedule name or id: its VMs replicate on that schedule")
    p.add_argument("--no-schedule", action="store_true", help="detach the group from its schedule")
    p.add_argument("--max-concurrent", type=int, help="concurrent scheduled jobs, 1-100")
    p.add_argument("--priority", type=int, help="0-100, lower runs first")
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


# --- failover -------------------------------------------------------------------------------------
def _confirm(args: argparse.Namespace, question: str, refusal: str) -> bool:
    """``--yes``, or y/yes typed at a terminal. Without a terminal to ask on, a UsageError (exit 2)."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise UsageError(f"{refusal}: confirm with --yes (there is no terminal to ask on)")
    say(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() in ("y", "yes"):
        return True
    say("not confirmed; nothing was started", file=sys.stderr)
    return False


def _network_overrides(values: list[str] | None) -> dict[str, str]:
    mappings = {}
    for value in values or []:
        source, separator, destination = value.rpartition("=")
        if not separator or not source or not destination:
            raise UsageError(f"--network takes SOURCE_NETWORK=DESTINATION_NETWORK_ID (got {value!r})")
        mappings[source] = destination
    return mappings


def _started(s: Session, args: argparse.Namespace, response: Any, text: str) -> int:
    """Print what a start RPC answered, then follow the job unless --no-wait."""
    if s.json:
        print(output.to_json(response, compact=args.wait))
    else:
        say(text + (" (already started by an earlier request)" if getattr(response, "existing", False) else ""))
    if not args.wait:
        if not s.json:
            say(f"follow it with: omactl failover watch {response.job_id}")
        return EXIT_OK
    return _follow_failover(s, response.job_id)


def _follow_failover(s: Session, job_id: str) -> int:
    display = _display(s, progress.FailoverTerminalDisplay, progress.FailoverPlainDisplay)
    try:
        final = progress.follow_failover(s.client, job_id, display)
    except KeyboardInterrupt:
        return _stopped_watching(job_id, f"omactl failover watch {job_id}")
    job = final.job
    if not s.json:
        say(_outcome(final))
    return EXIT_OK if job.status == "completed" else EXIT_FAILED


def _outcome(final: Any) -> str:
    """The last line of a followed job: how it ended and what it left behind."""
    job = final.job
    record = final.failover_job if final.HasField("failover_job") else None
    what = f"{job.operation or job.job_type} of {output.failover_vm_name(job, record) or job.context_id}"
    if job.status != "completed":
        failed = next((step for step in job.steps if step.status == "failed"), None)
        where = f" at step '{failed.display_name or failed.name}'" if failed else ""
        return f"{what}: job {job.job_id} {job.status}{where}: {job.error_message or 'no error message'}"
    line = f"{what}: job {job.job_id} completed in {output.elapsed(job.started_at, job.completed_at)}"
    if record is not None and record.job_id == job.job_id and record.destination_vm_id:
        line += f"; destination VM {output.destination_vm(record)}"
    return line


def _failover_test(s: Session, args: argparse.Namespace) -> int:
    vm = _vm(s, args.vm, args.vcenter)
    request = _set_present(
        failover_pb.StartTestFailoverRequest(
            context_id=vm.context_id, vmware_vm_id=vm.vmware_vm_id, vm_name=vm.vm_name,
            test_duration=args.duration or "", network_mappings=_network_overrides(args.network),
            request_id=str(uuid.uuid4())),
        skip_validation=args.skip_validation or None, skip_virtio=args.skip_virtio or None,
        auto_cleanup=args.auto_cleanup or None,
    )
    response = s.call(s.client.failover.StartTestFailover, request)
    return _started(s, args, response, _start_text("test failover", vm.vm_name, response))


def _start_text(what: str, vm_name: str, response: Any) -> str:
    config = response.configuration
    networks = ", ".join(f"{source} -> {target}" for source, target in sorted(config.network_mappings.items()))
    text = f"started {what} of {vm_name}: job {response.job_id}"
    details = [f"destination VM {config.destination_name}" if config.destination_name else "",
               f"networks {networks}" if networks else "",
               f"ends automatically after {config.test_duration}" if config.auto_cleanup else ""]
    details = [d for d in details if d]
    return text + (f" ({'; '.join(details)})" if details else "")


def _failover_live(s: Session, args: argparse.Namespace) -> int:
    power_off = "" if args.power_off_source is False else "powers off the source VM and "
    if not _confirm(args, f"Live failover of {args.vm} {power_off}moves it to CloudStack for good. Continue?",
                    f"a live failover {power_off}moves {args.vm} to CloudStack"):
        return EXIT_FAILED
    vm = _vm(s, args.vm, args.vcenter)
    request = _set_present(
        failover_pb.StartLiveFailoverRequest(
            context_id=vm.context_id, vmware_vm_id=vm.vmware_vm_id, vm_name=vm.vm_name,
            network_mappings=_network_overrides(args.network), request_id=str(uuid.uuid4())),
        skip_validation=args.skip_validation or None, skip_virtio=args.skip_virtio or None,
        power_off_source=args.power_off_source, perform_final_sync=args.final_sync,
    )
    response = s.call(s.client.failover.StartLiveFailover, request)
    return _started(s, args, response, _start_text("live failover", vm.vm_name, response))


def _failover_end(s: Session, args: argparse.Namespace) -> int:
    """By VM name (the VM's newest test failover), else by failover job id or external job id."""
    try:
        vm: Any = _vm(s, args.target_ref, args.vcenter)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        vm = None
    if vm is not None:
        request: Message = failover_pb.CleanupTestFailoverRequest(context_id=vm.context_id,
                                                                  request_id=str(uuid.uuid4()))
        response = s.call(s.client.failover.CleanupTestFailover, request)
    else:
        request = failover_pb.EndTestFailoverRequest(job_id=args.target_ref, request_id=str(uuid.uuid4()))
        try:
            response = s.call(s.client.failover.EndTestFailover, request)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            raise CliError(grpc.StatusCode.NOT_FOUND,
                           f"no managed VM and no failover job named {args.target_ref!r}") from None
    return _started(s, args, response, f"ending the test failover {response.failover_job_id} of "
                                       f"{response.vm_name}: cleanup job {response.job_id}")


def _failover_rollback(s: Session, args: argparse.Namespace) -> int:
    if args.type == "live" and not _confirm(
            args, f"Rolling back the live failover of {args.vm} destroys its CloudStack VM and discards the writes "
                  f"made there. Continue?",
            f"rolling back a live failover destroys the CloudStack VM of {args.vm}"):
        return EXIT_FAILED
    vm = _vm(s, args.vm, args.vcenter)
    request = _set_present(
        failover_pb.StartRollbackRequest(
            context_id=vm.context_id, vm_name=vm.vm_name, vmware_vm_id=vm.vmware_vm_id, failover_type=args.type,
            failover_job_id=args.job or "", request_id=str(uuid.uuid4())),
        power_on_source=args.power_on_source, force_cleanup=args.force or None,
    )
    response = s.call(s.client.failover.StartRollback, request)
    power = "; the source VM is powered on afterwards" if response.power_on_source else ""
    return _started(s, args, response, f"rolling back {args.type} failover {response.failover_job_id} of "
                                       f"{vm.vm_name}: job {response.job_id}{power}")


def _failover_cleanup_failed(s: Session, args: argparse.Namespace) -> int:
    vm = _vm(s, args.vm, args.vcenter)
    request = failover_pb.CleanupFailedExecutionRequest(context_id=vm.context_id, request_id=str(uuid.uuid4()))
    response = s.call(s.client.failover.CleanupFailedExecution, request)
    of = f" of failover {response.failover_job_id}" if response.failover_job_id else ""
    return _started(s, args, response, f"cleaning up the failed execution{of} of {vm.vm_name}: job {response.job_id}")


def _failover_status(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.failover.GetFailoverStatus, failover_pb.GetFailoverStatusRequest(job_id=args.job))
    s.show(response, output.failover_status)


def _failover_list(s: Session, args: argparse.Namespace) -> None:
    request = failover_pb.ListFailoverJobsRequest(
        context_id=_vm(s, args.vm, args.vcenter).context_id if args.vm else "", failover_type=args.type or "",
        status=args.status or "",
    )
    jobs = _limited(s, s.client.failover.ListFailoverJobs, request, "failover_jobs", args.limit)
    s.show(failover_pb.ListFailoverJobsResponse(failover_jobs=jobs, total_count=len(jobs)),
           lambda r: output.table(r.failover_jobs, output.FAILOVER_JOB_COLUMNS, empty="no failover jobs"))


def _failover_watch(s: Session, args: argparse.Namespace) -> int:
    return _follow_failover(s, args.job)


def _readiness(s: Session, args: argparse.Namespace) -> int:
    request = failover_pb.GetFailoverReadinessRequest(vm_id=_vm(s, args.vm, args.vcenter).context_id,
                                                      failover_type=args.type)
    response = s.call(s.client.failover.GetFailoverReadiness, request, slow=True)
    s.show(response, output.readiness)
    return EXIT_OK if response.is_valid else EXIT_FAILED


def _add_wait(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="follow the job's steps until it ends (default; Ctrl-C stops watching, not the job)")


def _add_failover_vm(p: argparse.ArgumentParser) -> None:
    p.add_argument("vm", metavar="VM", help="VM name")
    p.add_argument("--vcenter", help="vCenter host, when the name exists in several")


def _register_failover(commands: Any) -> None:
    actions = _family(commands, "failover", "test and live failover to CloudStack, ending tests, rollback")
    p = _command(actions, "test", _failover_test,
                 "start a test failover: a copy of the VM boots in CloudStack on the test networks, the source "
                 "keeps running")
    _add_failover_vm(p)
    p.add_argument("--duration", metavar="DURATION", help="how long the test lasts, e.g. 30m, 4h (default 2h)")
    p.add_argument("--auto-cleanup", action="store_true", help="end the test automatically after --duration")
    p.add_argument("--network", action="append", metavar="SOURCE=NETWORK_ID",
                   help="repeatable: use this CloudStack network for a source network (default: the test mappings)")
    p.add_argument("--skip-validation", action="store_true", help="skip the readiness checks")
    p.add_argument("--skip-virtio", action="store_true", help="skip VirtIO driver injection (Windows guests)")
    _add_wait(p)
    p = _command(actions, "live", _failover_live,
                 "start a live failover: power off the source, copy the last changes, boot the VM in CloudStack "
                 "(asks for confirmation; --yes to skip it)")
    _add_failover_vm(p)
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--power-off-source", action=argparse.BooleanOptionalAction, help="(default: power it off)")
    p.add_argument("--final-sync", action=argparse.BooleanOptionalAction,
                   help="copy the changes made since the last replication first (default: yes)")
    p.add_argument("--network", action="append", metavar="SOURCE=NETWORK_ID",
                   help="repeatable: use this CloudStack network for a source network (default: the live mappings)")
    p.add_argument("--skip-validation", action="store_true", help="skip the readiness checks")
    p.add_argument("--skip-virtio", action="store_true", help="skip VirtIO driver injection (Windows guests)")
    _add_wait(p)
    p = _command(actions, "end", _failover_end,
                 "end a test failover: destroy the test VM and give the replica volumes back to the OMA")
    p.add_argument("target_ref", metavar="VM-OR-JOB", help="VM name (its newest test failover) or failover job id")
    p.add_argument("--vcenter", help="vCenter host, when the name exists in several")
    _add_wait(p)
    p = _command(actions, "rollback", _failover_rollback,
                 "roll back a test or live failover (a live one asks for confirmation; --yes to skip it)")
    _add_failover_vm(p)
    p.add_argument("--type", required=True, choices=["test", "live"], help="the kind of failover to roll back")
    p.add_argument("--job", help="the failover job to roll back (default: the VM's newest of that type)")
    p.add_argument("--power-on-source", action=argparse.BooleanOptionalAction,
                   help="power the source VM on afterwards (default: yes for live, no for test)")
    p.add_argument("--force", action="store_true", help="go on with the remaining steps when a step fails")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    _add_wait(p)
    p = _command(actions, "cleanup-failed", _failover_cleanup_failed,
                 "recover a VM left half-way by a failed failover (destination VM removed, volumes back on the OMA)")
    _add_failover_vm(p)
    _add_wait(p)
    p = _command(actions, "status", _failover_status, "show a failover, cleanup or rollback job with its steps")
    p.add_argument("job", metavar="JOB", help="job id, external job id or failover job id")
    p = _command(actions, "list", _failover_list, "list failover jobs, newest first")
    p.add_argument("--vm", help="VM name")
    p.add_argument("--vcenter", help="vCenter host, when the name exists in several")
    p.add_argument("--type", choices=["test", "live"])
    p.add_argument("--status", help="e.g. completed, failed, cleanup, creating_vm")
    _add_limit(p)
    p = _command(actions, "watch", _failover_watch,
                 "follow a failover, cleanup or rollback job until it ends (exit 1 if it fails)")
    p.add_argument("job", metavar="JOB", help="job id, external job id or failover job id")
    p = _command(commands, "readiness", _readiness,
                 "check whether a VM can be failed over now (exit 1 when it cannot)")
    _add_failover_vm(p)
    p.add_argument("--type", choices=["live", "test"], default="live", help="(default: live)")


# --- schedules ------------------------------------------------------------------------------------
def _schedule_id(s: Session, ref: str) -> str:
    for schedule in s.client.pages(s.client.schedules.ListSchedules, schedules_pb.ListSchedulesRequest(), "schedules"):
        if ref in (schedule.id, schedule.name):
            return schedule.id
    raise CliError(grpc.StatusCode.NOT_FOUND, f"no schedule named {ref!r}")


def _schedule_values(s: Session, args: argparse.Namespace) -> dict[str, Any]:
    """The fields create and update share, None where the option was not given."""
    return {
        "description": args.description, "cron_expression": args.cron, "timezone": args.timezone,
        "replication_type": args.type, "max_concurrent_jobs": args.max_concurrent,
        "retry_attempts": args.retries, "retry_delay_minutes": args.retry_delay,
        "skip_if_running": args.skip_if_running, "chain_delay_minutes": args.chain_delay,
        "chain_parent_schedule_id": _schedule_id(s, args.after) if args.after else None,
        "schedule_type": "chain" if args.after else None,
    }


def _schedules_create(s: Session, args: argparse.Namespace) -> None:
    if not args.cron and not args.after:
        raise UsageError("a schedule needs --cron EXPRESSION, or --after SCHEDULE for a chained one")
    request = _set_present(schedules_pb.CreateScheduleRequest(name=args.name), **_schedule_values(s, args),
                           enabled=False if args.disabled else None)
    response = s.call(s.client.schedules.CreateSchedule, request)

    def render(r: Any) -> str:
        nxt = f", next run {output.when(r.schedule.next_execution)}" if r.schedule.HasField("next_execution") else ""
        return f"created schedule {r.schedule.name} ({r.schedule.id}){nxt}"

    s.show(response, render)


def _schedules_list(s: Session, args: argparse.Namespace) -> None:
    request = schedules_pb.ListSchedulesRequest(enabled_only=args.enabled)
    schedules = list(s.client.pages(s.client.schedules.ListSchedules, request, "schedules"))
    enabled = sum(1 for x in schedules if x.enabled)
    s.show(schedules_pb.ListSchedulesResponse(schedules=schedules, total_count=len(schedules), enabled_count=enabled,
                                              disabled_count=len(schedules) - enabled),
           lambda r: output.table(r.schedules, output.SCHEDULE_COLUMNS, empty="no schedules"))


def _schedules_show(s: Session, args: argparse.Namespace) -> None:
    request = schedules_pb.GetScheduleRequest(id=_schedule_id(s, args.schedule))
    s.show(s.call(s.client.schedules.GetSchedule, request), lambda r: output.schedule_details(r.schedule))


def _schedules_update(s: Session, args: argparse.Namespace) -> None:
    request = _set_present(schedules_pb.UpdateScheduleRequest(id=_schedule_id(s, args.schedule)), name=args.name,
                           **_schedule_values(s, args))
    response = s.call(s.client.schedules.UpdateSchedule, request)
    s.show(response, lambda r: f"updated schedule {r.schedule.name} ({r.schedule.id})")


def _schedules_delete(s: Session, args: argparse.Namespace) -> None:
    schedule_id = _schedule_id(s, args.schedule)
    response = s.call(s.client.schedules.DeleteSchedule, schedules_pb.DeleteScheduleRequest(id=schedule_id))
    s.show(response, lambda r: f"deleted schedule {args.schedule}")


def _schedules_enable(s: Session, args: argparse.Namespace) -> None:
    enabled = args.schedules_action == "enable"
    request = schedules_pb.SetScheduleEnabledRequest(id=_schedule_id(s, args.schedule), enabled=enabled)
    response = s.call(s.client.schedules.SetScheduleEnabled, request)

    def render(r: Any) -> str:
        nxt = f"; next run {output.when(r.schedule.next_execution)}" if r.schedule.HasField("next_execution") else ""
        return f"schedule {r.schedule.name} is {'enabled' if r.schedule.enabled else 'disabled'}{nxt}"

    s.show(response, render)


def _schedules_trigger(s: Session, args: argparse.Namespace) -> None:
    request = schedules_pb.TriggerScheduleRequest(id=_schedule_id(s, args.schedule), reason=args.reason or "")
    response = s.call(s.client.schedules.TriggerSchedule, request)
    s.show(response, lambda r: f"triggered schedule {r.schedule_name}: execution {r.execution_id} is {r.status} "
                               f"(job {r.job_id}); see: omactl schedules executions {r.schedule_name}")


def _schedules_executions(s: Session, args: argparse.Namespace) -> None:
    request = schedules_pb.ListScheduleExecutionsRequest(schedule_id=_schedule_id(s, args.schedule),
                                                         status=args.status or "")
    executions = _limited(s, s.client.schedules.ListScheduleExecutions, request, "executions", args.limit)
    s.show(schedules_pb.ListScheduleExecutionsResponse(executions=executions, total_count=len(executions)),
           lambda r: output.table(r.executions, output.SCHEDULE_EXECUTION_COLUMNS, empty="no executions"))


def _schedules_status(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.schedules.GetSchedulerStatus, schedules_pb.GetSchedulerStatusRequest())
    s.show(response, output.scheduler_status)


def _add_schedule_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cron", metavar="EXPRESSION",
                   help="5 fields (minute hour day month weekday), or 6 with seconds first, e.g. '0 2 * * *'")
    p.add_argument("--timezone", help="IANA time zone the expression is read in (default UTC)")
    p.add_argument("--description")
    p.add_argument("--type", choices=["auto", "full", "incremental"], help="replication type (default auto)")
    p.add_argument("--max-concurrent", type=int, metavar="N", help="concurrent jobs, 1-100 (default 1)")
    p.add_argument("--retries", type=int, metavar="N", help="retry attempts of a failed job (default 3)")
    p.add_argument("--retry-delay", type=int, metavar="MINUTES", help="between retries (default 30)")
    p.add_argument("--skip-if-running", action=argparse.BooleanOptionalAction,
                   help="skip a firing while the previous one still runs (default: skip)")
    p.add_argument("--after", metavar="SCHEDULE", help="chain: run after each execution of this schedule")
    p.add_argument("--chain-delay", type=int, metavar="MINUTES", help="with --after: wait this long (default 0)")


def _register_schedules(commands: Any) -> None:
    actions = _family(commands, "schedules",
                      "replication schedules (attach a group with: omactl groups update GROUP --schedule SCHEDULE)")
    p = _command(actions, "create", _schedules_create, "create a schedule")
    p.add_argument("name")
    _add_schedule_options(p)
    p.add_argument("--disabled", action="store_true", help="create it disabled")
    p = _command(actions, "list", _schedules_list, "list schedules with their next run and groups")
    p.add_argument("--enabled", action="store_true", help="enabled ones only")
    p = _command(actions, "show", _schedules_show, "show a schedule")
    p.add_argument("schedule", metavar="SCHEDULE", help="schedule name or id")
    p = _command(actions, "update", _schedules_update, "change a schedule (only the given fields)")
    p.add_argument("schedule", metavar="SCHEDULE", help="schedule name or id")
    p.add_argument("--name", help="new name")
    _add_schedule_options(p)
    p = _command(actions, "delete", _schedules_delete, "delete a schedule no group uses (its executions go too)")
    p.add_argument("schedule", metavar="SCHEDULE", help="schedule name or id")
    for action, text in (("enable", "enable a schedule"), ("disable", "disable a schedule (it stops firing)")):
        p = _command(actions, action, _schedules_enable, text)
        p.add_argument("schedule", metavar="SCHEDULE", help="schedule name or id")
    p = _command(actions, "trigger", _schedules_trigger, "run a schedule now (replicates its groups' VMs)")
    p.add_argument("schedule", metavar="SCHEDULE", help="schedule name or id")
    p.add_argument("--reason", help="recorded with the execution")
    p = _command(actions, "executions", _schedules_executions, "list a schedule's executions, newest first")
    p.add_argument("schedule", metavar="SCHEDULE", help="schedule name or id")
    p.add_argument("--status", help="scheduled, running, completed, failed, skipped or cancelled")
    _add_limit(p)
    _command(actions, "status", _schedules_status, "the scheduler's state and registered schedules")


# --- VMA enrollment -------------------------------------------------------------------------------
def _enrollment_id(s: Session, ref: str, *, pending: bool) -> str:
    """An enrollment id, or the name of a VMA among the pending enrollments (or the connections)."""
    if pending:
        items = s.client.pages(s.client.enrollment_admin.ListPendingEnrollments,
                               enrollment_pb.ListPendingEnrollmentsRequest(), "enrollments")
        named = {(e.id, e.vma_name) for e in items}
    else:
        request = enrollment_pb.ListActiveVMAsRequest(include_disconnected=True)
        named = {(c.enrollment_id, c.vma_name) for c in
                 s.client.pages(s.client.enrollment_admin.ListActiveVMAs, request, "connections")}
    if any(ref == enrollment_id for enrollment_id, _ in named):
        return ref
    matches = sorted({enrollment_id for enrollment_id, name in named if name == ref})
    if len(matches) > 1:
        raise CliError(grpc.StatusCode.FAILED_PRECONDITION,
                       f"several enrollments of a VMA named {ref!r} ({', '.join(matches)}); give the ID")
    return matches[0] if matches else ref  # unknown: the server says NOT_FOUND


def _vma_pairing_code(s: Session, args: argparse.Namespace) -> None:
    request = _set_present(enrollment_pb.GeneratePairingCodeRequest(), valid_for=args.valid_for)
    response = s.call(s.client.enrollment_admin.GeneratePairingCode, request)
    s.show(response, lambda r: f"pairing code: {r.pairing_code}\nvalid for {output.duration(r.valid_for)}, until "
                               f"{output.when(r.expires_at)}; enter it on the VMA once, then approve the VMA with: "
                               f"omactl vma pending && omactl vma approve ID"
                               + (f"\nOMA TLS certificate sha256: {r.oma_certificate_sha256} (give it to the VMA "
                                  f"with the code, so it pins this OMA)" if r.oma_certificate_sha256
                                  else "\nthe OMA serves no TLS listener: the VMA can only enroll over plaintext"))


def _vma_pending(s: Session, args: argparse.Namespace) -> None:
    enrollments = list(s.client.pages(s.client.enrollment_admin.ListPendingEnrollments,
                                      enrollment_pb.ListPendingEnrollmentsRequest(), "enrollments"))
    s.show(enrollment_pb.ListPendingEnrollmentsResponse(enrollments=enrollments, count=len(enrollments)),
           lambda r: output.table(r.enrollments, output.ENROLLMENT_COLUMNS, empty="no VMA awaits approval"))


def _vma_approve(s: Session, args: argparse.Namespace) -> None:
    request = enrollment_pb.ApproveEnrollmentRequest(enrollment_id=_enrollment_id(s, args.id, pending=True),
                                                     notes=args.notes or "")
    response = s.call(s.client.enrollment_admin.ApproveEnrollment, request)

    def render(r: Any) -> str:
        e, c = r.enrollment, r.connection
        return (f"approved VMA {e.vma_name} ({e.vma_fingerprint}): enrollment {e.id}, tunnel user {c.ssh_user}, "
                f"reverse port {c.reverse_tunnel_port}")

    s.show(response, render)


def _vma_reject(s: Session, args: argparse.Namespace) -> None:
    request = enrollment_pb.RejectEnrollmentRequest(enrollment_id=_enrollment_id(s, args.id, pending=True),
                                                    reason=args.reason)
    response = s.call(s.client.enrollment_admin.RejectEnrollment, request)
    s.show(response, lambda r: f"rejected VMA {r.enrollment.vma_name} (enrollment {r.enrollment.id})")


def _vma_revoke(s: Session, args: argparse.Namespace) -> None:
    request = enrollment_pb.RevokeVMARequest(enrollment_id=_enrollment_id(s, args.id, pending=False),
                                             reason=args.reason or "")
    response = s.call(s.client.enrollment_admin.RevokeVMA, request)
    s.show(response, lambda r: f"revoked VMA {r.connection.vma_name} (enrollment {r.connection.enrollment_id}): "
                               f"{r.message}")


def _vma_list(s: Session, args: argparse.Namespace) -> None:
    request = enrollment_pb.ListActiveVMAsRequest(include_disconnected=args.all or args.disconnected,
                                                  include_revoked=args.all)
    connections = list(s.client.pages(s.client.enrollment_admin.ListActiveVMAs, request, "connections"))
    s.show(enrollment_pb.ListActiveVMAsResponse(connections=connections, count=len(connections)),
           lambda r: output.table(r.connections, output.VMA_CONNECTION_COLUMNS, empty="no VMA connections"))


def _vma_audit(s: Session, args: argparse.Namespace) -> None:
    request = enrollment_pb.GetAuditLogRequest(event_type=args.type or "", enrollment_id=args.enrollment or "")
    events = _limited(s, s.client.enrollment_admin.GetAuditLog, request, "events", args.limit)
    s.show(enrollment_pb.GetAuditLogResponse(events=events, count=len(events)),
           lambda r: output.table(r.events, output.VMA_AUDIT_COLUMNS, empty="no audit events"))


def _register_vma(commands: Any) -> None:
    actions = _family(commands, "vma", "VMA enrollment: pairing codes, approval, tunnel access, audit trail")
    p = _command(actions, "pairing-code", _vma_pairing_code, "create a one-time pairing code for a new VMA")
    p.add_argument("--valid-for", type=int, metavar="SECONDS", help="60-86400 (default 600)")
    _command(actions, "pending", _vma_pending, "list enrolled VMAs awaiting approval")
    p = _command(actions, "approve", _vma_approve, "approve a VMA: install its tunnel key")
    p.add_argument("id", metavar="ID", help="enrollment id (or the VMA name, when one pending VMA has it)")
    p.add_argument("--notes", help="recorded in the audit trail")
    p = _command(actions, "reject", _vma_reject, "reject a pending VMA")
    p.add_argument("id", metavar="ID", help="enrollment id (or the VMA name, when one pending VMA has it)")
    p.add_argument("--reason", required=True, help="recorded in the audit trail")
    p = _command(actions, "revoke", _vma_revoke, "revoke a VMA: remove its tunnel key and end its sessions")
    p.add_argument("id", metavar="ID", help="enrollment id (or the VMA name)")
    p.add_argument("--reason", help="recorded in the audit trail")
    p = _command(actions, "list", _vma_list, "list VMA connections (connected ones unless asked)")
    p.add_argument("--disconnected", action="store_true", help="also disconnected ones")
    p.add_argument("--all", action="store_true", help="also disconnected and revoked ones")
    p = _command(actions, "audit", _vma_audit, "the enrollment audit trail, newest first")
    p.add_argument("--type", choices=["enrollment", "verification", "approval", "rejection", "connection",
                                      "disconnection", "revocation"])
    p.add_argument("--enrollment", metavar="ID", help="events of one enrollment")
    _add_limit(p)


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
    p.add_argument("--tls-ca", default=argparse.SUPPRESS, metavar="FILE",
                   help="speak TLS, trusting this PEM root, e.g. the OMA's oma-tls.crt (default: $OMA_TLS_CA, "
                        "the saved login; without it: plaintext)")
    p.add_argument("--tls-server-name", default=argparse.SUPPRESS, metavar="NAME",
                   help="the name the OMA's certificate must carry, when the target's host is not in it")
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
        description="Operate the OMA migration server: credentials, CloudStack, VMs, replication, failover "
                    "(test, live, rollback), readiness, schedules and groups, VMA enrollment, jobs.",
        epilog="exit codes: 0 ok, 1 the command reports a failure (the followed job failed, the VM is not "
               "ready, a confirmation was declined), 2 usage error (also: failover live without --yes and no "
               "terminal), 100+N the RPC failed with gRPC status N (105 NOT_FOUND, 109 FAILED_PRECONDITION, "
               "112 UNIMPLEMENTED, 116 UNAUTHENTICATED), 130 interrupted (a watched job keeps running)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (_register_session, _register_credentials, _register_cloudstack, _register_discovery,
                     _register_vms, _register_replication, _register_failover, _register_jobs, _register_mappings,
                     _register_groups, _register_schedules, _register_vma, _register_users):
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
        say(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        session.close()


def _report(session: Session, code: grpc.StatusCode, details: str, *, hint: bool = True) -> int:
    say(f"error: {code.name}: {details}", file=sys.stderr)
    if hint and code in _HINTS:
        say(f"hint: {_HINTS[code].format(target=session.target)}", file=sys.stderr)
    return exit_code_for(code)


if __name__ == "__main__":
    sys.exit(main())
