"""The OMA database layer on SQLite and MariaDB: migrations, drift, constraints, cascades, field types and views.

Each test runs once per backend (fixture ``db``/``db_url`` from ``tests/fixtures/databases.py``).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from peewee import DatabaseError, IntegrityError, MySQLDatabase, SqliteDatabase
from playhouse.migrations import Runner

from oma_server.db import (
    connect,
    database_proxy,
    db_for_update,
    init_database,
    is_mysql,
    utcnow,
    views,
)
from oma_server.db.migrate import (
    HISTORY_TABLE,
    MIGRATIONS_DIR,
    migrate,
    schema_drift,
    status,
)
from oma_server.db.models import (
    ALL_MODELS,
    JOB_TERMINAL_STATUSES,
    REPLICATION_ACTIVE_STATUSES,
    TABLE_NAMES,
    ApiUser,
    CbtHistory,
    ContextStatus,
    DeviceMapping,
    FailoverJob,
    JobExecutionLog,
    JobStatus,
    JobStep,
    JobTracking,
    LinstorConfig,
    LogEvent,
    NbdExport,
    NetworkMapping,
    OsseaConfig,
    OsseaVolume,
    ReplicationJob,
    ReplicationSchedule,
    ScheduleExecution,
    VmaActiveConnection,
    VmaConnectionAudit,
    VmaEnrollment,
    VmaPairingCode,
    VmDisk,
    VmGroupMembership,
    VmMachineGroup,
    VmReplicationContext,
    VmwareCredential,
)
from tests.fixtures.databases import fresh_database_url

SPEC_TABLES = {
    "vm_replication_contexts", "replication_jobs", "vm_disks", "nbd_exports", "cbt_history", "vmware_credentials",
    "ossea_configs", "network_mappings", "ossea_volumes", "device_mappings", "failover_jobs",
    "replication_schedules", "schedule_executions", "vm_machine_groups", "vm_group_memberships", "job_tracking",
    "job_steps", "job_execution_log", "log_events", "vma_pairing_codes", "vma_enrollments",
    "vma_active_connections", "vma_connection_audit", "linstor_configs",
}


# ---------------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------------


def make_context(name="vm-1", vcenter="vc.example", **fields) -> VmReplicationContext:
    return VmReplicationContext.create(
        context_id=fields.pop("context_id", f"ctx-{name}-{vcenter}"), vm_name=name,
        vmware_vm_id=fields.pop("vmware_vm_id", f"uuid-{name}"), vm_path=f"/DC/vm/{name}",
        vcenter_host=vcenter, datacenter="DC", **fields)


def make_job(context, job_id="job-1", **fields) -> ReplicationJob:
    return ReplicationJob.create(
        id=job_id, vm_context=context, source_vm_id=context.vmware_vm_id, source_vm_name=context.vm_name,
        source_vm_path=context.vm_path, vcenter_host=context.vcenter_host, datacenter="DC",
        replication_type="initial", **fields)


def make_disk(context, job=None, disk_id="disk-2000") -> VmDisk:
    return VmDisk.create(vm_context=context, job=job, disk_id=disk_id, vmdk_path="[ds1] vm/vm.vmdk", size_gb=20)


def make_schedule(name="nightly", **fields) -> ReplicationSchedule:
    return ReplicationSchedule.create(name=name, cron_expression="0 0 2 * * *", **fields)


def make_enrollment(code="ABCD-EFGH-JKMN") -> VmaEnrollment:
    return VmaEnrollment.create(pairing_code=code, vma_public_key="ssh-ed25519 AAAA test",
                                expires_at=utcnow() + timedelta(minutes=10))


def count(model) -> int:
    return model.select().count()


# ---------------------------------------------------------------------------------------------------------------
# Migrations and drift
# ---------------------------------------------------------------------------------------------------------------


ALL_MIGRATIONS = sorted(p.stem for p in MIGRATIONS_DIR.glob("[0-9]*.py"))


def test_migration_from_empty_creates_schema_and_is_idempotent(db_url, request):
    kind = "sqlite" if db_url.startswith("sqlite") else "mariadb"
    server = request.getfixturevalue("mariadb_test_server") if kind == "mariadb" else None
    with fresh_database_url(kind, server) as url:
        database = connect(url)
        try:
            assert database.get_tables() == []
            assert migrate(database) == ALL_MIGRATIONS
            assert set(database.get_tables()) == SPEC_TABLES | {"api_users", "api_revoked_tokens", HISTORY_TABLE}
            assert TABLE_NAMES == SPEC_TABLES | {"api_users", "api_revoked_tokens"}
            assert {v.name for v in database.get_views()} == set(views.VIEW_NAMES)
            assert migrate(database) == []
            assert [(m.name, m.applied is not None) for m in status(database)] == [(m, True) for m in ALL_MIGRATIONS]
            assert schema_drift(database) == []

            runner = Runner(database, str(MIGRATIONS_DIR), table_name=HISTORY_TABLE)
            assert [runner.down() for _ in ALL_MIGRATIONS] == [[m] for m in reversed(ALL_MIGRATIONS)]
            assert database.get_tables() == [HISTORY_TABLE] and database.get_views() == []
        finally:
            database.close()


def test_second_migrate_applies_nothing_and_schema_matches_models(db):
    assert migrate(db) == []
    assert schema_drift(db) == []


def test_drift_check_reports_model_changes_without_migration(db, monkeypatch):
    monkeypatch.setattr(VmDisk.job, "null", False)
    monkeypatch.setattr(VmDisk.disk_id, "max_length", 100)
    monkeypatch.setattr(CbtHistory.job, "on_delete", "SET NULL")
    monkeypatch.setattr(JobStep.status, "allowed", ("running", "completed"))
    monkeypatch.setattr(LinstorConfig.api_port, "default", 3371)
    monkeypatch.setattr(VmReplicationContext.vm_path, "column_name", "vm_folder_path")

    problems = "\n".join(schema_drift(db))
    assert "vm_disks.job_id: NULL in the database, NOT NULL in the model" in problems
    assert "vm_disks.disk_id: type" in problems
    assert "cbt_history.job_id: foreign key → replication_jobs.id ON DELETE SET NULL missing" in problems
    assert "job_steps.status: CHECK values" in problems
    assert "linstor_configs.api_port: default 3370.0 in the database, 3371.0 in the model" in problems
    assert "add column vm_replication_contexts.vm_folder_path" in problems
    assert "drop column vm_replication_contexts.vm_path" in problems


# ---------------------------------------------------------------------------------------------------------------
# Cascades and SET NULL
# ---------------------------------------------------------------------------------------------------------------


def test_deleting_a_context_removes_everything_that_belongs_to_it(db):
    context = make_context()
    other = make_context("vm-2")
    job = make_job(context)
    VmReplicationContext.update(current_job=job, last_successful_job=job).execute()
    disk = make_disk(context, job)
    CbtHistory.create(vm_context=context, job=job, disk_id="disk-2000", change_id="52 3c/12", sync_type="full")
    mapping = DeviceMapping.create(vm_context=context, volume_uuid="vol-1", vm_id="oma-vm", device_path="/dev/vdb",
                                   cloudstack_state="attached", linux_state="present", size=10)
    NbdExport.create(vm_context=context, job=job, vm_disk=disk, device_mapping=mapping,
                     export_name="migration-vol-1", port=10809, device_path="/dev/vdb")
    OsseaVolume.create(vm_context=context, volume_id="vol-1", volume_name="migration-vm-1-disk-0", size_gb=25)
    NetworkMapping.create(vm_context=context, vm_id="vm-1", source_network_name="VM Network",
                          destination_network_id="net-1", destination_network_name="guest")
    FailoverJob.create(vm_context=context, job_id="fo-1", vm_id="uuid-vm-1", job_type="test", source_vm_name="vm-1")
    group = VmMachineGroup.create(name="g1")
    VmGroupMembership.create(group=group, vm_context=context)
    VmGroupMembership.create(group=group, vm_context=other)

    context.delete_instance()

    for model in (ReplicationJob, VmDisk, CbtHistory, NbdExport, OsseaVolume, DeviceMapping, NetworkMapping,
                  FailoverJob):
        assert count(model) == 0, model._meta.table_name
    assert [m.vm_context_id for m in VmGroupMembership.select()] == [other.context_id]
    assert count(VmReplicationContext) == 1 and count(VmMachineGroup) == 1


def test_deleting_a_job_keeps_disks_and_clears_references(db):
    context = make_context()
    old, current = make_job(context, "job-old"), make_job(context, "job-new")
    VmReplicationContext.update(current_job=current, last_successful_job=current).execute()
    disk = make_disk(context, current)
    VmDisk.update(disk_change_id="52 3c/7").where(VmDisk.id == disk.id).execute()
    for job in (old, current):
        CbtHistory.create(vm_context=context, job=job, disk_id="disk-2000", change_id="52 3c/7", sync_type="full")
        NbdExport.create(vm_context=context, job=job, export_name=f"migration-vol-{job.id}", port=10809,
                         device_path="/dev/vdb")

    current.delete_instance()

    kept = VmDisk.get_by_id(disk.id)
    assert kept.job_id is None and kept.disk_change_id == "52 3c/7"
    assert [row.job_id for row in CbtHistory.select()] == ["job-old"]
    assert [row.job_id for row in NbdExport.select()] == ["job-old"]
    refreshed = VmReplicationContext.get_by_id(context.context_id)
    assert refreshed.current_job_id is None and refreshed.last_successful_job_id is None


def test_deleting_a_group_cascades_its_memberships(db):
    context = make_context()
    kept_group, dropped_group = VmMachineGroup.create(name="keep"), VmMachineGroup.create(name="drop")
    VmGroupMembership.create(group=kept_group, vm_context=context)
    VmGroupMembership.create(group=dropped_group, vm_context=context)

    dropped_group.delete_instance()

    assert [m.group_id for m in VmGroupMembership.select()] == [kept_group.id]


def test_deleting_a_schedule_detaches_groups_and_overrides_and_drops_executions(db):
    schedule, chained = make_schedule(), make_schedule("after-nightly", schedule_type="chain")
    ReplicationSchedule.update(chain_parent_schedule=schedule).where(ReplicationSchedule.id == chained.id).execute()
    group = VmMachineGroup.create(name="g1", schedule=schedule)
    membership = VmGroupMembership.create(group=group, vm_context=make_context(), schedule_override=schedule)
    execution = ScheduleExecution.create(schedule=schedule, group=group, scheduled_at=utcnow())
    job = make_job(VmReplicationContext.get(), schedule_execution=execution, vm_group=group)

    schedule.delete_instance()

    assert VmMachineGroup.get_by_id(group.id).schedule_id is None
    assert VmGroupMembership.get_by_id(membership.id).schedule_override_id is None
    assert ReplicationSchedule.get_by_id(chained.id).chain_parent_schedule_id is None
    assert count(ScheduleExecution) == 0
    assert ReplicationJob.get_by_id(job.id).schedule_execution_id is None

    group.delete_instance()
    assert ReplicationJob.get_by_id(job.id).vm_group_id is None


def test_deleting_a_tracked_job_cascades_steps_logs_and_children_and_keeps_log_events(db):
    parent = JobTracking.create(operation="delete-replication", status="running", job_type="migration")
    child = JobTracking.create(operation="cleanup-volumes", status="running", parent_job=parent)
    step = JobStep.create(job=parent, name="delete-volumes", seq=1)
    JobExecutionLog.create(job=parent, log_level="ERROR", message="boom")
    event = LogEvent.create(job=parent, step=step, level="INFO", message="step started")

    parent.delete_instance()

    assert count(JobTracking) == 0 and count(JobStep) == 0 and count(JobExecutionLog) == 0
    kept = LogEvent.get_by_id(event.id)
    assert (kept.job_id, kept.step_id, kept.message) == (None, None, "step started")
    assert child.id not in [j.id for j in JobTracking.select()]


def test_deleting_an_enrollment_cascades_connection_and_audit_and_frees_pairing_code(db):
    enrollment = make_enrollment()
    code = VmaPairingCode.create(pairing_code=enrollment.pairing_code, generated_by="admin",
                                 used_by_enrollment=enrollment, expires_at=utcnow(), used_at=utcnow())
    VmaActiveConnection.create(enrollment=enrollment, vma_name="vma-1", vma_fingerprint="SHA256:abc")
    VmaConnectionAudit.create(enrollment=enrollment, event_type="approval", approved_by="admin")

    enrollment.delete_instance()

    assert count(VmaActiveConnection) == 0 and count(VmaConnectionAudit) == 0
    assert VmaPairingCode.get_by_id(code.id).used_by_enrollment_id is None


def test_ossea_config_in_use_cannot_be_deleted(db):
    config = OsseaConfig.create(name="production-ossea", api_url="http://cs/client/api", api_key="k",
                                secret_key="s", zone="z1")
    make_job(make_context(), ossea_config=config)
    with pytest.raises(IntegrityError), db.atomic():
        config.delete_instance()


# ---------------------------------------------------------------------------------------------------------------
# Unique keys
# ---------------------------------------------------------------------------------------------------------------


def _context_same_uuid():
    make_context("renamed", vmware_vm_id="uuid-vm-1")


def _context_same_name():
    make_context(vmware_vm_id="other-uuid", context_id="ctx-2")


def _disk_again():
    make_disk(VmReplicationContext.get())


def _network_mapping_again(context_id):
    def insert():
        NetworkMapping.create(vm_id="vm-1" if context_id is None else "other-name", vm_context=context_id,
                              source_network_name="VM Network", destination_network_id="net-2",
                              destination_network_name="guest2")
    return insert


def _membership_again():
    VmGroupMembership.create(group=VmMachineGroup.get(), vm_context=VmReplicationContext.get())


def _step_again():
    JobStep.create(job=JobTracking.get(), name="other", seq=1)


def _seed_unique_rows():
    context = make_context()
    make_disk(context)
    NetworkMapping.create(vm_id="vm-1", vm_context=context, source_network_name="VM Network",
                          destination_network_id="net-1", destination_network_name="guest")
    VmGroupMembership.create(group=VmMachineGroup.create(name="g1"), vm_context=context)
    JobStep.create(job=JobTracking.create(operation="op", status="running"), name="first", seq=1)
    enrollment = make_enrollment()
    VmaActiveConnection.create(enrollment=enrollment, vma_name="vma-1", vma_fingerprint="fp")
    VmaPairingCode.create(pairing_code="PAIR-CODE-0001", generated_by="admin", expires_at=utcnow())
    NbdExport.create(export_name="migration-vol-1", port=10809, device_path="/dev/vdb")
    OsseaVolume.create(volume_id="vol-1", volume_name="v", size_gb=1)
    DeviceMapping.create(volume_uuid="vol-1", vm_id="oma", device_path="/dev/vdb", cloudstack_state="a",
                         linux_state="b", size=1)
    FailoverJob.create(job_id="fo-1", vm_id="u", job_type="live", source_vm_name="vm-1")
    make_schedule("nightly")
    VmwareCredential.create(credential_name="prod", vcenter_host="vc", username="u", password_encrypted="x",
                            datacenter="DC")
    OsseaConfig.create(name="production-ossea", api_url="u", api_key="k", secret_key="s", zone="z")
    LinstorConfig.create(name="linstor", api_url="http://l")
    ApiUser.create(username="admin", password_hash="h")


UNIQUE_VIOLATIONS = {
    "unique_vm_per_vcenter": _context_same_uuid,
    "unique_vm_name_per_vcenter": _context_same_name,
    "uk_vm_context_disk": _disk_again,
    "unique_vm_network_type": _network_mapping_again(None),
    "unique_context_network_type": _network_mapping_again("ctx-vm-1-vc.example"),
    "unique_vm_group": _membership_again,
    "uk_job_steps_job_seq": _step_again,
    "vma_active_connections.enrollment_id": lambda: VmaActiveConnection.create(
        enrollment=VmaEnrollment.get(), vma_name="vma-2", vma_fingerprint="fp2"),
    "vma_enrollments.pairing_code": lambda: make_enrollment(),
    "vma_pairing_codes.pairing_code": lambda: VmaPairingCode.create(
        pairing_code="PAIR-CODE-0001", generated_by="x", expires_at=utcnow()),
    "nbd_exports.export_name": lambda: NbdExport.create(export_name="migration-vol-1", port=1, device_path="/x"),
    "ossea_volumes.volume_id": lambda: OsseaVolume.create(volume_id="vol-1", volume_name="w", size_gb=2),
    "device_mappings.volume_uuid": lambda: DeviceMapping.create(
        volume_uuid="vol-1", vm_id="oma", device_path="/dev/vdc", cloudstack_state="a", linux_state="b", size=1),
    "device_mappings.device_path": lambda: DeviceMapping.create(
        volume_uuid="vol-2", vm_id="oma", device_path="/dev/vdb", cloudstack_state="a", linux_state="b", size=1),
    "failover_jobs.job_id": lambda: FailoverJob.create(job_id="fo-1", vm_id="u", job_type="test", source_vm_name="x"),
    "replication_schedules.name": lambda: make_schedule("nightly"),
    "vm_machine_groups.name": lambda: VmMachineGroup.create(name="g1"),
    "vmware_credentials.credential_name": lambda: VmwareCredential.create(
        credential_name="prod", vcenter_host="vc2", username="u", password_encrypted="x", datacenter="DC"),
    "ossea_configs.name": lambda: OsseaConfig.create(
        name="production-ossea", api_url="u", api_key="k", secret_key="s", zone="z"),
    "linstor_configs.name": lambda: LinstorConfig.create(name="linstor", api_url="http://l2"),
    "api_users.username": lambda: ApiUser.create(username="admin", password_hash="h2"),
}


def test_unique_keys_refuse_duplicates(db):
    _seed_unique_rows()
    accepted = []
    for key, insert_duplicate in UNIQUE_VIOLATIONS.items():
        try:
            with db.atomic():
                insert_duplicate()
        except IntegrityError:
            continue
        accepted.append(key)
    assert accepted == []


def test_unique_keys_are_case_sensitive_on_both_backends(db):
    make_context("VM-1")
    make_context("vm-1")
    assert count(VmReplicationContext) == 2


def test_unique_vm_name_is_per_vcenter(db):
    make_context("vm-1", "vc-a.example")
    make_context("vm-1", "vc-b.example")
    assert count(VmReplicationContext) == 2


# ---------------------------------------------------------------------------------------------------------------
# Enum validation, JSON, timestamps, ids
# ---------------------------------------------------------------------------------------------------------------


def test_enum_columns_reject_values_outside_the_vocabulary_on_every_write_path(db):
    with pytest.raises(ValueError, match=r"vm_replication_contexts\.current_status: 'bogus' is not an allowed value "
                                         r"\(allowed: discovered, replicating, .*cleanup_required\)"):
        make_context(current_status="bogus")
    context = make_context()
    with pytest.raises(ValueError, match=r"replication_jobs\.status: 'initializing'"):
        make_job(context, status="initializing")
    with pytest.raises(ValueError, match="vm_replication_contexts.current_status"):
        VmReplicationContext.update(current_status="ready").execute()
    with pytest.raises(ValueError, match="log_events.level"):
        LogEvent.insert_many([{"level": "info", "message": "lower-case level"}]).execute()
    with pytest.raises(ValueError, match="job_tracking.status"):
        JobTracking.select().where(JobTracking.status == "done").count()

    context.current_status = ContextStatus.REPLICATING
    context.save()
    assert VmReplicationContext.get().current_status == "replicating"
    assert count(ReplicationJob) == 0


def test_enum_check_constraints_guard_raw_sql(db):
    make_context()
    with pytest.raises(DatabaseError), db.atomic():
        db.execute_sql("UPDATE vm_replication_contexts SET current_status = 'bogus'")
    assert VmReplicationContext.get().current_status == ContextStatus.DISCOVERED


def test_json_columns_round_trip_and_reject_invalid_values(db):
    summary = {"operation": "replication", "ok": True, "disks": [{"id": "disk-2000", "gb": 20.5}],
               "note": "ünïcødé", "nothing": None}
    context = make_context(last_operation_summary=summary)
    disk = VmDisk.create(vm_context=context, disk_id="disk-2000", vmdk_path="[ds] a.vmdk", size_gb=1,
                         network_config=[{"label": "Network adapter 1", "network": "VM Network"}])
    assert VmReplicationContext.get_by_id(context.context_id).last_operation_summary == summary
    assert VmDisk.get_by_id(disk.id).network_config == [{"label": "Network adapter 1", "network": "VM Network"}]
    assert JobTracking.create(operation="op", metadata=None).metadata is None
    assert JobTracking.get().metadata is None

    with pytest.raises(ValueError, match="vm_replication_contexts.last_operation_summary: value is not valid JSON"):
        VmReplicationContext.update(last_operation_summary={"tags": {"a", "b"}}).execute()
    with pytest.raises(ValueError, match="job_steps.metadata"):
        JobStep.create(job=JobTracking.get(), name="x", seq=1, metadata={"ratio": float("nan")})
    with pytest.raises(DatabaseError), db.atomic():
        db.execute_sql("UPDATE vm_replication_contexts SET last_operation_summary = 'not json'")


def test_updated_at_is_maintained_by_save_and_bulk_update(db):
    context = make_context()
    created_at, first_update = context.created_at, context.updated_at

    context.os_type = "linux"
    context.save()
    assert context.updated_at > first_update
    saved = VmReplicationContext.get_by_id(context.context_id).updated_at
    assert saved == context.updated_at

    context.power_state = "poweredOn"
    context.save(only=[VmReplicationContext.power_state])
    assert VmReplicationContext.get_by_id(context.context_id).updated_at > saved

    before_bulk = VmReplicationContext.get_by_id(context.context_id).updated_at
    assert VmReplicationContext.update(current_status="replicating").execute() == 1
    after_bulk = VmReplicationContext.get_by_id(context.context_id)
    assert after_bulk.updated_at > before_bulk and after_bulk.created_at == created_at

    pinned = datetime(2030, 1, 1, 12, 0, 0)
    VmReplicationContext.update({VmReplicationContext.updated_at: pinned}).execute()
    assert VmReplicationContext.get().updated_at == pinned

    membership = VmGroupMembership.create(group=VmMachineGroup.create(name="g"), vm_context=context)
    assert VmGroupMembership.update(priority=3).where(VmGroupMembership.id == membership.id).execute() == 1


def test_timestamps_are_naive_utc_with_microseconds(db):
    aware = datetime(2025, 3, 1, 14, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    context = make_context(first_job_at=aware, last_job_at=datetime(2025, 3, 1, 12, 0, 0, 1))
    stored = VmReplicationContext.get_by_id(context.context_id)
    assert stored.first_job_at == datetime(2025, 3, 1, 12, 30, 15, 123456)
    assert stored.last_job_at == datetime(2025, 3, 1, 12, 0, 0, 1)
    assert stored.created_at.tzinfo is None
    assert abs(stored.created_at - datetime.now(UTC).replace(tzinfo=None)) < timedelta(seconds=30)


def test_python_generated_ids_defaults_and_decimal_rounding(db):
    schedule = make_schedule()
    assert len(schedule.id) == 36 and ReplicationSchedule.get_by_id(schedule.id).name == "nightly"
    assert (schedule.enabled, schedule.replication_type, schedule.timezone) == (True, "auto", "UTC")
    job = make_job(make_context(), vma_throughput_mbps=12.345)
    stored = ReplicationJob.get_by_id(job.id)
    assert stored.vma_throughput_mbps == Decimal("12.35")
    assert stored.vcenter_host == "vc.example" and stored.status == JobStatus.PENDING
    assert set(JOB_TERMINAL_STATUSES) | set(REPLICATION_ACTIVE_STATUSES) == set(JobStatus)


def test_database_defaults_apply_to_raw_inserts(db):
    db.execute_sql("INSERT INTO vm_machine_groups (id, name, created_at, updated_at) "
                   "VALUES ('g-raw', 'raw', '2025-01-01 00:00:00', '2025-01-01 00:00:00')")
    group = VmMachineGroup.get_by_id("g-raw")
    assert (group.max_concurrent_vms, group.priority, group.created_by) == (5, 0, "system")


# ---------------------------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------------------------


def test_active_jobs_view(db):
    now = utcnow()
    older = JobTracking.create(operation="bulk-add", status="running", job_type="discovery",
                               started_at=now - timedelta(seconds=125))
    newer = JobTracking.create(operation="queued", status="pending", started_at=now - timedelta(seconds=5),
                               parent_job=older)
    JobTracking.create(operation="finished", status="completed", started_at=now - timedelta(hours=1))
    for level in ("ERROR", "ERROR", "INFO"):
        JobExecutionLog.create(job=older, log_level=level, message="phase")

    rows = views.active_jobs()

    assert [row["id"] for row in rows] == [older.id, newer.id]
    assert 124 <= rows[0]["running_seconds"] <= 185 and 4 <= rows[1]["running_seconds"] <= 65
    assert [row["error_count"] for row in rows] == [2, 0]
    assert rows[1]["parent_job_id"] == older.id and rows[0]["job_type"] == "discovery"
    assert isinstance(rows[0]["started_at"], datetime)


def test_job_tracking_hierarchy_view(db):
    start = datetime(2025, 1, 1, 10, 0, 0)
    root = JobTracking.create(operation="root", status="completed", started_at=start,
                              completed_at=start + timedelta(seconds=90, milliseconds=999))
    for index in range(2):
        JobTracking.create(operation=f"child-{index}", status="running", parent_job=root,
                           started_at=start + timedelta(seconds=index + 1))

    rows = {row["operation"]: row for row in views.job_tracking_hierarchy()}

    assert (rows["root"]["job_level"], rows["root"]["child_count"], rows["root"]["duration_seconds"]) == (
        "root", 2, 90)
    assert (rows["child-0"]["job_level"], rows["child-0"]["child_count"], rows["child-0"]["duration_seconds"]) == (
        "child", 0, None)
    assert [row["operation"] for row in views.job_tracking_hierarchy(parent_job_id=root.id)] == [
        "child-0", "child-1"]


def test_active_schedules_view(db):
    schedule = make_schedule("nightly")
    make_schedule("disabled", enabled=False)
    group_a, group_b = (VmMachineGroup.create(name=n, schedule=schedule) for n in ("a", "b"))
    vm1, vm2, vm3 = (make_context(f"vm-{i}") for i in (1, 2, 3))
    VmGroupMembership.create(group=group_a, vm_context=vm1)
    VmGroupMembership.create(group=group_b, vm_context=vm1)
    VmGroupMembership.create(group=group_b, vm_context=vm2)
    VmGroupMembership.create(group=group_b, vm_context=vm3, enabled=False)
    last = datetime(2025, 5, 1, 2, 0, 0)
    ScheduleExecution.create(schedule=schedule, scheduled_at=last, started_at=last)
    ScheduleExecution.create(schedule=schedule, scheduled_at=last - timedelta(days=1),
                             started_at=last - timedelta(days=1))

    rows = views.active_schedules()

    assert [row["name"] for row in rows] == ["nightly"]
    row = rows[0]
    assert (row["group_count"], row["vm_count"], row["last_execution"], row["next_execution"]) == (2, 2, last, None)
    assert row["enabled"] is True and row["skip_if_running"] is True
    fire = datetime(2025, 5, 2, 2, 0, 0)
    assert views.active_schedules(next_execution=lambda cron, tz: fire)[0]["next_execution"] == fire


def test_schedule_execution_summary_view(db):
    schedule = make_schedule()
    base = datetime(2025, 5, 1, 2, 0, 0)
    ScheduleExecution.create(id="e-old", schedule=schedule, scheduled_at=base, jobs_created=3, jobs_completed=2,
                             status="completed", triggered_by="scheduler-service")
    ScheduleExecution.create(id="e-new", schedule=schedule, scheduled_at=base + timedelta(days=1),
                             status="skipped")

    rows = views.schedule_execution_summary()

    assert [row["id"] for row in rows] == ["e-new", "e-old"]
    assert [row["success_rate_percent"] for row in rows] == [0.0, 66.67]
    assert rows[1]["schedule_name"] == "nightly" and rows[1]["triggered_by"] == "scheduler-service"
    assert [row["id"] for row in views.schedule_execution_summary(schedule.id, limit=1)] == ["e-new"]


def test_vm_schedule_status_view_has_one_row_per_membership(db):
    group_schedule, override = make_schedule("group-schedule"), make_schedule("override-schedule")
    group = VmMachineGroup.create(name="g1", schedule=group_schedule, priority=3)
    other_group = VmMachineGroup.create(name="g2", schedule=group_schedule)
    busy, idle = make_context("vm-busy"), make_context("vm-idle")
    make_context("vm-lonely")
    make_context("vm-unscheduled", scheduler_enabled=False)
    VmGroupMembership.create(group=group, vm_context=busy, schedule_override=override, priority=7)
    VmGroupMembership.create(group=group, vm_context=idle)
    VmGroupMembership.create(group=other_group, vm_context=idle, enabled=False)
    active = make_job(busy, "job-active", status="replicating", progress_percent=42.5)
    finished = make_job(idle, "job-done", status="completed")
    VmReplicationContext.update(current_job=active).where(VmReplicationContext.context_id == busy.context_id).execute()
    VmReplicationContext.update(current_job=finished).where(
        VmReplicationContext.context_id == idle.context_id).execute()

    rows = views.vm_schedule_status()

    assert [(row["vm_name"], row["group_name"]) for row in rows] == [
        ("vm-busy", "g1"), ("vm-idle", "g1"), ("vm-idle", "g2"), ("vm-lonely", None)]
    busy_row = rows[0]
    assert (busy_row["schedule_name"], busy_row["vm_priority"], busy_row["group_priority"]) == (
        "override-schedule", 7, 3)
    assert (busy_row["has_active_job"], busy_row["active_job_id"], busy_row["job_status"],
            busy_row["progress_percent"]) == (True, "job-active", "replicating", 42.5)
    assert (rows[1]["schedule_name"], rows[1]["has_active_job"], rows[1]["active_job_id"]) == (
        "group-schedule", False, None)
    assert rows[2]["membership_enabled"] is False
    assert rows[3]["schedule_name"] is None and rows[3]["vm_status"] == "discovered"
    assert [row["group_name"] for row in views.vm_schedule_status(idle.context_id)] == ["g1", "g2"]


# ---------------------------------------------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------------------------------------------


def test_connection_per_call_from_many_threads_returns_connections(db):
    make_context()
    db.close()
    callers = 8
    all_started = threading.Barrier(callers)

    def rpc():
        all_started.wait(timeout=10)
        with database_proxy.connection_context(), database_proxy.atomic():
            return db_for_update(VmReplicationContext.select()).count()

    with ThreadPoolExecutor(max_workers=callers) as pool:
        counts = [future.result(timeout=30) for future in [pool.submit(rpc) for _ in range(callers)]]

    assert counts == [1] * callers
    assert is_mysql() == isinstance(db, MySQLDatabase)
    if is_mysql():
        assert len(db._in_use) == 0 and 1 <= len(db._connections) <= callers


def test_sqlite_urls_and_shared_memory_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = connect("sqlite:///relative.db")
    assert isinstance(relative, SqliteDatabase) and relative.database == "relative.db"
    assert connect(f"sqlite:///{tmp_path / 'abs.db'}").database == str(tmp_path / "abs.db")
    for bad in ("postgres://x/y", "sqlite://host/x.db", "mysql://localhost/", "sqlite:///x.db?mode=ro"):
        with pytest.raises(ValueError):
            connect(bad)

    previous = database_proxy.obj
    try:
        memory = init_database("sqlite:///:memory:")
        with memory.connection_context():
            migrate(memory)
            assert memory.pragma("foreign_keys") == 1
        with memory.connection_context():
            make_context()
        seen = []
        thread = threading.Thread(target=lambda: seen.append(count(VmReplicationContext)))
        thread.start()
        thread.join()
        assert seen == [1]
    finally:
        database_proxy.initialize(previous)


def test_mysql_url_builds_a_strict_utc_pool():
    database = connect("mariadb://oma:p%40ss@db.example:3307/oma", pool_size=7, stale_timeout=120)
    assert isinstance(database, MySQLDatabase) and database.mariadb
    params = database.connect_params
    assert (params["host"], params["port"], params["user"], params["password"]) == ("db.example", 3307, "oma", "p@ss")
    assert params["charset"] == "utf8mb4" and "STRICT_ALL_TABLES" in params["sql_mode"]
    assert "+00:00" in params["init_command"]
    assert (database._max_connections, database._stale_timeout) == (7, 120)


def test_every_table_model_is_listed_once():
    assert len(ALL_MODELS) == len(TABLE_NAMES) == 26
