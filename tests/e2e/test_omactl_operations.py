"""omactl's operations commands against the real server, on both databases: failover (test, live,
end, rollback, status, list, watch) and readiness on the whole lab, schedules (with groups attached),
and VMA enrollment approval (the VMA side driven through the public EnrollmentService).

Commands run in-process through ``main()`` as in test_omactl.py; what they change is checked in the
database, in the CloudStack emulator and in the tunnel's authorized_keys file, not only in the output.
"""
from __future__ import annotations

import io
import json
import re
import time

import pytest
from oma.v1 import failover_pb2 as fpb

from oma_server import server as server_module
from oma_server.db import models
from oma_server.services import service_of
from omaclient import cli, progress
from omaclient.client import OmaClient
from tests.fixtures.servers import ADMIN_PASSWORD
from tests.helpers.failover import CLEANUP_STEPS, FAILOVER_STEPS, prepared_vm
from tests.helpers.oma_enrollment import Vma, code_row
from tests.helpers.oma_enrollment import enroll as vma_enroll
from tests.helpers.oma_enrollment import verify as vma_verify
from tests.helpers.omactl import (
    EXIT_ALREADY_EXISTS,
    EXIT_FAILED_PRECONDITION,
    EXIT_NOT_FOUND,
    EXIT_UNIMPLEMENTED,
    add_vm,
    table_rows,
)

EXIT_INVALID_ARGUMENT = 103


def _login(run_omactl, port: int):
    result = run_omactl("--target", f"127.0.0.1:{port}", "login", "--password-stdin", stdin=ADMIN_PASSWORD + "\n")
    assert result.code == 0, result.err
    return run_omactl


@pytest.fixture
def omactl(run_omactl, oma_server):
    return _login(run_omactl, oma_server.port)


def _steps(job_id: str) -> list[tuple[str, str]]:
    return [(s.name, s.status) for s in models.JobStep.select().where(models.JobStep.job == job_id)
            .order_by(models.JobStep.seq)]


def _step_lines(err: str) -> dict[str, list[str]]:
    """{step display name: [the marks it was shown with, in order]} from the plain progress lines."""
    shown: dict[str, list[str]] = {}
    for line in err.splitlines():
        if "] " in line and line.split()[1].startswith("["):
            name, mark = [part.strip() for part in line.split("] ", 1)[1].split("  ")[:2]]
            shown.setdefault(name, []).append(mark)
    return shown


