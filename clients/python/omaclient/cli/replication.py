"""omactl replicate, watch, cancel, replications and jobs: replication jobs followed live, and the JobLog."""
from __future__ import annotations

import argparse
import uuid
from typing import Any

from oma.v1 import job_log_pb2 as jobs_pb
from oma.v1 import replications_pb2 as replications_pb

from omaclient import output, progress
from omaclient.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    Session,
    add_command,
    add_family,
    add_limit,
    context_id_of,
    limited,
    progress_display,
    say,
    stopped_watching,
)


# --- replication ----------------------------------------------------------------------------------
def _replicate(s: Session, args: argparse.Namespace) -> int:
    request = replications_pb.CreateReplicationRequest(
        context_id=context_id_of(s, args.vm, args.vcenter), replication_type=args.type or "",
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


def _follow(s: Session, job_id: str) -> int:
    display = progress_display(s, progress.TerminalDisplay, progress.PlainDisplay)
    try:
        final = progress.follow(s.client, job_id, display)
    except KeyboardInterrupt:
        return stopped_watching(job_id, f"omactl watch {job_id}")
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
        vm_context_id=context_id_of(s, args.vm, args.vcenter) if args.vm else "", statuses=args.status or [],
    )
    jobs = limited(s, s.client.replications.ListReplications, request, "jobs", args.limit)
    s.show(replications_pb.ListReplicationsResponse(jobs=jobs, count=len(jobs)),
           lambda r: output.table(r.jobs, output.REPLICATION_COLUMNS, empty="no replication jobs"))


def _replications_show(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.replications.GetReplication, replications_pb.GetReplicationRequest(job_id=args.job))
    s.show(response, output.replication_details)


def register_replication(commands: Any) -> None:
    p = add_command(commands, "replicate", _replicate,
                 "start replicating a VM and follow the job (Ctrl-C stops watching, not the job)")
    p.add_argument("vm", metavar="VM", help="VM name")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--full", dest="type", action="store_const", const="initial", help="copy every disk in full")
    kind.add_argument("--incremental", dest="type", action="store_const", const="incremental",
                      help="copy the changes since the last run (default: decided from the stored change ids)")
    p.add_argument("--no-follow", action="store_true", help="return once the job is created")
    p.add_argument("--vcenter", help="vCenter host, when the name exists in several")
    p = add_command(commands, "watch", _watch, "follow a replication job until it ends")
    p.add_argument("job", metavar="JOB")
    p = add_command(commands, "cancel", _cancel, "cancel a replication job")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--reason")
    actions = add_family(commands, "replications", "replication jobs")
    p = add_command(actions, "list", _replications_list, "list replication jobs, newest first")
    p.add_argument("--vm", help="VM name")
    p.add_argument("--vcenter", help="vCenter host, when the name exists in several")
    p.add_argument("--status", action="append", help="repeatable: pending, replicating, completed, failed, ...")
    add_limit(p)
    p = add_command(actions, "show", _replications_show, "show a replication job with its disks")
    p.add_argument("job", metavar="JOB")


# --- JobLog ---------------------------------------------------------------------------------------
def _jobs_list(s: Session, args: argparse.Namespace) -> None:
    request = jobs_pb.ListJobsRequest(
        context_id=context_id_of(s, args.vm, args.vcenter) if args.vm else "", statuses=args.status or [],
        job_type=args.type or "",
    )
    jobs = limited(s, s.client.jobs.ListJobs, request, "jobs", args.limit)
    s.show(jobs_pb.ListJobsResponse(jobs=jobs, count=len(jobs)),
           lambda r: output.table(r.jobs, output.JOB_COLUMNS, empty="no jobs"))


def _jobs_show(s: Session, args: argparse.Namespace) -> None:
    response = s.call(s.client.jobs.GetJob, jobs_pb.GetJobRequest(job_id=args.id))
    s.show(response, lambda r: output.job_details(r.job))


def register_jobs(commands: Any) -> None:
    actions = add_family(commands, "jobs", "the JobLog: every operation with its steps")
    p = add_command(actions, "list", _jobs_list, "list jobs, newest first")
    p.add_argument("--vm", help="VM name")
    p.add_argument("--vcenter", help="vCenter host, when the name exists in several")
    p.add_argument("--status", action="append", help="repeatable: pending, running, completed, failed, cancelled")
    p.add_argument("--type", help="e.g. replication, discovery, cleanup")
    add_limit(p)
    p = add_command(actions, "show", _jobs_show, "show a job with its steps")
    p.add_argument("id", help="job id (or external job id)")
