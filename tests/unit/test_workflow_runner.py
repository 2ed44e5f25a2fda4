"""The runner's pure rules, without a database or servers: the step loop, skips, stopping, error rules."""
from __future__ import annotations

import contextlib
import threading

import pytest

from oma_server.domain.joblog import StepFailed, StepHandle
from oma_server.errors import DeadlineExceeded, FailedPrecondition, NotFound
from oma_server.integrations.cloudstack import CloudStackError
from oma_server.workflows import error_rules
from oma_server.workflows.lease import Lease
from oma_server.workflows.runner import WorkflowRunner
from oma_server.workflows.steps import Step, Stopping, run_steps


class ListRecorder:
    """Records what the loop asks to record, in order, as (name, outcome[, detail])."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []
        self.scopes = 0

    @contextlib.contextmanager
    def scope(self):
        self.scopes += 1
        yield

    def skip(self, name: str, reason: str) -> None:
        self.rows.append((name, "skipped", reason))

    @contextlib.contextmanager
    def step(self, name: str):
        handle = StepHandle("job", len(self.rows), name, {})
        try:
            yield handle
        except Exception as exc:
            self.rows.append((name, "failed", str(exc)))
            raise StepFailed(name, exc) from exc
        self.rows.append((name, "completed", handle.details))


def _fail(message: str):
    def run(state, handle):
        raise FailedPrecondition(message)
    return run


def test_steps_run_in_order_and_a_skip_is_recorded_with_its_reason_instead_of_running():
    ran, notified = [], []
    flow = [Step("a", lambda s, h: (ran.append("a"), h.details.update(x=1))),
            Step("b", lambda s, h: ran.append("b"), skip_if=lambda s: "b is not needed" if s["skip_b"] else None),
            Step("c", lambda s, h: ran.append("c"), skip_if=lambda s: None)]
    recorder = ListRecorder()
    assert run_steps(flow, {"skip_b": True}, recorder, after_step=notified.append) == []
    assert ran == ["a", "c"]
    assert recorder.rows == [("a", "completed", {"x": 1}), ("b", "skipped", "b is not needed"), ("c", "completed", {})]
    assert notified == ["a", "b", "c"] and recorder.scopes == 3


def test_the_first_failure_stops_the_flow_and_names_its_step():
    ran = []
    flow = [Step("a", lambda s, h: ran.append("a")), Step("b", _fail("no disk")), Step("c", lambda s, h: ran.append("c"))]
    recorder = ListRecorder()
    with pytest.raises(StepFailed) as failed:
        run_steps(flow, None, recorder)
    assert ran == ["a"] and failed.value.step == "b" and failed.value.code == "FAILED_PRECONDITION"
    assert failed.value.message == "step 'b' failed: no disk"
    assert [r[:2] for r in recorder.rows] == [("a", "completed"), ("b", "failed")]


def test_keep_going_runs_every_step_and_returns_the_failures_in_order():
    ran = []
    flow = [Step("a", _fail("first")), Step("b", lambda s, h: ran.append("b")), Step("c", _fail("second"))]
    failures = run_steps(flow, None, ListRecorder(), keep_going=True)
    assert ran == ["b"] and [f.step for f in failures] == ["a", "c"]
    assert [f.message for f in failures] == ["step 'a' failed: first", "step 'c' failed: second"]


def test_a_stop_request_ends_the_flow_before_the_next_step_and_records_nothing_more():
    stop = []
    flow = [Step("a", lambda s, h: stop.append("the OMA is stopping")), Step("b", lambda s, h: None)]
    recorder = ListRecorder()
    with pytest.raises(Stopping, match="the OMA is stopping"):
        run_steps(flow, None, recorder, stop_reason=lambda: stop[0] if stop else None)
    assert recorder.rows == [("a", "completed", {})]


def test_a_skip_rule_is_asked_with_the_state_as_the_earlier_steps_left_it():
    flow = [Step("find", lambda s, h: s.update(found=[])),
            Step("destroy", lambda s, h: None, skip_if=lambda s: None if s["found"] else "nothing found")]
    recorder = ListRecorder()
    run_steps(flow, {"found": ["vm-1"]}, recorder)
    assert recorder.rows[-1] == ("destroy", "skipped", "nothing found")


# --- error rules: decided by the error's type, never by its text --------------------------------

@pytest.mark.parametrize("error,category,severity", [
    (error_rules.NotReady("snapshot volume network timeout"), "configuration", "warning"),
    (error_rules.SnapshotFailed("the VM is not ready"), "storage", "critical"),
    (error_rules.VolumeMoveFailed("x"), "storage", "error"),
    (error_rules.InjectionFailed("x"), "compatibility", "error"),
    (error_rules.NetworkUnusable("x"), "network", "error"),
    (error_rules.OfferingUnusable("x"), "configuration", "error"),
    (CloudStackError("injected deployVirtualMachine failure", cs_code=533), "platform", "error"),
    (CloudStackError("no such key", cs_code=401), "configuration", "error"),
    (CloudStackError("injected attachVolume failure", cs_code=530), "platform", "error"),
    (DeadlineExceeded("snapshot"), "connectivity", "error"),
    (NotFound("the VM is not ready"), "configuration", "error"),
    (error_rules.Interrupted("interrupted by restart"), "platform", "warning"),
    (RuntimeError("virtio injection snapshot"), "platform", "error"),
])
def test_errors_are_classified_by_type_whatever_their_message_says(error, category, severity):
    result = error_rules.classify(error)
    assert (result["error_category"], result["error_severity"]) == (category, severity)
    assert result["user_message"] and result["actionable_steps"]


def test_a_failed_step_is_classified_by_its_cause_and_cloudstack_codes_pick_the_message():
    failed = StepFailed("multi-volume-snapshot-creation", error_rules.SnapshotFailed("quota exceeded"))
    assert error_rules.classify(failed)["user_message"] == "Volume snapshots could not be created, reverted or deleted"
    capacity = error_rules.classify(CloudStackError("x", cs_code=533))["user_message"]
    refused = error_rules.classify(CloudStackError("insufficient capacity", cs_code=530))["user_message"]
    assert capacity == "CloudStack has no capacity for the VM" and refused == "CloudStack refused the operation"
    assert error_rules.classify(None)["user_message"] == "The operation failed"


def test_with_keep_going_a_later_skip_rule_sees_an_earlier_failure_at_once():
    problems: list[str] = []
    flow = [Step("revert", _fail("revert refused")),
            Step("delete-snapshots", lambda s, h: None, skip_if=lambda s: "kept for the cleanup" if problems else None)]
    recorder = ListRecorder()
    run_steps(flow, None, recorder, keep_going=True, on_failure=lambda failed: problems.append(failed.message))
    assert problems == ["step 'revert' failed: revert refused"]
    assert recorder.rows[-1] == ("delete-snapshots", "skipped", "kept for the cleanup")


# --- the runner: one run per job at a time, forgotten when it ends ------------------------------

def test_the_runner_runs_a_job_once_at_a_time_and_forgets_it_when_it_ends():
    runner = WorkflowRunner("test", 2, Lease(None, None, None, lambda: None, "oma-test", 3.0))
    gate, ran = threading.Event(), []
    assert runner.submit("job-1", lambda: (gate.wait(5), ran.append("job-1")), control="control-1")
    assert runner.is_running("job-1") and runner.control("job-1") == "control-1"
    assert not runner.submit("job-1", lambda: ran.append("twice"))  # already running here
    seen = runner.hub.version("job-1")
    gate.set()
    runner.hub.wait("job-1", seen, 5)  # the runner wakes watchers when the job ends
    assert ran == ["job-1"] and not runner.is_running("job-1") and runner.running() == {}
    runner.stop()
    assert runner.stopping.is_set() and not runner.submit("job-2", lambda: ran.append("job-2"))
    assert ran == ["job-1"] and not runner.is_running("job-2")


@pytest.mark.parametrize("lease_seconds,renew_every", [(0.3, 0.2), (3.0, 1.0), (60.0, 10.0)])
def test_leases_are_renewed_three_times_per_lease_but_at_least_every_ten_seconds(lease_seconds, renew_every):
    runner = WorkflowRunner("test", 1, Lease(None, None, None, lambda: None, "oma-test", lease_seconds))
    assert runner.renew_seconds == pytest.approx(renew_every)
    runner.stop()
