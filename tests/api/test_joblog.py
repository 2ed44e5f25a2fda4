"""JobLog (mapping: all business operations use job_tracking, job_steps, job_execution_log,
log_events with context_id; JobLogService reads them)."""
from __future__ import annotations

import logging
import time

import grpc
import pytest
from oma.v1 import job_log_pb2 as pb

from oma_server import logs
from oma_server.db import models, views
from oma_server.domain import joblog
from oma_server.errors import InvalidArgument, NotFound
from oma_server.workflows.steps import JobLogRecorder, Step, run_steps


def test_steps_record_order_status_and_failures(db):
    job = joblog.start_job("migration", "replication", context_id="ctx-1", category="replication",
                           external_job_id="ext-1", expected_steps=4)
    with joblog.step(job, "prepare") as handle:
        handle.details["disks"] = 2
    joblog.skip_step(job, "optional", "not needed")
    with pytest.raises(joblog.StepFailed) as err:
        with joblog.step(job, "transfer"):
            raise NotFound("disk vanished")
    assert err.value.step == "transfer" and err.value.code == "NOT_FOUND" and "disk vanished" in err.value.message
    assert joblog.end_job(job, "failed", err.value.message)
    assert not joblog.end_job(job, "completed")  # a terminal job stays terminal

    steps = list(models.JobStep.select().where(models.JobStep.job == job).order_by(models.JobStep.seq))
    assert [(s.seq, s.name, s.status) for s in steps] == [
        (1, "prepare", "completed"), (2, "optional", "skipped"), (3, "transfer", "failed")]
    assert steps[0].metadata == {"disks": 2} and steps[2].error_message == "disk vanished"
    assert all(s.completed_at for s in steps)
    row = models.JobTracking.get_by_id(job)
    assert row.status == "failed" and row.completed_at and row.error_message.startswith("step 'transfer'")
    errors = list(models.JobExecutionLog.select().where(models.JobExecutionLog.job == job))
    assert [(e.log_level, e.operation_phase) for e in errors] == [("ERROR", "transfer")]
    progress = joblog.progress(row, steps)
    assert progress["total_steps"] == 4 and progress["step_completion_percentage"] == 50.0


def test_the_step_loop_records_each_step_and_stops_at_the_first_failure(db):
    job = joblog.start_job("migration", "flow")
    seen = []
    flow = [
        Step("one", lambda state, h: seen.append("one")),
        Step("skipped", lambda state, h: seen.append("skipped"), skip_if=lambda state: "not needed"),
        Step("two", lambda state, h: (_ for _ in ()).throw(RuntimeError("disk full"))),
        Step("three", lambda state, h: seen.append("three")),
    ]
    with pytest.raises(joblog.StepFailed) as err:
        run_steps(flow, None, JobLogRecorder(job))
    assert seen == ["one"] and err.value.step == "two" and err.value.code == "INTERNAL"
    rows = models.JobStep.select().where(models.JobStep.job == job).order_by(models.JobStep.seq)
    assert [(s.name, s.status) for s in rows] == [("one", "completed"), ("skipped", "skipped"), ("two", "failed")]
    assert rows[1].metadata == {"reason": "not needed"} and rows[2].error_message == "disk full"


def test_recorded_operation_is_all_or_nothing(db):
    with pytest.raises(InvalidArgument):
        with joblog.recorded_operation("group-management", "create-group", owner="t"):
            models.VmMachineGroup.create(name="half")
            raise InvalidArgument("bad")
    assert models.JobTracking.select().count() == 0 and models.VmMachineGroup.select().count() == 0
    with joblog.recorded_operation("group-management", "create-group", owner="t", context_id="c"):
        models.VmMachineGroup.create(name="whole")
    job = models.JobTracking.get()
    assert (job.status, job.context_id, [s.status for s in job.steps]) == ("completed", "c", ["completed"])


def test_active_jobs_view_counts_step_errors(db):
    job = joblog.start_job("failover", "unified-live-failover")
    with pytest.raises(joblog.StepFailed):
        with joblog.step(job, "vm-creation"):
            raise RuntimeError("quota")
    rows = {r["id"]: r for r in views.active_jobs()}
    assert rows[job]["error_count"] == 1 and rows[job]["status"] == "running"


def test_get_and_list_jobs_over_grpc(oma):
    a = joblog.start_job("migration", "replication", context_id="ctx-a", category="replication",
                         external_job_id="rep-a")
    with joblog.step(a, "transfer"):
        pass
    joblog.end_job(a, "completed")
    b = joblog.start_job("discovery", "bulk-add-vms", context_id="ctx-b", category="discovery")

    got = oma.jobs.GetJob(pb.GetJobRequest(job_id=a), timeout=5).job
    assert got.status == "completed" and [s.name for s in got.steps] == ["transfer"]
    assert got.progress.step_completion_percentage == 100.0 and got.progress.completed_steps == 1
    assert oma.jobs.GetJob(pb.GetJobRequest(job_id="rep-a"), timeout=5).job.id == a  # by external id

    by_ctx = oma.jobs.ListJobs(pb.ListJobsRequest(context_id="ctx-b"), timeout=5)
    assert [j.id for j in by_ctx.jobs] == [b] and by_ctx.count == 1
    running = oma.jobs.ListJobs(pb.ListJobsRequest(statuses=["running"]), timeout=5)
    assert [j.id for j in running.jobs] == [b] and not running.jobs[0].steps
    with_steps = oma.jobs.ListJobs(pb.ListJobsRequest(job_category="replication", include_steps=True), timeout=5)
    assert [s.name for s in with_steps.jobs[0].steps] == ["transfer"]

    for request in (pb.GetJobRequest(job_id="missing"),):
        with pytest.raises(grpc.RpcError) as err:
            oma.jobs.GetJob(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        oma.jobs.ListJobs(pb.ListJobsRequest(statuses=["sleeping"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_log_records_of_a_bound_job_reach_log_events(oma, oma_server):
    job = joblog.start_job("migration", "replication", external_job_id="ext-9")
    log = logging.getLogger("oma_server.test")
    log.setLevel(logging.INFO)
    with logs.bind(job_id=job, external_job_id="ext-9"):
        with joblog.step(job, "transfer"):
            log.info("copying disk-2000")
        log.warning("slow target")
        log.debug("not stored (below INFO)")
    log.info("not bound to a job: not stored")
    oma_server.components.log_events.flush()
    deadline = time.monotonic() + 5
    while models.LogEvent.select().count() < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    events = oma.jobs.GetJobLogs(pb.GetJobLogsRequest(job_id=job), timeout=5).events
    assert [(e.level, e.message) for e in events] == [("INFO", "copying disk-2000"), ("WARN", "slow target")]
    step_id = models.JobStep.get(models.JobStep.job == job).id
    assert events[0].step_id == step_id and events[1].step_id == 0
    assert all(e.external_job_id == "ext-9" for e in events)
    warn_only = oma.jobs.GetJobLogs(pb.GetJobLogsRequest(job_id=job, min_level="WARN"), timeout=5).events
    assert [e.message for e in warn_only] == ["slow target"]


def test_steps_of_unknown_job_are_refused(db):
    with pytest.raises(NotFound):
        with joblog.step("no-such-job", "x"):
            pass
    with pytest.raises(InvalidArgument):
        joblog.start_job("migration", "x", external_job_id="e" * 65)
