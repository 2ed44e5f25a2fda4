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

Layout: this module builds the parser and runs a command; ``common`` holds what every command shares
(exit codes, ``Session``, secrets, names to ids, command declaration); each command family has its
module (``session``: login/logout/passwd/users, ``credentials``, ``cloudstack``, ``vms``:
discover/add/vms, ``replication``: replicate/watch/cancel/replications/jobs, ``failover``: failover and
readiness, ``mappings``, ``groups``, ``schedules``, ``vma``) with a ``register_*`` function.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import grpc

from omaclient.cli.cloudstack import register_cloudstack
from omaclient.cli.common import (  # the exit codes stay readable as omactl's: cli.EXIT_USAGE, ...
    EXIT_FAILED,  # noqa: F401
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RPC_BASE,  # noqa: F401
    EXIT_USAGE,
    GLOBAL_OPTIONS,
    CliError,
    Session,
    UsageError,
    exit_code_for,
    say,
)
from omaclient.cli.credentials import register_credentials
from omaclient.cli.failover import register_failover
from omaclient.cli.groups import register_groups
from omaclient.cli.mappings import register_mappings
from omaclient.cli.replication import register_jobs, register_replication
from omaclient.cli.schedules import register_schedules
from omaclient.cli.session import log_in, register_session, register_users
from omaclient.cli.vma import register_vma
from omaclient.cli.vms import register_discovery, register_vms

_HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: "log in with: omactl login --target {target}",
    grpc.StatusCode.UNAVAILABLE: "is the OMA server running at {target}? (set it with --target or $OMA_TARGET)",
    grpc.StatusCode.PERMISSION_DENIED: "ask an admin: users and VMA enrollment need the admin role",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omactl", parents=[GLOBAL_OPTIONS],
        description="Operate the OMA migration server: credentials, CloudStack, VMs, replication, failover "
                    "(test, live, rollback), readiness, schedules and groups, VMA enrollment, jobs.",
        epilog="exit codes: 0 ok, 1 the command reports a failure (the followed job failed, the VM is not "
               "ready, a confirmation was declined), 2 usage error (also: failover live without --yes and no "
               "terminal), 100+N the RPC failed with gRPC status N (105 NOT_FOUND, 109 FAILED_PRECONDITION, "
               "112 UNIMPLEMENTED, 116 UNAUTHENTICATED), 130 interrupted (a watched job keeps running)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (register_session, register_credentials, register_cloudstack, register_discovery,
                     register_vms, register_replication, register_failover, register_jobs, register_mappings,
                     register_groups, register_schedules, register_vma, register_users):
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
        return _report(session, err.code(), err.details() or "", hint=args.handler is not log_in)
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