# --- failover on the lab --------------------------------------------------------------------------
def test_test_failover_started_watched_and_ended_with_omactl(lab_private, run_omactl):
    lab = lab_private
    omactl = _login(run_omactl, lab.oma.port)
    ctx = prepared_vm(lab)
    vm = ctx.vm_name

    ready = omactl("readiness", vm, "--type", "test")
    assert ready.code == 0, ready.out + ready.err
    checks = table_rows(ready.out.split("\n\n")[0])
    assert checks[0] == ["CHECK", "STATUS", "TYPE", "MESSAGE"]
    assert {row[0]: row[1] for row in checks[1:]}["Network Mappings"] == "pass"
    assert all(row[1] in ("pass", "skip") for row in checks[1:]), ready.out
    assert f"{vm} is ready for a test failover (score " in ready.out

    started = omactl("failover", "test", vm, "--no-wait")
    assert started.code == 0, started.out + started.err
    first, follow = started.out.strip().splitlines()
    job_id = first.split(": job ", 1)[1].split()[0]
    assert first.startswith(f"started test failover of {vm}: job {job_id} (destination VM {vm}-test-")
    assert follow == f"follow it with: omactl failover watch {job_id}"
    assert models.FailoverJob.get(models.FailoverJob.job_id == job_id).job_type == "test"  # written at once

    watched = omactl("failover", "watch", job_id)
    assert watched.code == 0, watched.out + watched.err
    record = models.FailoverJob.get(models.FailoverJob.job_id == job_id)
    destination = lab.cloudstack.get("vm", record.destination_vm_id)
    assert destination["state"] == "Running" and destination["displayname"].startswith(f"{vm}-test-")
    assert re.fullmatch(rf"unified-test-failover of {vm}: job {job_id} completed in \S+; destination VM "
                        rf"{destination['displayname']} \({destination['id']}\)", watched.out.strip()), watched.out
    # Live step progress on stderr (not a terminal here: one line per step change), ending "done"/"skipped".
    shown = _step_lines(watched.err)
    db_steps = _steps(job_id)
    assert [name for name, _ in db_steps] == FAILOVER_STEPS
    as_json = omactl("--json", "failover", "status", job_id).json()
    friendly = {step["name"]: step["display_name"] for step in as_json["job"]["steps"]}
    assert (as_json["status"], as_json["failover_job"]["destination_vm_id"]) == ("completed", destination["id"])
    for name, status in db_steps:
        assert shown[friendly[name]][-1] == {"completed": "done", "skipped": "skipped"}[status], (name, watched.err)
    assert "Creating Destination VM" in shown and f"job {job_id}" in watched.err.splitlines()[0]
    assert any("..." in marks for marks in shown.values()), watched.err  # seen while it ran, not only at the end
    assert record.status == "completed"
    assert models.VmReplicationContext.get_by_id(ctx.context_id).current_status == "failed_over_test"

    status = omactl("failover", "status", job_id)
    assert status.code == 0 and "Status:" in status.out
    assert f"Destination VM:   {destination['displayname']} ({destination['id']})" in status.out
    step_rows = table_rows(status.out.split("Steps\n", 1)[1])
    assert [r[1] for r in step_rows[1:]] == [friendly[n] for n in FAILOVER_STEPS]
    listed = omactl("failover", "list", "--vm", vm, "--json").json()
    assert [(j["job_id"], j["job_type"], j["status"]) for j in listed["failover_jobs"]] == [(job_id, "test", "completed")]
    rows = table_rows(omactl("failover", "list").out)
    assert rows[0][:4] == ["JOB ID", "VM", "TYPE", "STATUS"] and rows[1][:4] == [job_id, vm, "test", "completed"]

    # A VM that is failed over is not ready for another failover: exit 1 and the failing check named.
    busy = omactl("readiness", vm, "--type", "test")
    assert busy.code == cli.EXIT_FAILED and f"{vm} is NOT ready for a test failover: 2 check(s) failed" in busy.out
    assert "Required actions\n- End the test failover first" in busy.out
    assert {row[0]: row[1] for row in table_rows(busy.out.split("\n\n")[0])[1:]}["VM Status"] == "FAIL"
    assert omactl("--json", "readiness", vm, "--type", "test").json()["is_valid"] is False

    # Watching a finished job shows its end at once; --json is one document per update (JSON Lines).
    again = omactl("failover", "watch", job_id, "--json")
    updates = [json.loads(line) for line in again.out.splitlines()]
    assert again.code == 0 and updates[-1]["terminal"] and updates[-1]["job"]["status"] == "completed"

    # Ended by VM name and followed with --json: the start response, then one line per update.
    ended = omactl("failover", "end", vm, "--json")
    assert ended.code == 0, ended.err
    start, *updates = [json.loads(line) for line in ended.out.splitlines()]
    cleanup_id = start["job_id"]
    assert (start["failover_job_id"], start["vm_name"], start["existing"]) == (job_id, vm, False)
    assert updates and all(u["job"]["job_id"] == cleanup_id for u in updates)
    assert updates[-1]["terminal"] and updates[-1]["job"]["status"] == "completed"
    assert [s["status"] for s in updates[-1]["job"]["steps"]] == ["completed"] * len(CLEANUP_STEPS)
    cleanup = omactl("failover", "watch", cleanup_id)
    assert cleanup.code == 0, cleanup.out + cleanup.err
    assert cleanup.out.strip().startswith(f"test-failover-cleanup of {vm}: job {cleanup_id} completed in ")
    assert "Removing Test VM" in _step_lines(cleanup.err)
    assert all(status == "completed" for _, status in _steps(cleanup_id)) and \
        [name for name, _ in _steps(cleanup_id)] == CLEANUP_STEPS
    assert lab.cloudstack.get("vm", destination["id"]) is None
    assert models.FailoverJob.get(models.FailoverJob.job_id == job_id).status == "cleanup"
    assert models.VmReplicationContext.get_by_id(ctx.context_id).current_status == "ready_for_failover"

    # By failover job id now: the server refuses, the test is over.
    over = omactl("failover", "end", job_id)
    assert over.code == EXIT_FAILED_PRECONDITION and "already cleaned up" in over.err


