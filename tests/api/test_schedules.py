"""ScheduleService CRUD (mapping: "Schedules CRUD → reads/writes replication_schedules") and the
execution listing ("Executions → … reads summary views"): defaults that keep explicit false/zero
values, full validation at write time (cron 5 or 6 seconds-first fields, IANA time zones, ranges,
unique names, chains without cycles), the delete guard, enable/disable re-registering the schedule,
next execution evaluated in the schedule's time zone across DST, counts and paging."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import grpc
import pytest
from oma.v1 import machine_groups_pb2 as mg
from oma.v1 import schedules_pb2 as pb

from oma_server.db import models
from oma_server.domain.schedules import next_fire
from tests import factories

Code = grpc.StatusCode


def _error(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def _create(oma, name="nightly", **kw):
    kw.setdefault("cron_expression", "0 2 * * *")
    return oma.schedules.CreateSchedule(pb.CreateScheduleRequest(name=name, **kw), timeout=10).schedule


def _get(oma, schedule_id):
    return oma.schedules.GetSchedule(pb.GetScheduleRequest(id=schedule_id), timeout=10).schedule


def _registrations(oma):
    status = oma.schedules.GetSchedulerStatus(pb.GetSchedulerStatusRequest(), timeout=10)
    return {r.schedule_id: r for r in status.registrations}


def _local(ts, zone):
    return ts.ToDatetime(tzinfo=timezone.utc).astimezone(ZoneInfo(zone))


def test_create_applies_defaults_and_keeps_explicit_false_values(oma):
    nightly = _create(oma, description="every night")
    row = models.ReplicationSchedule.get_by_id(nightly.id)
    assert (row.schedule_type, row.timezone, row.replication_type, row.max_concurrent_jobs, row.retry_attempts,
            row.retry_delay_minutes, row.enabled, row.skip_if_running, row.created_by) == \
        ("cron", "UTC", "auto", 1, 3, 30, True, True, "admin")
    assert len(nightly.id) == 36 and nightly.description == "every night" and nightly.HasField("next_execution")
    assert _local(nightly.next_execution, "UTC").strftime("%H:%M:%S") == "02:00:00"

    paused = _create(oma, "paused", enabled=False, skip_if_running=False, retry_attempts=0, retry_delay_minutes=0,
                     replication_type="full", created_by="ops")
    row = models.ReplicationSchedule.get_by_id(paused.id)
    assert (row.enabled, row.skip_if_running, row.retry_attempts, row.retry_delay_minutes, row.replication_type,
            row.created_by) == (False, False, 0, 0, "full", "ops")
    assert not paused.HasField("next_execution")  # disabled: never fires
    assert set(_registrations(oma)) == {nightly.id}

    jobs = list(models.JobTracking.select().order_by(models.JobTracking.started_at))
    assert [(j.job_type, j.operation, j.status) for j in jobs] == \
        [("schedule_management", "create-schedule", "completed")] * 2


@pytest.mark.parametrize("fields,code,text", [
    (dict(cron_expression=""), Code.INVALID_ARGUMENT, "cron_expression is required"),
    (dict(cron_expression="* * * *"), Code.INVALID_ARGUMENT, "must have 5 fields"),
    (dict(cron_expression="0 0 2 * * * 2030"), Code.INVALID_ARGUMENT, "must have 5 fields"),
    (dict(cron_expression="61 * * * *"), Code.INVALID_ARGUMENT, "is not valid"),
    (dict(cron_expression="0 0 31 2 *"), Code.INVALID_ARGUMENT, "is not valid"),  # never fires
    (dict(cron_expression="@every 1h"), Code.INVALID_ARGUMENT, "must have 5 fields"),
    (dict(timezone="Mars/Olympus"), Code.INVALID_ARGUMENT, "IANA"),
    (dict(max_concurrent_jobs=0), Code.INVALID_ARGUMENT, "between 1 and 100"),
    (dict(max_concurrent_jobs=101), Code.INVALID_ARGUMENT, "between 1 and 100"),
    (dict(retry_attempts=-1), Code.INVALID_ARGUMENT, "retry_attempts"),
    (dict(retry_delay_minutes=-1), Code.INVALID_ARGUMENT, "retry_delay_minutes"),
    (dict(chain_delay_minutes=-5), Code.INVALID_ARGUMENT, "chain_delay_minutes"),
    (dict(replication_type="differential"), Code.INVALID_ARGUMENT, "replication_type"),
    (dict(schedule_type="hourly"), Code.INVALID_ARGUMENT, "schedule_type"),
    (dict(name=" "), Code.INVALID_ARGUMENT, "name is required"),
    (dict(name="existing"), Code.ALREADY_EXISTS, "already exists"),
    (dict(schedule_type="chain", cron_expression=""), Code.INVALID_ARGUMENT, "needs chain_parent_schedule_id"),
    (dict(schedule_type="chain", chain_parent_schedule_id="missing"), Code.NOT_FOUND, "no schedule"),
    (dict(chain_parent_schedule_id="existing-id"), Code.INVALID_ARGUMENT, "only for chain schedules"),
])
def test_bad_schedules_are_rejected_and_write_nothing(oma, fields, code, text):
    existing = _create(oma, "existing")
    fields = {k: existing.id if v == "existing-id" else v for k, v in fields.items()}
    fields.setdefault("name", "new")
    before = factories.db_snapshot()
    got, details = _error(lambda: _create(oma, **fields))
    assert got == code and text in details, details
    assert factories.db_snapshot() == before


def test_six_field_expressions_put_the_seconds_first(oma):
    schedule = _create(oma, cron_expression="15 30 4 * * *")
    assert schedule.cron_expression == "15 30 4 * * *"  # stored as given
    assert _local(schedule.next_execution, "UTC").strftime("%H:%M:%S") == "04:30:15"
    assert _create(oma, "daily", cron_expression="@daily").HasField("next_execution")


def test_next_execution_is_evaluated_in_the_schedule_time_zone_across_dst(oma):
    berlin = "Europe/Berlin"
    # Spring forward (2024-03-31, 02:00 → 03:00): the skipped 02:30 fires when the clock jumps.
    assert next_fire("30 2 * * *", berlin, datetime(2024, 3, 30, 12)) == datetime(2024, 3, 31, 1, 0)
    assert next_fire("30 2 * * *", berlin, datetime(2024, 3, 31, 1, 0)) == datetime(2024, 4, 1, 0, 30)
    # Fall back (2024-10-27, 03:00 → 02:00): 02:30 happens twice and fires once, the next day in CET.
    assert next_fire("30 2 * * *", berlin, datetime(2024, 10, 26, 12)) == datetime(2024, 10, 27, 0, 30)
    assert next_fire("30 2 * * *", berlin, datetime(2024, 10, 27, 0, 30)) == datetime(2024, 10, 28, 1, 30)
    # An hourly schedule keeps its real interval through the repeated hour.
    fires, t = [], datetime(2024, 10, 26, 23, 30)
    for _ in range(4):
        t = next_fire("0 * * * *", berlin, t)
        fires.append(t.hour)
    assert fires == [0, 1, 2, 3]  # 02:00 CEST, 02:00 CET, 03:00 CET, 04:00 CET
    # New York: 09:15 local is 13:15 UTC in summer and 14:15 UTC in winter (six fields, seconds first).
    assert next_fire("0 15 9 * * *", "America/New_York", datetime(2024, 7, 1)) == datetime(2024, 7, 1, 13, 15)
    assert next_fire("0 15 9 * * *", "America/New_York", datetime(2024, 12, 1)) == datetime(2024, 12, 1, 14, 15)

    schedule = _create(oma, cron_expression="15 9 * * *", timezone="America/New_York")
    local = _local(schedule.next_execution, "America/New_York")
    assert local.strftime("%H:%M") == "09:15"
    assert timedelta(0) < local - datetime.now(timezone.utc) <= timedelta(days=1)
    registered = _registrations(oma)[schedule.id]
    assert registered.next_run == schedule.next_execution


def test_update_is_partial_revalidated_and_re_registers(oma):
    schedule = _create(oma, description="keep me", max_concurrent_jobs=4)
    _create(oma, "other")
    updated = oma.schedules.UpdateSchedule(pb.UpdateScheduleRequest(
        id=schedule.id, cron_expression="0 0 6 * * *", timezone="Asia/Tokyo", max_concurrent_jobs=2), timeout=10).schedule
    row = models.ReplicationSchedule.get_by_id(schedule.id)
    assert (row.cron_expression, row.timezone, row.max_concurrent_jobs, row.description) == \
        ("0 0 6 * * *", "Asia/Tokyo", 2, "keep me")
    assert _local(updated.next_execution, "Asia/Tokyo").strftime("%H:%M") == "06:00"
    assert _registrations(oma)[schedule.id].next_run == updated.next_execution  # re-registered at once

    before = factories.db_snapshot()
    for request, code in ((pb.UpdateScheduleRequest(id=schedule.id), Code.INVALID_ARGUMENT),  # no fields
                          (pb.UpdateScheduleRequest(id=schedule.id, cron_expression="bad"), Code.INVALID_ARGUMENT),
                          (pb.UpdateScheduleRequest(id=schedule.id, timezone="Nowhere"), Code.INVALID_ARGUMENT),
                          (pb.UpdateScheduleRequest(id=schedule.id, retry_attempts=11), Code.INVALID_ARGUMENT),
                          (pb.UpdateScheduleRequest(id=schedule.id, name="other"), Code.ALREADY_EXISTS),
                          (pb.UpdateScheduleRequest(id="missing", enabled=True), Code.NOT_FOUND)):
        assert _error(lambda: oma.schedules.UpdateSchedule(request, timeout=10))[0] == code, request
    assert factories.db_snapshot() == before

    disabled = oma.schedules.UpdateSchedule(pb.UpdateScheduleRequest(id=schedule.id, enabled=False), timeout=10)
    assert not disabled.schedule.HasField("next_execution") and schedule.id not in _registrations(oma)
    ops = [j.operation for j in models.JobTracking.select().order_by(models.JobTracking.started_at)]
    assert ops == ["create-schedule", "create-schedule", "update-schedule", "update-schedule"]


def test_chain_schedules_must_not_form_a_cycle(oma):
    root = _create(oma, "root")
    a = _create(oma, "a", schedule_type="chain", cron_expression="", chain_parent_schedule_id=root.id,
                chain_delay_minutes=15)
    b = _create(oma, "b", schedule_type="chain", cron_expression="", chain_parent_schedule_id=a.id)
    assert (a.schedule_type, a.chain_parent_schedule_id, a.chain_delay_minutes) == ("chain", root.id, 15)
    code, details = _error(lambda: oma.schedules.UpdateSchedule(pb.UpdateScheduleRequest(
        id=a.id, chain_parent_schedule_id=b.id), timeout=10))
    assert code == Code.INVALID_ARGUMENT and "cycle" in details
    assert _error(lambda: oma.schedules.UpdateSchedule(pb.UpdateScheduleRequest(
        id=a.id, chain_parent_schedule_id=a.id), timeout=10))[0] == Code.INVALID_ARGUMENT
    # Back to a cron schedule: the parent must go and the expression must be valid.
    assert _error(lambda: oma.schedules.UpdateSchedule(pb.UpdateScheduleRequest(
        id=b.id, schedule_type="cron"), timeout=10))[0] == Code.INVALID_ARGUMENT
    cron = oma.schedules.UpdateSchedule(pb.UpdateScheduleRequest(
        id=b.id, schedule_type="cron", chain_parent_schedule_id="", cron_expression="0 4 * * *"), timeout=10).schedule
    assert cron.schedule_type == "cron" and not cron.chain_parent_schedule_id and cron.HasField("next_execution")


def test_delete_is_refused_while_groups_use_the_schedule(oma):
    schedule = _create(oma)
    group = oma.groups.CreateGroup(mg.CreateGroupRequest(name="gold", schedule_id=schedule.id), timeout=10).group
    models.ScheduleExecution.create(schedule=schedule.id, scheduled_at=models.utcnow(), status="completed")
    code, details = _error(lambda: oma.schedules.DeleteSchedule(pb.DeleteScheduleRequest(id=schedule.id), timeout=10))
    assert code == Code.FAILED_PRECONDITION
    assert details == "cannot delete schedule 'nightly': 1 machine groups are still using this schedule"

    oma.groups.UpdateGroup(mg.UpdateGroupRequest(id=group.id, schedule_id=""), timeout=10)
    oma.schedules.DeleteSchedule(pb.DeleteScheduleRequest(id=schedule.id), timeout=10)
    assert models.ReplicationSchedule.select().count() == 0 and models.ScheduleExecution.select().count() == 0
    assert schedule.id not in _registrations(oma)
    assert _error(lambda: oma.schedules.DeleteSchedule(pb.DeleteScheduleRequest(id=schedule.id), timeout=10))[0] == \
        Code.NOT_FOUND


def test_enable_and_disable(oma):
    schedule = _create(oma, enabled=False)
    assert schedule.id not in _registrations(oma)
    code, details = _error(lambda: oma.schedules.TriggerSchedule(pb.TriggerScheduleRequest(id=schedule.id), timeout=10))
    assert code == Code.FAILED_PRECONDITION and "cannot trigger disabled schedule" in details

    enabled = oma.schedules.SetScheduleEnabled(pb.SetScheduleEnabledRequest(id=schedule.id, enabled=True), timeout=10)
    assert enabled.schedule.enabled and enabled.schedule.HasField("next_execution")
    assert _registrations(oma)[schedule.id].next_run == enabled.schedule.next_execution
    disabled = oma.schedules.SetScheduleEnabled(pb.SetScheduleEnabledRequest(id=schedule.id), timeout=10)
    assert not disabled.schedule.enabled and schedule.id not in _registrations(oma)
    controls = models.JobTracking.select().where(models.JobTracking.job_type == "schedule_control")
    assert [(j.operation, j.metadata["enabled"]) for j in controls.order_by(models.JobTracking.started_at)] == \
        [("enable-schedule", True), ("enable-schedule", False)]
    assert _error(lambda: oma.schedules.SetScheduleEnabled(pb.SetScheduleEnabledRequest(id="missing"), timeout=10))[0] \
        == Code.NOT_FOUND


def test_list_with_counts_and_paging(oma):
    nightly, weekly = _create(oma, "nightly"), _create(oma, "weekly", cron_expression="0 3 * * 0")
    _create(oma, "paused", enabled=False)
    gold = oma.groups.CreateGroup(mg.CreateGroupRequest(name="gold", schedule_id=nightly.id), timeout=10).group
    oma.groups.CreateGroup(mg.CreateGroupRequest(name="silver", schedule_id=nightly.id), timeout=10)
    a, b = factories.context(), factories.context()
    oma.groups.AssignVM(mg.AssignVMRequest(group_id=gold.id, vm_context_id=a.context_id), timeout=10)
    oma.groups.AssignVM(mg.AssignVMRequest(group_id=gold.id, vm_context_id=b.context_id, enabled=False), timeout=10)
    started = models.utcnow().replace(microsecond=0) - timedelta(hours=1)
    models.ScheduleExecution.create(schedule=nightly.id, scheduled_at=started, started_at=started, status="completed")

    listed = oma.schedules.ListSchedules(pb.ListSchedulesRequest(), timeout=10)
    assert [s.name for s in listed.schedules] == ["nightly", "paused", "weekly"]
    assert (listed.total_count, listed.enabled_count, listed.disabled_count) == (3, 2, 1)
    assert listed.HasField("retrieved_at") and not listed.next_page_token
    first = listed.schedules[0]
    assert (first.group_count, first.vm_count) == (2, 1)  # enabled members only
    assert first.last_execution.ToDatetime() == started
    assert (listed.schedules[2].group_count, listed.schedules[2].vm_count) == (0, 0)
    assert not listed.schedules[2].HasField("last_execution")
    assert _get(oma, weekly.id).next_execution.ToDatetime().weekday() == 6  # Sunday

    enabled = oma.schedules.ListSchedules(pb.ListSchedulesRequest(enabled_only=True, page_size=1), timeout=10)
    assert [s.name for s in enabled.schedules] == ["nightly"] and enabled.total_count == 2
    rest = oma.schedules.ListSchedules(pb.ListSchedulesRequest(
        enabled_only=True, page_size=1, page_token=enabled.next_page_token), timeout=10)
    assert [s.name for s in rest.schedules] == ["weekly"] and not rest.next_page_token
    assert models.JobTracking.select().where(models.JobTracking.job_type == "schedule_management").count() == 3


def test_executions_listing_pages_filters_and_derives_the_type(oma):
    schedule = _create(oma)
    base = models.utcnow().replace(microsecond=0) - timedelta(days=1)
    rows = [("scheduler-service", "completed", 4, 3, {"vms_processed": 5}),
            ("chain", "completed", 0, 0, None),
            ("alice", "failed", 2, 0, None),
            ("scheduler", "skipped", 0, 0, None),
            ("scheduler-service", "cancelled", 0, 0, None)]
    for n, (by, status, created, completed, details) in enumerate(rows):
        at = base + timedelta(minutes=n)
        models.ScheduleExecution.create(
            id=f"e{n}", schedule=schedule.id, scheduled_at=at, started_at=at, completed_at=at + timedelta(seconds=7),
            status=status, triggered_by=by, jobs_created=created, jobs_completed=completed, execution_details=details)

    page = oma.schedules.ListScheduleExecutions(pb.ListScheduleExecutionsRequest(
        schedule_id=schedule.id, page_size=2), timeout=10)
    assert [e.id for e in page.executions] == ["e4", "e3"] and page.total_count == 5 and page.next_page_token
    rest = oma.schedules.ListScheduleExecutions(pb.ListScheduleExecutionsRequest(
        schedule_id=schedule.id, page_size=2, page_token=page.next_page_token), timeout=10)
    assert [e.id for e in rest.executions] == ["e2", "e1"]
    everything = oma.schedules.ListScheduleExecutions(pb.ListScheduleExecutionsRequest(schedule_id=schedule.id),
                                                      timeout=10)
    by_id = {e.id: e for e in everything.executions}
    assert [by_id[f"e{n}"].execution_type for n in range(5)] == ["scheduled", "chain", "manual", "scheduled", "scheduled"]
    e0 = by_id["e0"]
    assert (e0.schedule_name, e0.success_rate_percent, e0.jobs_completed, e0.vms_processed) == ("nightly", 75.0, 3, 5)
    assert e0.execution_duration_seconds == 7  # completed − started when not stored
    assert by_id["e2"].success_rate_percent == 0.0

    failed = oma.schedules.ListScheduleExecutions(pb.ListScheduleExecutionsRequest(
        schedule_id=schedule.id, status="failed"), timeout=10)
    assert [e.id for e in failed.executions] == ["e2"] and failed.total_count == 1
    for request, code in ((pb.ListScheduleExecutionsRequest(schedule_id="missing"), Code.NOT_FOUND),
                          (pb.ListScheduleExecutionsRequest(schedule_id=schedule.id, status="done"),
                           Code.INVALID_ARGUMENT),
                          (pb.ListScheduleExecutionsRequest(schedule_id=schedule.id, page_size=-1),
                           Code.INVALID_ARGUMENT)):
        assert _error(lambda: oma.schedules.ListScheduleExecutions(request, timeout=10))[0] == code
    assert models.JobTracking.select().where(models.JobTracking.job_type != "schedule_management").count() == 0
