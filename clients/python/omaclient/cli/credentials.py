"""omactl credentials: saved vCenter logins."""
from __future__ import annotations

import argparse
from typing import Any

from google.protobuf.message import Message
from oma.v1 import vmware_credentials_pb2 as credentials_pb

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


def _credentials_add(s: Session, args: argparse.Namespace) -> None:
    request = credentials_pb.CreateCredentialRequest(
        credential_name=args.name, vcenter_host=args.vcenter, username=args.username,
        datacenter=args.datacenter, is_default=args.default, tls_thumbprint=args.thumbprint or "",
        tls_insecure=args.insecure,
        password=read_secret(args, "password", f"vCenter password for {args.username}@{args.vcenter}: "),
    )
    set_present(request, is_active=args.active)
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
    request = set_present(
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


def register_credentials(commands: Any) -> None:
    actions = add_family(commands, "credentials", "saved vCenter credentials")
    p = add_command(actions, "add", _credentials_add, "save a vCenter credential")
    p.add_argument("name")
    p.add_argument("--vcenter", required=True, help="vCenter host name")
    p.add_argument("--username", required=True)
    p.add_argument("--datacenter", required=True)
    p.add_argument("--default", action="store_true", help="make it the default credential")
    p.add_argument("--active", action=argparse.BooleanOptionalAction, help="(default: active)")
    p.add_argument("--thumbprint", help="pin the vCenter TLS certificate (SHA-1 thumbprint)")
    p.add_argument("--insecure", action="store_true", help="do not verify the vCenter TLS certificate")
    add_secret_options(p, "password", "vCenter password")
    p = add_command(actions, "list", _credentials_list, "list credentials")
    p.add_argument("--active", action="store_true", help="active ones only")
    p = add_command(actions, "show", _credentials_show, "show one credential")
    p.add_argument("id", type=int)
    p = add_command(actions, "update", _credentials_update, "change a credential (only the given fields)")
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
    p = add_command(actions, "delete", _credentials_delete, "delete a credential")
    p.add_argument("id", type=int)
    p = add_command(actions, "default", _credentials_default, "show the default credential, or 'set ID'")
    p.add_argument("action", nargs="?", choices=["set"])
    p.add_argument("id", nargs="?", type=int)
    p = add_command(actions, "test", _credentials_test, "log in to vCenter with a credential (through the VMA)")
    p.add_argument("id", type=int)