# --- readiness, confirmation and errors without a lab ---------------------------------------------
def test_readiness_of_a_vm_that_is_not_ready(omactl, db):
    add_vm("web-01")
    result = omactl("readiness", "web-01")
    assert result.code == cli.EXIT_FAILED, result.err
    rows = {row[0]: row for row in table_rows(result.out.split("\n\n")[0])[1:]}
    assert rows["Sync Status"][1] == "FAIL" and rows["Sync Status"][2] == "critical"
    assert "web-01 is NOT ready for a live failover: " in result.out and "Required actions\n- " in result.out
    as_json = omactl("--json", "readiness", "web-01", "--type", "test")
    assert as_json.code == cli.EXIT_FAILED
    data = as_json.json()
    assert (data["vm_name"], data["failover_type"], data["is_valid"]) == ("web-01", "test", False)
    assert {c["check_name"] for c in data["checks"] if c["status"] == "fail"} >= {"Sync Status"}
    missing = omactl("readiness", "nope")
    assert (missing.code, missing.err.strip()) == (EXIT_NOT_FOUND, "error: NOT_FOUND: no managed VM named 'nope'")


def test_live_failover_and_live_rollback_need_a_confirmation(omactl, db):
    ctx = add_vm("web-01", current_status="ready_for_failover")
    before = (models.JobTracking.select().count(), models.FailoverJob.select().count())

    refused = omactl("failover", "live", "web-01")
    assert refused.code == cli.EXIT_USAGE and "confirm with --yes" in refused.err and refused.out == ""
    assert omactl("failover", "live", "web-01", "--json").code == cli.EXIT_USAGE
    assert omactl("failover", "rollback", "web-01", "--type", "live").code == cli.EXIT_USAGE
    declined = omactl("failover", "live", "web-01", stdin="n\n", tty=True)
    assert declined.code == cli.EXIT_FAILED and "powers off the source VM" in declined.err
    assert "nothing was started" in declined.err

    assert (models.JobTracking.select().count(), models.FailoverJob.select().count()) == before
    assert models.VmReplicationContext.get_by_id(ctx.context_id).current_status == "ready_for_failover"


def test_failover_commands_report_what_is_missing(omactl, db):
    add_vm("web-01")
    for argv in (("failover", "test", "nope"), ("failover", "cleanup-failed", "nope"),
                 ("failover", "live", "nope", "--yes"), ("failover", "list", "--vm", "nope")):
        result = omactl(*argv)
        assert (result.code, result.err.strip()) == (EXIT_NOT_FOUND, "error: NOT_FOUND: no managed VM named 'nope'")
    ended = omactl("failover", "end", "nope")
    assert (ended.code, ended.err.strip()) == (
        EXIT_NOT_FOUND, "error: NOT_FOUND: no managed VM and no failover job named 'nope'")
    for argv in (("failover", "status", "job-x"), ("failover", "watch", "job-x")):
        assert omactl(*argv).code == EXIT_NOT_FOUND, argv
    never = "error: FAILED_PRECONDITION: VM 'web-01' has no test failover to clean up or roll back"
    for argv in (("failover", "end", "web-01"), ("failover", "rollback", "web-01", "--type", "test")):
        result = omactl(*argv)  # a managed VM without a test failover
        assert (result.code, result.err.strip()) == (EXIT_FAILED_PRECONDITION, never), argv
    nothing = omactl("failover", "cleanup-failed", "web-01")
    assert nothing.code == EXIT_FAILED_PRECONDITION and "has no failover to clean up" in nothing.err
    assert omactl("failover", "test", "web-01", "--network", "no-equals-sign").code == cli.EXIT_USAGE
    assert omactl("failover", "list").out.strip() == "no failover jobs"
    assert models.FailoverJob.select().count() == 0


# --- schedules ------------------------------------------------------------------------------------
def _execution_settled(execution_id: str, timeout: float = 20.0) -> models.ScheduleExecution:
    deadline = time.monotonic() + timeout
    while True:
        row = models.ScheduleExecution.get_by_id(execution_id)
        if row.status != "running" or time.monotonic() > deadline:
            return row
        time.sleep(0.1)


