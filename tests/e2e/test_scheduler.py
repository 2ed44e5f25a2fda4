"""The scheduler on the real parts (mapping: "Executions → writes schedule_executions; reads summary
views"): a group's VMs replicated by a manual trigger through the whole lab, conflicts skipped per VM
and counted, timed firings from a seconds-first cron, skip_if_running and the global cap recorded as
skipped firings, retries and chain schedules, and start-up recovery of interrupted executions."""
from __future__ import annotations

import time
from datetime import timedelta

from oma.v1 import discovery_pb2, vm_contexts_pb2
from oma.v1 import machine_groups_pb2 as mg
from oma.v1 import schedules_pb2 as pb

from oma_server.db import models
from omaclient.client import OmaClient
from tests import factories
from tests.fixtures.servers import ADMIN_PASSWORD


def _wait(probe, timeout=60.0, interval=0.1):
    """Poll ``probe`` until it returns something truthy (and return it), or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(interval)


def _execution(execution_id):
    return models.ScheduleExecution.get_by_id(execution_id)


def _dispatched(execution_id, timeout=60.0):
    return _wait(lambda: (e := _execution(execution_id)).status != "running" and e, timeout)


def _settled(execution_id, timeout=60.0):
    return _wait(lambda: "settled_at" in ((e := _execution(execution_id)).execution_details or {}) and e, timeout)


def _schedule(client, name="nightly", **kw):
    kw.setdefault("cron_expression", "0 2 * * *")
    return client.schedules.CreateSchedule(pb.CreateScheduleRequest(name=name, **kw), timeout=10).schedule


def _group(client, schedule_id, context_ids, name="gold", **kw):
    group = client.groups.CreateGroup(mg.CreateGroupRequest(name=name, schedule_id=schedule_id, **kw), timeout=10).group
    for priority, context_id in enumerate(context_ids):
        client.groups.AssignVM(mg.AssignVMRequest(group_id=group.id, vm_context_id=context_id, priority=priority),
                               timeout=10)
    return group


def _trigger(client, schedule_id, reason=""):
    return client.schedules.TriggerSchedule(pb.TriggerScheduleRequest(id=schedule_id, reason=reason), timeout=10)


def _add(lab, names):
    added = lab.client.discovery.AddVMs(discovery_pb2.AddVMsRequest(
        source=discovery_pb2.VCenterSource(credential_id=lab.credential_id), vm_names=names), timeout=60)
    assert added.vms_added == len(names), added
    return {vm.vm_name: vm.context_id for vm in added.processed_vms}


def _vm_results(execution):
    return {vm["vm_name"]: vm for vm in execution.execution_details["vms"]}


# --- on the whole lab ----------------------------------------------------------------------------

def test_a_trigger_replicates_every_vm_of_the_group_and_counts_the_outcome(lab_private):
    lab = lab_private
    contexts = _add(lab, lab.vcenter.data_vms)
    schedule = _schedule(lab.client, max_concurrent_jobs=2)
    group = _group(lab.client, schedule.id, contexts.values())

    triggered = _trigger(lab.client, schedule.id, reason="before the weekend")
    assert (triggered.status, triggered.triggered_by, triggered.schedule_name) == ("running", "admin", "nightly")
    execution = _dispatched(triggered.execution_id)
    assert (execution.status, execution.jobs_created, execution.vms_eligible, execution.jobs_skipped) == \
        ("completed", 2, 2, 0), execution.execution_details
    assert execution.group_id == group.id and execution.triggered_by == "admin"
    jobs = list(models.ReplicationJob.select().where(models.ReplicationJob.schedule_execution == execution.id))
    assert sorted(j.vm_context_id for j in jobs) == sorted(contexts.values())
    assert all((j.vm_group_id, j.scheduled_by) == (group.id, "scheduler-service") for j in jobs)
    for job in jobs:
        assert list(lab.client.watch_replication(job.id, timeout=120))[-1].status == "completed"

    execution = _settled(execution.id)
    assert (execution.jobs_completed, execution.jobs_failed) == (2, 0)
    listed = lab.client.schedules.ListScheduleExecutions(
        pb.ListScheduleExecutionsRequest(schedule_id=schedule.id), timeout=10)
    item = listed.executions[0]
    assert listed.total_count == 1 and item.id == execution.id
    assert (item.jobs_created, item.jobs_completed, item.success_rate_percent, item.vms_processed) == (2, 2, 100.0, 2)
    assert (item.execution_type, item.triggered_by) == ("manual", "admin")
    assert item.execution_details["trigger_reason"] == "before the weekend"
    assert sorted(item.execution_details["created_job_ids"]) == sorted(j.id for j in jobs)

    # The JobLog: the execution's job, its conflict-detection child, and the replications under it.
    tracking = models.JobTracking.get_by_id(triggered.job_id)
    assert (tracking.job_type, tracking.operation, tracking.status, tracking.owner) == \
        ("scheduler", "schedule-execution", "completed", "scheduler-service")
    assert [s.name for s in tracking.steps.order_by(models.JobStep.seq)] == ["trigger-schedule", "dispatch-group"]
    children = {(c.job_type, c.operation) for c in tracking.children}
    assert children == {("conflict-detection", "check-vm-conflicts"), ("migration", "replication")}
    assert tracking.children.where(models.JobTracking.operation == "replication").count() == 2
    for context_id in contexts.values():
        ctx = models.VmReplicationContext.get_by_id(context_id)
        assert ctx.last_scheduled_job_id in {j.id for j in jobs} and ctx.next_scheduled_at is not None


def test_conflicts_are_skipped_per_vm_and_the_group_limit_counts_the_rest(lab_private):
    lab = lab_private
    replicated = lab.vcenter.data_vms[0]
    busy, disabled, over_limit = [n for n in lab.vm_names() if n != replicated][:3]
    contexts = _add(lab, [busy, disabled, replicated, over_limit])
    # busy: a replication job of another OMA process is active (its lease is fresh, nobody takes it over).
    job = factories.replication_job(models.VmReplicationContext.get_by_id(contexts[busy]), status="replicating",
                                    worker="another-oma", worker_heartbeat_at=models.utcnow())
    models.VmReplicationContext.update(current_job=job.id).where(
        models.VmReplicationContext.context_id == contexts[busy]).execute()
    lab.client.contexts.UpdateVMContext(vm_contexts_pb2.UpdateVMContextRequest(
        context_id=contexts[disabled], scheduler_enabled=False), timeout=10)
    schedule = _schedule(lab.client, max_concurrent_jobs=5)
    _group(lab.client, schedule.id, [contexts[n] for n in (busy, disabled, replicated, over_limit)],
           max_concurrent_vms=1)

    execution = _dispatched(_trigger(lab.client, schedule.id).execution_id)
    assert (execution.status, execution.vms_eligible, execution.jobs_created, execution.jobs_skipped) == \
        ("completed", 4, 1, 3)
    results = _vm_results(execution)
    assert {name: r["conflict_type"] for name, r in results.items()} == {
        busy: "skip_if_running", disabled: "vm_disabled", replicated: None, over_limit: "group_concurrent"}
    assert results[busy]["current_job_id"] == job.id and results[busy]["vm_context_id"] == contexts[busy]
    assert "max_concurrent_vms 1" in results[over_limit]["skipped_reason"]
    # The busy VM never got a second job; only the eligible one was replicated.
    jobs = models.ReplicationJob.select().where(models.ReplicationJob.schedule_execution == execution.id)
    assert [j.vm_context_id for j in jobs] == [contexts[replicated]]
    assert models.ReplicationJob.select().where(models.ReplicationJob.vm_context == contexts[busy]).count() == 1
    detection = models.JobTracking.get(models.JobTracking.operation == "check-vm-conflicts")
    analysis = detection.steps.where(models.JobStep.name == "analyze-vm-conflicts").get()
    assert analysis.metadata["conflict_counts"] == {"skip_if_running": 1, "vm_disabled": 1, "group_concurrent": 1}
    assert list(lab.client.watch_replication(jobs[0].id, timeout=120))[-1].status == "completed"
    assert _settled(execution.id).jobs_completed == 1


# --- the engine on its own -----------------------------------------------------------------------

def test_a_seconds_first_cron_fires_by_itself(oma):
    ctx = factories.context(scheduler_enabled=False)
    schedule = _schedule(oma, "every-second", cron_expression="* * * * * *", skip_if_running=False)
    _group(oma, schedule.id, [ctx.context_id])

    execution = _wait(lambda: models.ScheduleExecution.select().where(
        models.ScheduleExecution.schedule == schedule.id, models.ScheduleExecution.status != "running").first(), 10)
    status = oma.schedules.GetSchedulerStatus(pb.GetSchedulerStatusRequest(), timeout=10)
    assert status.is_running and status.active_schedules == 1 and status.max_concurrent_executions == 10
    registration = status.registrations[0]
    assert registration.schedule_name == "every-second" and registration.job_count >= 1
    assert registration.HasField("next_run") and registration.HasField("last_run")
    oma.schedules.SetScheduleEnabled(pb.SetScheduleEnabledRequest(id=schedule.id, enabled=False), timeout=10)
    assert oma.schedules.GetSchedulerStatus(pb.GetSchedulerStatusRequest(), timeout=10).active_schedules == 0

    assert (execution.triggered_by, execution.status, execution.jobs_skipped) == ("scheduler-service", "completed", 1)
    assert execution.scheduled_at.microsecond == 0  # the fire time, a whole second
    assert _vm_results(execution)[ctx.vm_name]["conflict_type"] == "vm_disabled"
    listed = oma.schedules.ListScheduleExecutions(pb.ListScheduleExecutionsRequest(schedule_id=schedule.id), timeout=10)
    assert {e.execution_type for e in listed.executions} == {"scheduled"}


def test_two_oma_processes_fire_a_clock_firing_once(oma_factory):
    servers = [oma_factory(instance_name=name, scheduler_reload_seconds=0.2) for name in ("oma-a", "oma-b")]
    client = OmaClient(f"127.0.0.1:{servers[0].port}", token="")
    client.login("admin", ADMIN_PASSWORD)
    try:
        schedule = _schedule(client, "every-second", cron_expression="* * * * * *", skip_if_running=False)
        _wait(lambda: all(s.components.scheduler.status().registrations for s in servers), 10)
        _wait(lambda: models.ScheduleExecution.select().where(
            models.ScheduleExecution.schedule == schedule.id).count() >= 3, 10)
        client.schedules.SetScheduleEnabled(pb.SetScheduleEnabledRequest(id=schedule.id, enabled=False), timeout=10)
    finally:
        client.close()
    fire_times = [e.scheduled_at for e in models.ScheduleExecution.select()]
    assert len(fire_times) == len(set(fire_times))


def test_a_membership_override_moves_the_vm_to_another_schedule(oma):
    main, other = _schedule(oma, "main"), _schedule(oma, "other")
    stays, moved = factories.context(scheduler_enabled=False), factories.context(scheduler_enabled=False)
    group = _group(oma, main.id, [stays.context_id])
    oma.groups.AssignVM(mg.AssignVMRequest(group_id=group.id, vm_context_id=moved.context_id,
                                           schedule_override_id=other.id), timeout=10)
    main_run = _dispatched(_trigger(oma, main.id).execution_id)
    other_run = _dispatched(_trigger(oma, other.id).execution_id)
    assert list(_vm_results(main_run)) == [stays.vm_name]
    assert list(_vm_results(other_run)) == [moved.vm_name]
    assert _vm_results(other_run)[moved.vm_name]["group_id"] == group.id


def test_skip_if_running_records_skipped_firings(oma):
    schedule = _schedule(oma)
    now = models.utcnow()
    # The previous execution is still running (dispatched by another OMA process).
    previous = models.ScheduleExecution.create(
        schedule=schedule.id, scheduled_at=now, started_at=now, status="running", triggered_by="scheduler-service",
        execution_details={"instance": "another-oma"})
    skipped = _trigger(oma, schedule.id)
    assert (skipped.status, skipped.job_id) == ("skipped", "")
    assert f"execution {previous.id} of this schedule is still running" in \
        _execution(skipped.execution_id).execution_details["skipped_reason"]

    # Its dispatch ended but a job it created is still active.
    models.ScheduleExecution.update(status="completed").where(models.ScheduleExecution.id == previous.id).execute()
    job = factories.replication_job(factories.context(), status="replicating", schedule_execution=previous.id,
                                    worker="another-oma", worker_heartbeat_at=now)
    skipped = _trigger(oma, schedule.id)
    assert skipped.status == "skipped"
    assert f"replication job {job.id} started by this schedule" in \
        _execution(skipped.execution_id).execution_details["skipped_reason"]
    assert models.JobTracking.select().where(models.JobTracking.operation == "schedule-execution").count() == 0

    oma.schedules.UpdateSchedule(pb.UpdateScheduleRequest(id=schedule.id, skip_if_running=False), timeout=10)
    accepted = _trigger(oma, schedule.id)
    assert accepted.status == "running" and accepted.job_id
    assert _dispatched(accepted.execution_id).status == "completed"


def test_the_global_cap_records_a_skipped_firing(oma_factory):
    server = oma_factory(scheduler_max_concurrent_executions=1)
    client = OmaClient(f"127.0.0.1:{server.port}", token="")
    client.login("admin", ADMIN_PASSWORD)
    try:
        busy, capped = _schedule(client, "busy"), _schedule(client, "capped")
        now = models.utcnow()
        models.ScheduleExecution.create(schedule=busy.id, scheduled_at=now, started_at=now, status="running",
                                        execution_details={"instance": "another-oma"})
        skipped = _trigger(client, capped.id)
        assert skipped.status == "skipped"
        assert "1 schedule executions are already running (limit 1)" in \
            _execution(skipped.execution_id).execution_details["skipped_reason"]
    finally:
        client.close()


def test_failed_dispatches_are_retried_within_the_execution(oma):
    ctx = factories.context()  # no CloudStack configuration: every dispatch fails
    schedule = _schedule(oma, retry_attempts=2, retry_delay_minutes=0)
    _group(oma, schedule.id, [ctx.context_id])

    triggered = _trigger(oma, schedule.id)
    execution = _settled(triggered.execution_id, timeout=20)
    attempts = _vm_results(execution)[ctx.vm_name]["attempts"]
    assert [(a["attempt"], a["result"]) for a in attempts] == \
        [(1, "dispatch_failed"), (2, "dispatch_failed"), (3, "dispatch_failed")]
    assert (execution.status, execution.jobs_created, execution.jobs_failed) == ("failed", 0, 3)
    assert execution.error_message.startswith(f"no replication could be started: {ctx.vm_name}: ")
    assert models.JobTracking.get_by_id(triggered.job_id).status == "failed"


def test_a_chain_schedule_fires_after_its_parent_settles(oma):
    parent = _schedule(oma, "parent")
    child = _schedule(oma, "child", cron_expression="", schedule_type="chain", chain_parent_schedule_id=parent.id)
    assert not child.HasField("next_execution")

    first = _trigger(oma, parent.id)
    chained = _wait(lambda: models.ScheduleExecution.get_or_none(models.ScheduleExecution.schedule == child.id), 20)
    assert chained.triggered_by == "chain"
    assert chained.execution_details["trigger_reason"] == f"after execution {first.execution_id}"
    assert _settled(first.execution_id).execution_details["chain"][0]["execution_id"] == chained.id
    listed = oma.schedules.ListScheduleExecutions(pb.ListScheduleExecutionsRequest(schedule_id=child.id), timeout=10)
    assert [e.execution_type for e in listed.executions] == ["chain"]


def test_a_restart_cancels_interrupted_executions(db, oma_factory):
    schedule = models.ReplicationSchedule.create(name="nightly", cron_expression="0 2 * * *")
    now = models.utcnow()

    def running(instance, started, **kw):
        return models.ScheduleExecution.create(schedule=schedule, scheduled_at=started, started_at=started,
                                               status="running", execution_details={"instance": instance, **kw})

    tracking = models.JobTracking.create(job_type="scheduler", operation="schedule-execution", status="running")
    mine = running("oma-a", now, job_id=tracking.id)
    dead = running("oma-b", now - timedelta(hours=1))
    alive = running("oma-c", now)

    oma_factory(instance_name="oma-a")
    assert (_execution(mine.id).status, _execution(dead.id).status, _execution(alive.id).status) == \
        ("cancelled", "cancelled", "running")
    assert _execution(mine.id).error_message.startswith("interrupted")
    assert models.JobTracking.get_by_id(tracking.id).status == "cancelled"
    start = models.JobTracking.get(models.JobTracking.operation == "service-start")
    assert [s.name for s in start.steps.order_by(models.JobStep.seq)] == ["load-schedules", "start-cron"]
    assert start.steps.order_by(models.JobStep.seq).first().metadata["interrupted_executions"] == 2
