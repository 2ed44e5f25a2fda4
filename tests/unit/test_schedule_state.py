"""execution_details keeps its stored shape through ExecutionState: what the scheduler reads back is
written back the same (absent keys stay absent), and its changes land where the mapping says."""
from __future__ import annotations

import copy

from oma_server.domain.schedule_rules import Attempt, Conflict
from oma_server.domain.schedule_state import AttemptRecord, ChainFiring, ExecutionState

#: execution_details as the scheduler stores them after a dispatch with a failed first attempt and a
#: conflicted VM (every key the scheduler writes, including the ones it only records)
STORED = {
    "execution_id": "e-1", "schedule_id": "s-1", "schedule_name": "nightly", "triggered_by": "scheduler-service",
    "trigger_reason": None, "instance": "oma-a", "status": "completed", "job_id": "j-1",
    "vms": [
        {"vm_context_id": "c-1", "vm_name": "web01", "group_id": "g-1", "group_name": "web", "has_conflict": False,
         "can_schedule": True, "conflict_type": None, "conflict_reason": None, "skipped_reason": None,
         "current_job_id": None, "current_job_status": None,
         "attempts": [{"attempt": 1, "at": "2026-01-01T00:00:00.000Z", "result": "running", "job_id": "r-1"}]},
        {"vm_context_id": "c-2", "vm_name": "db01", "group_id": "g-1", "group_name": "web", "has_conflict": False,
         "can_schedule": True, "conflict_type": None, "conflict_reason": None, "skipped_reason": None,
         "current_job_id": None, "current_job_status": None,
         "attempts": [{"attempt": 1, "at": "2026-01-01T00:00:00.000Z", "result": "dispatch_failed",
                       "error": "no CloudStack configuration is active"}],
         "retry_at": "2026-01-01T00:05:00.000Z"},
        {"vm_context_id": "c-3", "vm_name": "old01", "group_id": "g-1", "group_name": "web", "has_conflict": True,
         "can_schedule": False, "conflict_type": "vm_disabled", "conflict_reason": "scheduling is disabled for this VM",
         "skipped_reason": "scheduling is disabled for this VM", "current_job_id": "r-0",
         "current_job_status": "replicating", "attempts": []},
    ],
    "groups": [{"group_id": "g-1", "group_name": "web", "vms_eligible": 3, "vms_processed": 3, "jobs_created": 1,
                "jobs_completed": 0, "jobs_failed": 1, "jobs_skipped": 1}],
    "summary": "3 VMs: 1 jobs created, 0 completed, 1 failed, 1 skipped", "vm_contexts_processed": ["c-1", "c-2", "c-3"],
    "created_job_ids": ["r-1"], "vms_eligible": 3, "vms_processed": 3, "jobs_created": 1, "jobs_completed": 0,
    "jobs_failed": 1, "jobs_skipped": 1, "group_id": "g-1", "started_at": "2026-01-01T00:00:00.000Z",
    "completed_at": "2026-01-01T00:00:01.000Z", "execution_time": "1s",
}


def test_the_stored_shape_survives_a_round_trip():
    assert ExecutionState.from_json(copy.deepcopy(STORED)).to_json() == STORED
    skipped = {"execution_id": "e-2", "schedule_id": "s-1", "schedule_name": "nightly", "triggered_by": "manual",
               "trigger_reason": "test", "instance": "oma-a", "status": "skipped", "skipped_reason": "cap",
               "summary": "skipped: cap"}
    assert ExecutionState.from_json(skipped).to_json() == skipped  # no vms/groups/chain keys appear
    assert ExecutionState.from_json(None).to_json() == {}


def test_the_scheduler_reads_attributes_and_writes_the_same_keys():
    state = ExecutionState.from_json(copy.deepcopy(STORED))
    web, db, old = state.vms
    assert (state.job_id, state.instance, state.schedule_name) == ("j-1", "oma-a", "nightly")
    assert [(vm, a.job_id) for vm, a in state.running_attempts()] == [(web, "r-1")]
    assert db.last_result == Attempt.DISPATCH_FAILED and not old.can_schedule and old.conflict_type == Conflict.VM_DISABLED
    assert state.waiting() and state.has_open_work()

    web.attempts[0].result, web.attempts[0].ended_at = Attempt.COMPLETED, "2026-01-01T01:00:00.000Z"
    db.retry_at = None
    db.attempts.append(AttemptRecord(2, "2026-01-01T00:05:00.000Z", Attempt.SKIPPED, conflict_type=Conflict.ACTIVE_JOB,
                                     reason="replication job r-9 of this VM started meanwhile"))
    counters = state.refresh_counters()
    state.settled_at = "2026-01-01T01:00:00.000Z"
    state.chain = [ChainFiring("s-2", "2026-01-01T01:10:00.000Z")]
    stored = state.to_json()

    assert not state.waiting() and state.has_open_work()  # the chain child has not fired yet
    assert stored["vms"][0]["attempts"] == [{"attempt": 1, "at": "2026-01-01T00:00:00.000Z", "result": "completed",
                                             "job_id": "r-1", "ended_at": "2026-01-01T01:00:00.000Z"}]
    assert "retry_at" not in stored["vms"][1]
    assert stored["vms"][1]["attempts"][1] == {"attempt": 2, "at": "2026-01-01T00:05:00.000Z", "result": "skipped",
                                               "conflict_type": "active_job",
                                               "reason": "replication job r-9 of this VM started meanwhile"}
    assert stored["chain"] == [{"schedule_id": "s-2", "due_at": "2026-01-01T01:10:00.000Z"}]
    assert (counters.jobs_completed, counters.jobs_failed, counters.jobs_skipped) == (1, 1, 2)
    assert stored["summary"] == "3 VMs: 1 jobs created, 1 completed, 1 failed, 2 skipped"
    assert stored["jobs_skipped"] == 2 and stored["created_job_ids"] == ["r-1"]
    assert counters.columns() == {"vms_eligible": 3, "jobs_created": 1, "jobs_completed": 1, "jobs_failed": 1,
                                  "jobs_skipped": 2}
    assert not state.every_vm_completed()  # db01's last attempt was skipped

    state.chain[0].execution_id = "e-3"
    assert not ExecutionState.from_json(state.to_json()).has_open_work()
    assert state.to_json()["chain"] == [{"schedule_id": "s-2", "due_at": "2026-01-01T01:10:00.000Z",
                                         "execution_id": "e-3"}]
