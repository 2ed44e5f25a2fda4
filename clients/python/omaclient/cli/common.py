"""What every omactl command shares: exit codes, the session (options, connection, output), secrets
read from stdin/env/prompt, names resolved to ids, and the helpers that declare commands."""
from __future__ import annotations

import argparse
import getpass
import os
import sys
from itertools import islice
from typing import Any, Callable

import grpc
from google.protobuf.message import Message
from oma.v1 import discovery_pb2 as discovery_pb
from oma.v1 import machine_groups_pb2 as groups_pb
from oma.v1 import schedules_pb2 as schedules_pb
from oma.v1 import vm_contexts_pb2 as contexts_pb
from oma.v1 import vmware_credentials_pb2 as credentials_pb

from omaclient import output, progress
from omaclient.client import DEFAULT_TARGET, OmaClient, saved_settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_RPC_BASE = 100
EXIT_INTERRUPTED = 130

DEFAULT_TIMEOUT_S = 30.0
# vCenter discovery and CloudStack look-ups wait on remote systems (the VMA alone allows 60 s).
SLOW_TIMEOUT_S = 120.0
LIST_LIMIT = 50



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


def set_present(message: Message, **values: Any) -> Message:
    """Assign the values that were given (not None): for ``optional`` fields that means "change this"."""
    for name, value in values.items():
        if value is not None:
            setattr(message, name, value)
    return message


# --- names to ids ---------------------------------------------------------------------------------
def vm_by_name(s: Session, vm_name: str, vcenter: str | None) -> Any:
    """The VMContext of a managed VM given by name (NOT_FOUND when there is none)."""
    request = contexts_pb.GetVMContextByNameRequest(vm_name=vm_name, vcenter_host=vcenter or "")
    return s.call(s.client.contexts.GetVMContextByName, request).details.context


def context_id_of(s: Session, vm_name: str, vcenter: str | None) -> str:
    return vm_by_name(s, vm_name, vcenter).context_id


def group_id_of(s: Session, ref: str) -> str:
    for group in s.client.pages(s.client.groups.ListGroups, groups_pb.ListGroupsRequest(), "groups"):
        if ref in (group.id, group.name):
            return group.id
    raise CliError(grpc.StatusCode.NOT_FOUND, f"no machine group named {ref!r}")


def vcenter_source(s: Session, credential_id: int | None) -> discovery_pb.VCenterSource:
    if credential_id is None:
        response = s.call(s.client.credentials.GetDefaultCredential, credentials_pb.GetDefaultCredentialRequest())
        credential_id = response.credential.id
    return discovery_pb.VCenterSource(credential_id=credential_id)


def schedule_id_of(s: Session, ref: str) -> str:
    for schedule in s.client.pages(s.client.schedules.ListSchedules, schedules_pb.ListSchedulesRequest(), "schedules"):
        if ref in (schedule.id, schedule.name):
            return schedule.id
    raise CliError(grpc.StatusCode.NOT_FOUND, f"no schedule named {ref!r}")



# --- following a job ------------------------------------------------------------------------------
def progress_display(s: Session, terminal: Callable[[Any], Any], plain: Callable[[Any], Any]) -> progress.Display:
    """JSON Lines on stdout with --json; otherwise redrawn on a terminal, or plain lines, on stderr."""
    if s.json:
        return progress.JsonLinesDisplay(sys.stdout)
    return terminal(sys.stderr) if sys.stderr.isatty() else plain(sys.stderr)


def stopped_watching(job_id: str, resume: str) -> int:
    say(f"\nstopped watching; job {job_id} keeps running. Resume with: {resume}", file=sys.stderr)
    return EXIT_INTERRUPTED




# --- declaring commands -------------------------------------------------------------------------
def limited(s: Session, method: Callable, request: Message, field: str, limit: int) -> list[Any]:
    """The first ``limit`` items of a paged list (all of them for 0)."""
    items = s.client.pages(method, request, field, page_size=min(limit, 200) if limit else 200)
    return list(islice(items, limit or None))


def add_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=LIST_LIMIT, help=f"at most this many (default {LIST_LIMIT}, 0 = all)")


def positive_seconds(value: str) -> float:
    seconds = float(value)
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return seconds


def global_options() -> argparse.ArgumentParser:
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
    p.add_argument("--timeout", type=positive_seconds, default=argparse.SUPPRESS, metavar="SECONDS",
                   help=f"deadline of each call (default {DEFAULT_TIMEOUT_S:g}; {SLOW_TIMEOUT_S:g} for "
                        f"vCenter and CloudStack look-ups)")
    return p


GLOBAL_OPTIONS = global_options()


def add_family(commands: Any, name: str, help_text: str) -> Any:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(dest=f"{name}_action", required=True, metavar="ACTION")


def add_command(commands: Any, name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text, parents=[GLOBAL_OPTIONS])
    parser.set_defaults(handler=handler)
    return parser