def test_schedules_create_list_update_trigger_executions_delete(omactl, db):
    created = omactl("schedules", "create", "nightly", "--cron", "0 2 * * *", "--timezone", "Europe/Berlin",
                     "--type", "incremental", "--max-concurrent", "3", "--description", "every night")
    assert created.code == 0, created.err
    row = models.ReplicationSchedule.get(models.ReplicationSchedule.name == "nightly")
    assert created.out.startswith(f"created schedule nightly ({row.id}), next run ")
    assert (row.cron_expression, row.timezone, row.replication_type, row.max_concurrent_jobs, row.enabled,
            row.description) == ("0 2 * * *", "Europe/Berlin", "incremental", 3, True, "every night")
    assert omactl("schedules", "create", "nightly", "--cron", "0 3 * * *").code == EXIT_ALREADY_EXISTS
    bad = omactl("schedules", "create", "broken", "--cron", "61 * * * *")
    assert bad.code == EXIT_INVALID_ARGUMENT and "is not valid" in bad.err
    assert omactl("schedules", "create", "no-cron").code == cli.EXIT_USAGE
    paused = omactl("--json", "schedules", "create", "weekly", "--cron", "0 3 * * 0", "--disabled",
                    "--no-skip-if-running")
    assert paused.code == 0 and paused.json()["schedule"]["enabled"] is False
    assert models.ReplicationSchedule.get(models.ReplicationSchedule.name == "weekly").skip_if_running is False

    rows = table_rows(omactl("schedules", "list").out)
    assert rows[0][:5] == ["NAME", "CRON", "TIMEZONE", "TYPE", "ENABLED"]
    assert [(r[0], r[4]) for r in rows[1:]] == [("nightly", "yes"), ("weekly", "no")]
    listed = omactl("schedules", "list", "--enabled", "--json").json()
    assert [s["name"] for s in listed["schedules"]] == ["nightly"] and listed["total_count"] == 1
    shown = omactl("schedules", "show", "nightly")
    assert shown.code == 0 and "0 2 * * * (Europe/Berlin)" in shown.out and row.id in shown.out

    updated = omactl("schedules", "update", row.id, "--cron", "30 1 * * *", "--retries", "0")
    assert updated.code == 0 and updated.out.strip() == f"updated schedule nightly ({row.id})"
    row = models.ReplicationSchedule.get_by_id(row.id)
    assert (row.cron_expression, row.retry_attempts, row.timezone) == ("30 1 * * *", 0, "Europe/Berlin")
    assert omactl("schedules", "disable", "nightly").out.strip() == "schedule nightly is disabled"
    assert models.ReplicationSchedule.get_by_id(row.id).enabled is False
    refused = omactl("schedules", "trigger", "nightly")
    assert refused.code == EXIT_FAILED_PRECONDITION and "disabled" in refused.err
    enabled = omactl("schedules", "enable", "nightly")
    assert enabled.code == 0 and enabled.out.startswith("schedule nightly is enabled; next run ")
    assert models.ReplicationSchedule.get_by_id(row.id).enabled is True

    # A group attached to the schedule by name, detached and attached again with groups update.
    assert omactl("groups", "create", "wave-1", "--schedule", "nightly").code == 0
    group = models.VmMachineGroup.get(models.VmMachineGroup.name == "wave-1")
    assert group.schedule_id == row.id
    detached = omactl("groups", "update", "wave-1", "--no-schedule")
    assert detached.code == 0 and detached.out.strip().endswith("schedule: none")
    assert models.VmMachineGroup.get_by_id(group.id).schedule_id is None
    attached = omactl("groups", "update", "wave-1", "--schedule", row.id, "--priority", "5")
    assert attached.code == 0 and attached.out.strip().endswith("schedule: nightly")
    group = models.VmMachineGroup.get_by_id(group.id)
    assert (group.schedule_id, group.priority) == (row.id, 5)
    assert table_rows(omactl("schedules", "list").out)[1][7] == "1"  # GROUPS
    assert omactl("groups", "update", "wave-1", "--schedule", "hourly").code == EXIT_NOT_FOUND

    triggered = omactl("schedules", "trigger", "nightly", "--reason", "before the weekend")
    assert triggered.code == 0, triggered.err
    execution_id = triggered.out.split("execution ", 1)[1].split()[0]
    assert triggered.out.startswith(f"triggered schedule nightly: execution {execution_id} is ")
    execution = _execution_settled(execution_id)
    assert (execution.schedule_id, execution.triggered_by) == (row.id, "admin")
    assert execution.execution_details["trigger_reason"] == "before the weekend"
    executions = table_rows(omactl("schedules", "executions", "nightly").out)
    assert executions[0][:3] == ["EXECUTION ID", "STATUS", "TYPE"]
    assert [(e[0], e[1], e[2]) for e in executions[1:]] == [(execution_id, execution.status, "manual")]
    as_json = omactl("--json", "schedules", "executions", row.id).json()
    assert [e["id"] for e in as_json["executions"]] == [execution_id]
    assert omactl("schedules", "executions", "weekly").out.strip() == "no executions"
    status = omactl("schedules", "status")
    assert status.code == 0 and "Scheduler:" in status.out and "nightly" in status.out

    busy = omactl("schedules", "delete", "nightly")
    assert busy.code == EXIT_FAILED_PRECONDITION and "machine groups are still using" in busy.err
    assert omactl("groups", "update", "wave-1", "--no-schedule").code == 0
    deleted = omactl("schedules", "delete", "nightly")
    assert deleted.code == 0 and deleted.out.strip() == "deleted schedule nightly"
    assert models.ReplicationSchedule.get_or_none(models.ReplicationSchedule.id == row.id) is None
    assert models.ScheduleExecution.select().where(models.ScheduleExecution.schedule == row.id).count() == 0
    missing = omactl("schedules", "show", "nightly")
    assert (missing.code, missing.err.strip()) == (EXIT_NOT_FOUND, "error: NOT_FOUND: no schedule named 'nightly'")


