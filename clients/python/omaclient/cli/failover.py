"""omactl failover and readiness: test and live failover, end, rollback, cleanup, followed step by step."""
from __future__ import annotations

import argparse
import sys
import uuid
from typing import Any

import grpc
from google.protobuf.message import Message
from oma.v1 import failover_pb2 as failover_pb

from omaclient import output, progress
from omaclient.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    CliError,
    Session,
    UsageError,
    add_command,
    add_family,
    add_limit,
    limited,
    progress_display,
    say,
    set_present,
    stopped_watching,
    vm_by_name,
)


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
    display = progress_display(s, progress.FailoverTerminalDisplay, progress.FailoverPlainDisplay)
    try:
        final = progress.follow_failover(s.client, job_id, display)
    except KeyboardInterrupt:
        return stopped_watching(job_id, f"omactl failover watch {job_id}")
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
    vm = vm_by_name(s, args.vm, args.vcenter)
    request = set_present(
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
    vm = vm_by_name(s, args.vm, args.vcenter)
    request = set_present(
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
        vm: Any = vm_by_name(s, args.target_ref, args.vcenter)
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
    vm = vm_by_name(s, args.vm, args.vcenter)
    request = set_present(
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
    vm = vm_by_name(s, args.vm, args.vcenter)
    request = failover_pb.CleanupFailedExecutionRequest(context_id=vm.context_id, request_id=str(uuid.uuid4()))
    response = s.call(s.client.failover.CleanupFailedExecution, request)
    of = f" of failover {response.failover_job_id}" if response.failover_job_id else ""
    return _started(s, args, response, f"cleaning up the failed execution{of} of {vm.vm_name}: job {response.job_id}")


def _failover_status(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.failover.GetFailoverStatus, failover_pb.GetFailoverStatusRequest(job_id=args.job))
    s.show(response, output.failover_status)


def _failover_list(s: Session, args: argparse.Namespace) -> None:
    request = failover_pb.ListFailoverJobsRequest(
        context_id=vm_by_name(s, args.vm, args.vcenter).context_id if args.vm else "", failover_type=args.type or "",
        status=args.status or "",
    )
    jobs = limited(s, s.client.failover.ListFailoverJobs, request, "failover_jobs", args.limit)
    s.show(failover_pb.ListFailoverJobsResponse(failover_jobs=jobs, total_count=len(jobs)),
           lambda r: output.table(r.failover_jobs, output.FAILOVER_JOB_COLUMNS, empty="no failover jobs"))


def _failover_watch(s: Session, args: argparse.Namespace) -> int:
    return _follow_failover(s, args.job)


def _readiness(s: Session, args: argparse.Namespace) -> int:
    request = failover_pb.GetFailoverReadinessRequest(vm_id=vm_by_name(s, args.vm, args.vcenter).context_id,
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


def register_failover(commands: Any) -> None:
    actions = add_family(commands, "failover", "test and live failover to CloudStack, ending tests, rollback")
    p = add_command(actions, "test", _failover_test,
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
    p = add_command(actions, "live", _failover_live,
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
    p = add_command(actions, "end", _failover_end,
                 "end a test failover: destroy the test VM and give the replica volumes back to the OMA")
    p.add_argument("target_ref", metavar="VM-OR-JOB", help="VM name (its newest test failover) or failover job id")
    p.add_argument("--vcenter", help="vCenter host, when the name exists in several")
    _add_wait(p)
    p = add_command(actions, "rollback", _failover_rollback,
                 "roll back a test or live failover (a live one asks for confirmation; --yes to skip it)")
    _add_failover_vm(p)
    p.add_argument("--type", required=True, choices=["test", "live"], help="the kind of failover to roll back")
    p.add_argument("--job", help="the failover job to roll back (default: the VM's newest of that type)")
    p.add_argument("--power-on-source", action=argparse.BooleanOptionalAction,
                   help="power the source VM on afterwards (default: yes for live, no for test)")
    p.add_argument("--force", action="store_true", help="go on with the remaining steps when a step fails")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    _add_wait(p)
    p = add_command(actions, "cleanup-failed", _failover_cleanup_failed,
                 "recover a VM left half-way by a failed failover (destination VM removed, volumes back on the OMA)")
    _add_failover_vm(p)
    _add_wait(p)
    p = add_command(actions, "status", _failover_status, "show a failover, cleanup or rollback job with its steps")
    p.add_argument("job", metavar="JOB", help="job id, external job id or failover job id")
    p = add_command(actions, "list", _failover_list, "list failover jobs, newest first")
    p.add_argument("--vm", help="VM name")
    p.add_argument("--vcenter", help="vCenter host, when the name exists in several")
    p.add_argument("--type", choices=["test", "live"])
    p.add_argument("--status", help="e.g. completed, failed, cleanup, creating_vm")
    add_limit(p)
    p = add_command(actions, "watch", _failover_watch,
                 "follow a failover, cleanup or rollback job until it ends (exit 1 if it fails)")
    p.add_argument("job", metavar="JOB", help="job id, external job id or failover job id")
    p = add_command(commands, "readiness", _readiness,
                 "check whether a VM can be failed over now (exit 1 when it cannot)")
    _add_failover_vm(p)
    p.add_argument("--type", choices=["live", "test"], default="live", help="(default: live)")
