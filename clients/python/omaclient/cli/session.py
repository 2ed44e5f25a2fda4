"""omactl login, logout, passwd and users: who is calling, and (admin) who may."""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import grpc
from oma.v1 import auth_pb2 as auth_pb
from oma.v1 import users_pb2 as users_pb

from omaclient import output
from omaclient.cli.common import (
    EXIT_OK,
    Session,
    UsageError,
    add_command,
    add_family,
    add_secret_options,
    exit_code_for,
    read_secret,
    say,
)
from omaclient.client import config_path, saved_settings


# --- session --------------------------------------------------------------------------------------
def _write_private(path: Path, settings: dict[str, Any]) -> None:
    """Replace the config file atomically with a 0600 one (mkstemp creates it that way)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(settings, f, indent=2)
    os.replace(tmp, path)


def log_in(s: Session, args: argparse.Namespace) -> None:
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


def register_session(commands: Any) -> None:
    p = add_command(commands, "login", log_in, "log in and save the target and token for later commands")
    p.add_argument("--username", default="admin")
    add_secret_options(p, "password", "password")
    add_command(commands, "logout", _logout, "end the saved token on the server and forget it")
    p = add_command(commands, "passwd", _passwd,
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


def register_users(commands: Any) -> None:
    actions = add_family(commands, "users", "users of the OMA API and their roles (admin only)")
    add_command(actions, "list", _users_list, "list users")
    p = add_command(actions, "create", _users_create, "create a user")
    p.add_argument("username")
    p.add_argument("--role", choices=["operator", "admin"], default="operator",
                   help="operator: everything but users and VMA enrollment (default); admin: everything")
    add_secret_options(p, "password", "password of the new user")
    for name, disabled, help_text in (("disable", True, "disable a user and end its tokens"),
                                      ("enable", False, "let a disabled user log in again")):
        p = add_command(actions, name, _users_set_disabled(disabled), help_text)
        p.add_argument("username")
    p = add_command(actions, "delete", _users_delete, "delete a user and end its tokens")
    p.add_argument("username")
    p = add_command(actions, "revoke-tokens", _users_revoke_tokens, "end every token of a user (it may log in again)")
    p.add_argument("username")