# --- VMA enrollment -------------------------------------------------------------------------------
def test_vma_pairing_code_approve_list_revoke_and_reject(omactl, oma_server, db):
    keys_file = oma_server.runtime.settings.data_dir / "tunnel" / "authorized_keys"
    code = omactl("vma", "pairing-code", "--valid-for", "900")
    assert code.code == 0, code.err
    pairing_code = code.out.split("pairing code: ", 1)[1].split()[0]
    assert "valid for 15m00s" in code.out
    assert code_row(oma_server, pairing_code).used_at is None

    with OmaClient(f"127.0.0.1:{oma_server.port}", token="") as public:  # the VMA: no token
        site_a = Vma("vma-site-a")
        vma_enroll(public, site_a, pairing_code)
        assert vma_verify(public, site_a).status == "awaiting_approval"
        site_b = Vma("vma-site-b")
        vma_enroll(public, site_b, omactl("--json", "vma", "pairing-code").json()["pairing_code"])
        assert vma_verify(public, site_b).status == "awaiting_approval"

    pending = table_rows(omactl("vma", "pending").out)
    assert pending[0][:3] == ["ID", "VMA", "VERSION"]
    assert sorted((r[0], r[1]) for r in pending[1:]) == sorted(
        [(site_a.enrollment_id, "vma-site-a"), (site_b.enrollment_id, "vma-site-b")])

    approved = omactl("vma", "approve", "vma-site-a", "--notes", "rack 3")  # by name: one pending VMA has it
    assert approved.code == 0, approved.err
    assert approved.out.startswith("approved VMA vma-site-a (SHA256:") and \
        f"enrollment {site_a.enrollment_id}, tunnel user vma_tunnel, reverse port " in approved.out
    assert models.VmaEnrollment.get_by_id(site_a.enrollment_id).status == "approved"
    connection = models.VmaActiveConnection.get(models.VmaActiveConnection.enrollment == site_a.enrollment_id)
    assert connection.connection_status == "connected"
    assert site_a.blob_b64 in keys_file.read_text()

    rejected = omactl("vma", "reject", site_b.enrollment_id, "--reason", "unknown site")
    assert rejected.code == 0 and rejected.out.strip() == f"rejected VMA vma-site-b (enrollment {site_b.enrollment_id})"
    assert models.VmaEnrollment.get_by_id(site_b.enrollment_id).status == "rejected"
    assert omactl("vma", "reject", site_b.enrollment_id).code == cli.EXIT_USAGE  # --reason is required
    assert omactl("vma", "pending").out.strip() == "no VMA awaits approval"
    assert omactl("vma", "approve", "no-such-enrollment").code == EXIT_NOT_FOUND

    connections = table_rows(omactl("vma", "list").out)
    assert connections[0][:3] == ["ENROLLMENT ID", "VMA", "STATUS"]
    assert [(r[0], r[1], r[2]) for r in connections[1:]] == [(site_a.enrollment_id, "vma-site-a", "connected")]

    revoked = omactl("vma", "revoke", site_a.enrollment_id, "--reason", "decommissioned")
    assert revoked.code == 0 and revoked.out.startswith(f"revoked VMA vma-site-a (enrollment {site_a.enrollment_id})")
    assert models.VmaActiveConnection.get_by_id(connection.id).connection_status == "revoked"
    assert site_a.blob_b64 not in keys_file.read_text()
    assert omactl("vma", "list").out.strip() == "no VMA connections"
    everything = omactl("--json", "vma", "list", "--all").json()["connections"]
    assert [(c["enrollment_id"], c["connection_status"], c["revoked_by"]) for c in everything] == [
        (site_a.enrollment_id, "revoked", "admin")]
    assert omactl("vma", "revoke", site_a.enrollment_id).code == EXIT_FAILED_PRECONDITION

    trail = table_rows(omactl("vma", "audit", "--enrollment", site_a.enrollment_id).out)
    assert trail[0][:3] == ["TIME", "EVENT", "BY"]
    assert [r[1] for r in reversed(trail[1:])] == ["enrollment", "verification", "approval", "revocation"]
    assert "reason=decommissioned" in trail[1][-1]
    events = omactl("--json", "vma", "audit", "--type", "rejection").json()["events"]
    assert [(e["enrollment_id"], e["event_details"]["reason"]) for e in events] == [
        (site_b.enrollment_id, "unknown site")]
    assert pairing_code not in omactl("vma", "audit").out  # codes are never in the audit trail


# --- the RPC each new command calls ----------------------------------------------------------------
COMMAND_RPCS = {
    ("failover", "test", "web-01"): "FailoverService.StartTestFailover",
    ("failover", "live", "web-01", "--yes"): "FailoverService.StartLiveFailover",
    ("failover", "rollback", "web-01", "--type", "test"): "FailoverService.StartRollback",
    ("failover", "cleanup-failed", "web-01"): "FailoverService.CleanupFailedExecution",
    ("failover", "end", "web-01"): "FailoverService.CleanupTestFailover",
    ("failover", "end", "job-1"): "FailoverService.EndTestFailover",
    ("failover", "status", "job-1"): "FailoverService.GetFailoverStatus",
    ("failover", "list"): "FailoverService.ListFailoverJobs",
    ("failover", "watch", "job-1"): "FailoverService.WatchFailoverJob",
    ("readiness", "web-01"): "FailoverService.GetFailoverReadiness",
    ("schedules", "create", "n", "--cron", "0 2 * * *"): "ScheduleService.CreateSchedule",
    ("schedules", "list"): "ScheduleService.ListSchedules",
    ("schedules", "status"): "ScheduleService.GetSchedulerStatus",
    ("vma", "pairing-code"): "EnrollmentAdminService.GeneratePairingCode",
    ("vma", "pending"): "EnrollmentAdminService.ListPendingEnrollments",
    ("vma", "list"): "EnrollmentAdminService.ListActiveVMAs",
    ("vma", "audit"): "EnrollmentAdminService.GetAuditLog",
}


def test_each_new_command_names_the_rpc_it_calls(run_omactl, oma_factory, monkeypatch, db):
    every_servicer = server_module.build_servicers
    monkeypatch.setattr(server_module, "build_servicers", lambda runtime, parts: [
        s for s in every_servicer(runtime, parts) if service_of(s) in {"oma.v1.AuthService", "oma.v1.VMContextService"}])
    omactl = _login(run_omactl, oma_factory().port)
    add_vm("web-01")
    for argv, rpc in COMMAND_RPCS.items():
        result = omactl(*argv)
        assert (result.code, result.err.strip()) == (
            EXIT_UNIMPLEMENTED, f"error: UNIMPLEMENTED: oma.v1.{rpc} is not built yet"), argv


# --- rendering of failover progress ---------------------------------------------------------------
def _update(status: str, steps: list[tuple[str, str, str]], *, terminal: bool = False,
            expected: int = 3) -> fpb.WatchFailoverJobResponse:
    update = fpb.WatchFailoverJobResponse(terminal=terminal)
    job = update.job
    job.job_id, job.operation, job.status, job.context_id = "job-7", "unified-test-failover", status, "ctx-1"
    job.metadata.update({"vm_name": "web-01", **({"expected_steps": expected} if expected else {})})
    for seq, (name, display, step_status) in enumerate(steps, 1):
        step = job.steps.add(seq=seq, name=name, display_name=display, status=step_status)
        step.started_at.FromSeconds(1_700_000_000 + seq)
        if step_status != "running":
            step.completed_at.FromSeconds(1_700_000_002 + seq)
    job.completed_steps = sum(1 for s in steps if s[2] == "completed")
    job.progress_percent = round(100 * job.completed_steps / 3)
    return update


def test_failover_progress_plain_lines_and_terminal_redraw(monkeypatch):
    validation = ("validation", "Pre-flight Validation")
    create = ("vm-creation", "Creating Destination VM")
    updates = [
        _update("running", [(*validation, "running")]),
        _update("running", [(*validation, "running")]),  # nothing changed: nothing printed
        _update("running", [(*validation, "completed"), (*create, "running")]),
        _update("completed", [(*validation, "completed"), (*create, "completed"),
                              ("status-update", "Updating VM Status", "skipped")], terminal=True),
    ]
    plain = io.StringIO()
    display = progress.FailoverPlainDisplay(plain)
    for update in updates:
        display.update(update)
    lines = [line.split(" ", 1)[1] for line in plain.getvalue().splitlines()]  # without the time stamp
    assert lines == [
        "web-01  unified-test-failover  job job-7  running  0%  0/3 steps",
        "  [ 1/3] Pre-flight Validation  ...",
        "  [ 1/3] Pre-flight Validation  done  2s",
        "  [ 2/3] Creating Destination VM  ...",
        "  [ 2/3] Creating Destination VM  done  2s",
        "  [ 3/3] Updating VM Status  skipped  2s",
        "web-01  unified-test-failover  job job-7  completed  67%  2/3 steps",
    ]

    # A job whose workflow does not say how many steps it will have (a cleanup): no "n of ?" guesses.
    unknown = io.StringIO()
    progress.FailoverPlainDisplay(unknown).update(
        _update("running", [(*validation, "completed"), (*create, "running")], expected=0))
    assert [line.split(" ", 1)[1] for line in unknown.getvalue().splitlines()] == [
        "web-01  unified-test-failover  job job-7  running  1 step done",
        "  [ 1] Pre-flight Validation  done  2s",
        "  [ 2] Creating Destination VM  ...",
    ]

    monkeypatch.setenv("COLUMNS", "200")
    screen = io.StringIO()
    terminal = progress.FailoverTerminalDisplay(screen)
    terminal.update(updates[0])
    terminal.update(updates[2])
    first, second = screen.getvalue().split("\x1b[2F\x1b[J")  # the second draw: up 2 lines, clear
    assert first.splitlines()[1] == "  [ 1/3] Pre-flight Validation  ..."
    assert second.splitlines()[1:] == ["  [ 1/3] Pre-flight Validation  done  2s",
                                       "  [ 2/3] Creating Destination VM  ..."]


def test_a_stopped_watch_leaves_the_failover_running(omactl, monkeypatch, db):
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(progress, "follow_failover", interrupted)
    stopped = omactl("failover", "watch", "job-1")
    assert stopped.code == cli.EXIT_INTERRUPTED
    assert "job job-1 keeps running. Resume with: omactl failover watch job-1" in stopped.err


def test_a_failed_job_exits_1_naming_the_failed_step(omactl, monkeypatch, db):
    create = ("vm-creation", "Creating Destination VM")
    final = _update("failed", [("validation", "Pre-flight Validation", "completed"), (*create, "failed")],
                    terminal=True)
    final.job.error_message = final.job.steps[1].error_message = "no capacity in zone-a"
    monkeypatch.setattr(progress, "follow_failover", lambda client, job_id, display: display.update(final) or final)
    failed = omactl("failover", "watch", "job-7")
    assert failed.code == cli.EXIT_FAILED
    assert failed.out.strip() == ("unified-test-failover of web-01: job job-7 failed at step 'Creating Destination VM': "
                                  "no capacity in zone-a")
    assert "[ 2/3] Creating Destination VM  FAILED" in failed.err
