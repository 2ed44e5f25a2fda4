"""v1 schema: the 24 tables (docs/design/data-model.md#tables-and-constraints), ``api_users`` and the five views
(docs/design/data-model.md#views).

Generated with ``python -m playhouse.migrations … initial oma_server.db.models:ALL_MODELS`` and then frozen by hand:
this file must keep creating exactly the v1 schema whatever happens to ``oma_server.db.models`` later, so it imports
nothing from the application.  The column types of ``oma_server.db.fields`` are reproduced below as DDL-only
classes; literal defaults also become SQL ``DEFAULT`` clauses.  ``migrate.schema_drift()`` compares the result with
the current models.

Backend differences handled here:
* The contexts ↔ jobs foreign-key cycle (``current_job_id``, ``last_successful_job_id`` → ``replication_jobs``):
  SQLite accepts a forward reference in CREATE TABLE but has no ALTER TABLE ADD CONSTRAINT, so the constraints are
  inline there; MariaDB needs the referenced table to exist, so they are added with ALTER TABLE afterwards.
* MariaDB tables are InnoDB/utf8mb4 with the binary collation, so uniqueness and equality are case-sensitive as on
  SQLite.
* View SQL: ``TIMESTAMPDIFF``/``UTC_TIMESTAMP`` on MariaDB, ``julianday`` arithmetic on SQLite (rounded to the
  millisecond before truncating to whole seconds, so float error cannot lose a second).  MariaDB views use
  ``SQL SECURITY INVOKER`` so they do not depend on the account that ran the migration.
"""
from peewee import *
from peewee import Entity, NodeList

CIRCULAR_FOREIGN_KEYS = (
    ("fk_contexts_current_job", "current_job_id"),
    ("fk_contexts_last_successful_job", "last_successful_job_id"),
)
MYSQL_TABLE_SETTINGS = ("ENGINE=InnoDB", "DEFAULT CHARSET=utf8mb4", "COLLATE=utf8mb4_bin")
VIEW_NAMES = ("active_jobs", "job_tracking_hierarchy", "active_schedules", "schedule_execution_summary",
              "vm_schedule_status")


def _quote(value):
    escaped = value.replace("'", "''")
    return f"'{escaped}'"


class LongTextField(TextField):
    field_type = "LONGTEXT"


class DateTime6Field(DateTimeField):
    def get_modifiers(self):
        return [6]


class EnumField(CharField):
    def __init__(self, allowed, check, max_length=32, **kwargs):
        self.allowed = allowed
        self.check = check
        super().__init__(max_length=max_length, **kwargs)

    def ddl(self, ctx):
        node = super().ddl(ctx)
        if self.check:
            values = ", ".join(_quote(v) for v in self.allowed)
            node.nodes.append(NodeList((SQL("CHECK ("), Entity(self.column_name), SQL(f"IN ({values}))"))))
        return node


class CheckedJSONField(JSONField):
    def ddl(self, ctx):
        node = super().ddl(ctx)
        column = Entity(self.column_name)
        node.nodes.append(NodeList((SQL("CHECK ("), column, SQL("IS NULL OR json_valid("), column, SQL("))"))))
        return node


def _add_server_defaults(models):
    for model in models:
        for field in model._meta.sorted_fields:
            default = field.default
            if isinstance(default, bool):
                clause = f"DEFAULT {int(default)}"
            elif isinstance(default, (int, float)):
                clause = f"DEFAULT {default}"
            elif isinstance(default, str):
                clause = f"DEFAULT {_quote(default)}"
            else:
                continue
            field.constraints = [*(field.constraints or ()), SQL(clause)]


CONTEXT_STATUSES = ("discovered", "replicating", "ready_for_failover", "failed_over_test", "failed_over_live",
                    "completed", "failed", "cleanup_required")
JOB_STATUSES = ("pending", "provisioning", "replicating", "completed", "failed", "cancelled")
VMA_ERROR_CLASSIFICATIONS = ("migration_error", "polling", "job_lost", "vma_unreachable_timeout",
                             "vma_reported_failure")
SNAPSHOT_STATUSES = ("none", "creating", "ready", "failed", "rollback_complete")
FAILOVER_JOB_STATUSES = ("pending", "validating", "snapshotting", "creating_vm", "switching_volume", "powering_on",
                         "completed", "failed", "cleanup", "reverting")
SCHEDULE_EXECUTION_STATUSES = ("scheduled", "running", "completed", "failed", "skipped", "cancelled")
JOB_TYPES = ("cleanup", "failover", "migration", "cloudstack", "volume_daemon", "linstor", "virtio", "ossea",
             "scheduler", "discovery", "bulk-operations", "group-management", "conflict-detection",
             "phantom-detection", "schedule_management", "schedule_control")
JOB_TRACKING_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
JOB_CATEGORIES = ("system", "failover", "replication", "scheduler", "discovery", "bulk")
LOG_LEVELS = ("DEBUG", "INFO", "WARN", "ERROR")
ENROLLMENT_STATUSES = ("pending_verification", "awaiting_approval", "approved", "rejected", "expired")
AUDIT_EVENT_TYPES = ("enrollment", "verification", "approval", "rejection", "connection", "disconnection",
                     "revocation")


def _view_sql(mysql):
    if mysql:
        def seconds_between(start, end):
            return f"TIMESTAMPDIFF(SECOND, {start}, {end})"
        now = "UTC_TIMESTAMP(6)"
        create = "CREATE SQL SECURITY INVOKER VIEW"
    else:
        def seconds_between(start, end):
            return f"(CAST(ROUND((julianday({end}) - julianday({start})) * 86400000) AS INTEGER) / 1000)"
        now = "'now'"
        create = "CREATE VIEW"
    running_seconds = seconds_between("jt.started_at", now)
    duration_seconds = seconds_between("jt.started_at", "jt.completed_at")
    return {
        "active_jobs": f"""
            {create} active_jobs AS
            SELECT jt.id, jt.job_type, jt.operation, jt.status, jt.parent_job_id, jt.started_at,
                   {running_seconds} AS running_seconds,
                   (SELECT COUNT(*) FROM job_execution_log jel
                     WHERE jel.job_id = jt.id AND jel.log_level = 'ERROR') AS error_count
            FROM job_tracking jt
            WHERE jt.status IN ('pending', 'running')
            ORDER BY jt.started_at""",
        "job_tracking_hierarchy": f"""
            {create} job_tracking_hierarchy AS
            SELECT jt.id, jt.parent_job_id, jt.job_type, jt.job_category, jt.operation, jt.status, jt.context_id,
                   jt.external_job_id, jt.owner, jt.started_at, jt.completed_at,
                   CASE WHEN jt.parent_job_id IS NULL THEN 'root' ELSE 'child' END AS job_level,
                   (SELECT COUNT(*) FROM job_tracking c WHERE c.parent_job_id = jt.id) AS child_count,
                   CASE WHEN jt.completed_at IS NOT NULL THEN {duration_seconds} END AS duration_seconds
            FROM job_tracking jt""",
        "active_schedules": f"""
            {create} active_schedules AS
            SELECT s.id, s.name, s.description, s.cron_expression, s.schedule_type, s.timezone,
                   s.replication_type, s.max_concurrent_jobs, s.skip_if_running, s.enabled,
                   (SELECT COUNT(*) FROM vm_machine_groups g WHERE g.schedule_id = s.id) AS group_count,
                   (SELECT COUNT(DISTINCT m.vm_context_id)
                      FROM vm_group_memberships m JOIN vm_machine_groups g ON g.id = m.group_id
                     WHERE g.schedule_id = s.id AND m.enabled = 1) AS vm_count,
                   NULL AS next_execution,
                   (SELECT MAX(e.started_at) FROM schedule_executions e WHERE e.schedule_id = s.id)
                       AS last_execution
            FROM replication_schedules s
            WHERE s.enabled = 1""",
        "schedule_execution_summary": f"""
            {create} schedule_execution_summary AS
            SELECT e.id, e.schedule_id, s.name AS schedule_name, e.group_id, e.status, e.scheduled_at,
                   e.started_at, e.completed_at, e.execution_duration_seconds, e.vms_eligible, e.jobs_created,
                   e.jobs_completed, e.jobs_failed, e.jobs_skipped,
                   CASE WHEN e.jobs_created > 0 THEN ROUND(e.jobs_completed * 100.0 / e.jobs_created, 2)
                        ELSE 0 END AS success_rate_percent,
                   e.error_message, e.triggered_by
            FROM schedule_executions e JOIN replication_schedules s ON s.id = e.schedule_id
            ORDER BY e.scheduled_at DESC""",
        "vm_schedule_status": f"""
            {create} vm_schedule_status AS
            SELECT c.context_id, c.vm_name, c.current_status AS vm_status, c.next_scheduled_at,
                   c.scheduler_enabled, m.group_id, g.name AS group_name, g.priority AS group_priority,
                   m.priority AS vm_priority, m.enabled AS membership_enabled, s.id AS schedule_id,
                   s.name AS schedule_name, s.cron_expression, s.enabled AS schedule_enabled,
                   CASE WHEN j.id IS NULL THEN 0 ELSE 1 END AS has_active_job, j.id AS active_job_id,
                   j.status AS job_status, j.progress_percent
            FROM vm_replication_contexts c
            LEFT JOIN vm_group_memberships m ON m.vm_context_id = c.context_id
            LEFT JOIN vm_machine_groups g ON g.id = m.group_id
            LEFT JOIN replication_schedules s ON s.id = COALESCE(m.schedule_override_id, g.schedule_id)
            LEFT JOIN replication_jobs j ON j.id = c.current_job_id
                  AND j.status NOT IN ('completed', 'failed', 'cancelled')
            WHERE c.scheduler_enabled = 1""",
    }


def up(migrator, db):
    mysql = isinstance(db, MySQLDatabase)
    circular_constraints = [
        SQL(f"CONSTRAINT {name} FOREIGN KEY ({column}) REFERENCES replication_jobs (id) ON DELETE SET NULL")
        for name, column in CIRCULAR_FOREIGN_KEYS]

    class BaseModel(Model):
        class Meta:
            database = db
            table_settings = MYSQL_TABLE_SETTINGS if mysql else None

    class ApiUser(BaseModel):
        username = CharField(unique=True)
        password_hash = CharField()
        created_at = DateTime6Field()
        last_login_at = DateTime6Field(null=True)
        is_active = BooleanField(default=True)

        class Meta:
            table_name = "api_users"

    class VmwareCredential(BaseModel):
        credential_name = CharField(unique=True)
        vcenter_host = CharField()
        username = CharField()
        password_encrypted = TextField()
        datacenter = CharField()
        is_active = BooleanField(default=True)
        is_default = BooleanField(default=False)
        created_at = DateTime6Field()
        updated_at = DateTime6Field()
        created_by = CharField(null=True)
        last_used = DateTime6Field(null=True)
        usage_count = IntegerField(default=0)

        class Meta:
            table_name = "vmware_credentials"

    class OsseaConfig(BaseModel):
        id = BigAutoField()
        name = CharField(unique=True)
        api_url = LongTextField()
        api_key = LongTextField()
        secret_key = LongTextField()
        domain = LongTextField(null=True)
        zone = LongTextField()
        template_id = LongTextField(null=True)
        network_id = LongTextField(null=True)
        service_offering_id = LongTextField(null=True)
        disk_offering_id = LongTextField(null=True)
        oma_vm_id = LongTextField(null=True)
        created_at = DateTime6Field(null=True)
        updated_at = DateTime6Field(null=True)
        is_active = BooleanField(default=True)

        class Meta:
            table_name = "ossea_configs"

    class LinstorConfig(BaseModel):
        name = CharField(unique=True)
        api_url = CharField()
        api_port = IntegerField(default=3370)
        api_protocol = CharField(max_length=10, default="http")
        api_key = CharField(null=True, max_length=512)
        api_secret = CharField(null=True, max_length=512)
        connection_timeout_seconds = IntegerField(default=30)
        retry_attempts = IntegerField(default=3)
        description = TextField(null=True)
        created_at = DateTime6Field()
        updated_at = DateTime6Field()
        is_active = BooleanField(default=True)

        class Meta:
            table_name = "linstor_configs"

    class ReplicationSchedule(BaseModel):
        id = CharField(primary_key=True, max_length=64)
        name = CharField(unique=True)
        description = TextField(null=True)
        cron_expression = CharField(max_length=100)
        schedule_type = EnumField(("cron", "chain"), check=True, default="cron")
        timezone = CharField(max_length=50, default="UTC")
        chain_parent_schedule = ForeignKeyField("self", null=True, on_delete="SET NULL")
        chain_delay_minutes = IntegerField(default=0)
        replication_type = EnumField(("full", "incremental", "auto"), check=True, default="auto")
        max_concurrent_jobs = IntegerField(default=1)
        retry_attempts = IntegerField(default=3)
        retry_delay_minutes = IntegerField(default=30)
        enabled = BooleanField(default=True)
        skip_if_running = BooleanField(default=True)
        created_at = DateTime6Field()
        updated_at = DateTime6Field()
        created_by = CharField(default="system")

        class Meta:
            table_name = "replication_schedules"

    class VmMachineGroup(BaseModel):
        id = CharField(primary_key=True, max_length=64)
        name = CharField(unique=True)
        description = TextField(null=True)
        schedule = ForeignKeyField(ReplicationSchedule, null=True, on_delete="SET NULL")
        max_concurrent_vms = IntegerField(default=5)
        priority = IntegerField(default=0)
        created_at = DateTime6Field()
        updated_at = DateTime6Field()
        created_by = CharField(default="system")

        class Meta:
            table_name = "vm_machine_groups"

    class ScheduleExecution(BaseModel):
        id = CharField(primary_key=True, max_length=64)
        schedule = ForeignKeyField(ReplicationSchedule, on_delete="CASCADE")
        group = ForeignKeyField(VmMachineGroup, null=True, on_delete="SET NULL")
        scheduled_at = DateTime6Field()
        started_at = DateTime6Field(null=True)
        completed_at = DateTime6Field(null=True)
        status = EnumField(SCHEDULE_EXECUTION_STATUSES, check=True, default="scheduled")
        vms_eligible = IntegerField(default=0)
        jobs_created = IntegerField(default=0)
        jobs_completed = IntegerField(default=0)
        jobs_failed = IntegerField(default=0)
        jobs_skipped = IntegerField(default=0)
        execution_details = CheckedJSONField(null=True)
        error_message = TextField(null=True)
        error_details = CheckedJSONField(null=True)
        execution_duration_seconds = IntegerField(null=True)
        created_at = DateTime6Field()
        triggered_by = CharField(default="scheduler")

        class Meta:
            table_name = "schedule_executions"

    class VmReplicationContext(BaseModel):
        context_id = CharField(primary_key=True, max_length=64)
        vm_name = CharField(index=True)
        vmware_vm_id = CharField(index=True)
        vm_path = CharField(max_length=500)
        vcenter_host = CharField(index=True)
        datacenter = CharField()
        current_status = EnumField(CONTEXT_STATUSES, check=True, index=True, default="discovered")
        current_job_id = CharField(max_length=191, null=True, index=True)
        total_jobs_run = IntegerField(default=0)
        successful_jobs = IntegerField(default=0)
        failed_jobs = IntegerField(default=0)
        last_successful_job_id = CharField(max_length=191, null=True, index=True)
        cpu_count = IntegerField(null=True)
        memory_mb = IntegerField(null=True)
        os_type = CharField(null=True)
        power_state = CharField(null=True, max_length=50)
        vm_tools_version = CharField(null=True)
        created_at = DateTime6Field()
        updated_at = DateTime6Field()
        first_job_at = DateTime6Field(null=True)
        last_job_at = DateTime6Field(null=True)
        last_status_change = DateTime6Field()
        auto_added = BooleanField(index=True, default=False)
        last_scheduled_job_id = CharField(null=True)
        next_scheduled_at = DateTime6Field(index=True, null=True)
        scheduler_enabled = BooleanField(index=True, default=True)
        credential = ForeignKeyField(VmwareCredential, null=True, on_delete="SET NULL")
        ossea_config_id = IntegerField(null=True)
        last_operation_summary = CheckedJSONField(null=True)

        class Meta:
            table_name = "vm_replication_contexts"
            constraints = [] if mysql else circular_constraints

    VmReplicationContext.add_index(VmReplicationContext.vmware_vm_id, VmReplicationContext.vcenter_host,
                                   unique=True, name="unique_vm_per_vcenter")
    VmReplicationContext.add_index(VmReplicationContext.vm_name, VmReplicationContext.vcenter_host,
                                   unique=True, name="unique_vm_name_per_vcenter")

    class ReplicationJob(BaseModel):
        id = CharField(primary_key=True, max_length=191)
        vm_context = ForeignKeyField(VmReplicationContext, null=True, on_delete="CASCADE")
        source_vm_id = LongTextField()
        source_vm_name = LongTextField()
        source_vm_path = LongTextField()
        vcenter_host = LongTextField(column_name="v_center_host")
        datacenter = LongTextField()
        replication_type = EnumField(("initial", "incremental"), check=False)
        target_network = LongTextField(null=True)
        status = EnumField(JOB_STATUSES, check=False, max_length=191, default="pending")
        progress_percent = DoubleField(default=0)
        current_operation = LongTextField(null=True)
        bytes_transferred = BigIntegerField(default=0)
        total_bytes = BigIntegerField(default=0)
        transfer_speed_bps = BigIntegerField(default=0)
        error_message = LongTextField(null=True)
        change_id = LongTextField(null=True)
        previous_change_id = LongTextField(null=True)
        snapshot_id = LongTextField(null=True)
        nbd_port = BigIntegerField(null=True)
        nbd_export_name = CharField(null=True, max_length=191)
        target_device = LongTextField(null=True)
        ossea_config = ForeignKeyField(OsseaConfig, null=True)
        created_at = DateTime6Field(null=True)
        updated_at = DateTime6Field(null=True)
        started_at = DateTime6Field(null=True)
        completed_at = DateTime6Field(null=True)
        vma_sync_type = CharField(null=True, max_length=50)
        vma_current_phase = CharField(null=True, max_length=100)
        vma_throughput_mbps = DecimalField(max_digits=10, decimal_places=2, default=0)
        vma_eta_seconds = IntegerField(null=True)
        vma_last_poll_at = DateTime6Field(null=True)
        vma_error_classification = EnumField(VMA_ERROR_CLASSIFICATIONS, check=False, null=True, max_length=50)
        vma_error_details = TextField(null=True)
        setup_progress_percent = DecimalField(max_digits=5, decimal_places=2, default=0)
        schedule_execution = ForeignKeyField(ScheduleExecution, null=True, on_delete="SET NULL")
        scheduled_by = CharField(index=True, null=True)
        vm_group = ForeignKeyField(VmMachineGroup, null=True, on_delete="SET NULL")

        class Meta:
            table_name = "replication_jobs"
            indexes = ((("status", "nbd_export_name"), False), (("status", "updated_at"), False),
                       (("status", "completed_at"), False))

    class VmDisk(BaseModel):
        id = BigAutoField()
        vm_context = ForeignKeyField(VmReplicationContext, null=True, on_delete="CASCADE", index=False)
        job = ForeignKeyField(ReplicationJob, null=True, on_delete="SET NULL")
        disk_id = CharField(max_length=191)
        vmdk_path = LongTextField(column_name="vm_dk_path")
        size_gb = BigIntegerField()
        datastore = LongTextField(null=True)
        unit_number = BigIntegerField(null=True)
        label = LongTextField(null=True)
        capacity_bytes = BigIntegerField(null=True)
        provisioning_type = LongTextField(null=True)
        ossea_volume_id = BigIntegerField(null=True)
        disk_change_id = LongTextField(null=True)
        sync_status = EnumField(("pending", "syncing", "completed", "failed"), check=False, max_length=191,
                                default="pending")
        sync_progress_percent = DoubleField(default=0)
        bytes_synced = BigIntegerField(default=0)
        created_at = DateTime6Field(null=True)
        updated_at = DateTime6Field(null=True)
        cpu_count = IntegerField(default=0)
        memory_mb = IntegerField(default=0)
        os_type = CharField(default="")
        vm_tools_version = CharField(default="")
        display_name = CharField(default="")
        power_state = CharField(default="")
        vmware_uuid = CharField(default="")
        network_config = CheckedJSONField(null=True)
        annotation = TextField(null=True)
        bios_setup = TextField(null=True)

        class Meta:
            table_name = "vm_disks"

    VmDisk.add_index(VmDisk.vm_context, VmDisk.disk_id, unique=True, name="uk_vm_context_disk")

    class CbtHistory(BaseModel):
        id = BigAutoField()
        vm_context = ForeignKeyField(VmReplicationContext, null=True, on_delete="CASCADE")
        job = ForeignKeyField(ReplicationJob, on_delete="CASCADE")
        disk_id = LongTextField()
        change_id = LongTextField()
        previous_change_id = LongTextField(null=True)
        sync_type = EnumField(("full", "incremental"), check=False)
        blocks_changed = BigIntegerField(null=True)
        bytes_transferred = BigIntegerField(null=True)
        sync_duration_seconds = BigIntegerField(null=True)
        sync_success = BooleanField(default=False)
        created_at = DateTime6Field(null=True)

        class Meta:
            table_name = "cbt_history"

    class OsseaVolume(BaseModel):
        id = BigAutoField()
        vm_context = ForeignKeyField(VmReplicationContext, null=True, on_delete="CASCADE")
        volume_id = CharField(unique=True, max_length=191)
        volume_name = LongTextField()
        size_gb = BigIntegerField()
        ossea_config = ForeignKeyField(OsseaConfig, null=True)
        volume_type = LongTextField(null=True)
        device_path = LongTextField(null=True)
        mount_point = LongTextField(null=True)
        status = EnumField(("creating", "available", "attached", "detached", "error"), check=False,
                           max_length=191, default="creating")
        created_at = DateTime6Field(null=True)
        updated_at = DateTime6Field(null=True)
        snapshot_id = CharField(null=True, max_length=191)
        snapshot_created_at = DateTime6Field(null=True)
        snapshot_status = EnumField(SNAPSHOT_STATUSES, check=False, max_length=50, default="none")

        class Meta:
            table_name = "ossea_volumes"

    class DeviceMapping(BaseModel):
        id = CharField(primary_key=True, max_length=64)
        vm_context = ForeignKeyField(VmReplicationContext, null=True, on_delete="CASCADE")
        volume_uuid = CharField(unique=True, max_length=64)
        volume_id_numeric = BigIntegerField(null=True)
        vm_id = CharField(max_length=64)
        operation_mode = EnumField(("oma", "failover"), check=True, default="oma")
        cloudstack_device_id = IntegerField(null=True)
        requires_device_correlation = BooleanField(default=True)
        device_path = CharField(unique=True)
        cloudstack_state = CharField(max_length=32)
        linux_state = CharField(max_length=32)
        size = BigIntegerField()
        last_sync = DateTime6Field()
        created_at = DateTime6Field()
        updated_at = DateTime6Field()
        ossea_snapshot_id = CharField(null=True, max_length=191)
        snapshot_created_at = DateTime6Field(null=True)
        snapshot_status = EnumField(SNAPSHOT_STATUSES, check=False, max_length=50, default="none")
        persistent_device_name = CharField(null=True)
        symlink_path = CharField(null=True)

        class Meta:
            table_name = "device_mappings"

    class NbdExport(BaseModel):
        id = BigAutoField()
        vm_context = ForeignKeyField(VmReplicationContext, null=True, on_delete="CASCADE")
        job = ForeignKeyField(ReplicationJob, null=True, on_delete="CASCADE")
        volume_id = CharField(max_length=64, default="")
        vm_disk = ForeignKeyField(VmDisk, null=True, on_delete="CASCADE")
        device_mapping = ForeignKeyField(DeviceMapping, field=DeviceMapping.volume_uuid, null=True,
                                         column_name="device_mapping_uuid", on_delete="CASCADE")
        export_name = CharField(unique=True, max_length=191)
        port = BigIntegerField()
        device_path = LongTextField()
        config_path = LongTextField(default="")
        status = EnumField(("pending", "active", "stopped", "error"), check=False, max_length=191,
                           default="pending")
        created_at = DateTime6Field(null=True)
        updated_at = DateTime6Field(null=True)

        class Meta:
            table_name = "nbd_exports"

    class NetworkMapping(BaseModel):
        id = BigAutoField()
        vm_id = CharField()
        source_network_name = CharField()
        destination_network_id = CharField()
        destination_network_name = CharField()
        is_test_network = BooleanField(default=False)
        created_at = DateTime6Field()
        updated_at = DateTime6Field()
        vm_context = ForeignKeyField(VmReplicationContext, null=True, on_delete="CASCADE", index=False)
        vmware_vm_id = CharField(null=True)
        validation_status = EnumField(("pending", "valid", "invalid"), check=True, default="pending")
        mapping_type = EnumField(("live", "test", "both"), check=True, default="live")
        network_strategy = CharField(null=True, max_length=50)
        last_validated = DateTime6Field(null=True)

        class Meta:
            table_name = "network_mappings"

    NetworkMapping.add_index(NetworkMapping.vm_id, NetworkMapping.source_network_name,
                             NetworkMapping.is_test_network, unique=True, name="unique_vm_network_type")
    NetworkMapping.add_index(NetworkMapping.vm_context, NetworkMapping.source_network_name,
                             NetworkMapping.is_test_network, unique=True, name="unique_context_network_type")

    class FailoverJob(BaseModel):
        id = BigAutoField()
        vm_context = ForeignKeyField(VmReplicationContext, null=True, on_delete="CASCADE")
        job_id = CharField(unique=True)
        vm_id = CharField()
        replication_job_id = CharField(null=True)
        job_type = EnumField(("live", "test"), check=True)
        status = EnumField(FAILOVER_JOB_STATUSES, check=True, default="pending")
        source_vm_name = CharField()
        source_vm_spec = TextField(null=True)
        network_mappings = TextField(null=True)
        error_message = TextField(null=True)
        destination_vm_id = CharField(null=True)
        ossea_snapshot_id = CharField(null=True)
        linstor_snapshot_name = CharField(null=True)
        linstor_config_id = IntegerField(null=True)
        created_at = DateTime6Field()
        updated_at = DateTime6Field()
        started_at = DateTime6Field(null=True)
        completed_at = DateTime6Field(null=True)

        class Meta:
            table_name = "failover_jobs"

    class VmGroupMembership(BaseModel):
        id = CharField(primary_key=True, max_length=64)
        group = ForeignKeyField(VmMachineGroup, on_delete="CASCADE", index=False)
        vm_context = ForeignKeyField(VmReplicationContext, on_delete="CASCADE")
        enabled = BooleanField(default=True)
        priority = IntegerField(default=0)
        schedule_override = ForeignKeyField(ReplicationSchedule, null=True, on_delete="SET NULL")
        added_at = DateTime6Field()
        added_by = CharField(default="system")

        class Meta:
            table_name = "vm_group_memberships"

    VmGroupMembership.add_index(VmGroupMembership.group, VmGroupMembership.vm_context, unique=True,
                                name="unique_vm_group")

    class JobTracking(BaseModel):
        id = CharField(primary_key=True, max_length=64)
        parent_job = ForeignKeyField("self", null=True, on_delete="CASCADE")
        job_type = EnumField(JOB_TYPES, check=True, null=True)
        operation = CharField(max_length=100)
        status = EnumField(JOB_TRACKING_STATUSES, check=True, index=True, null=True)
        cloudstack_job_id = CharField(null=True, max_length=64)
        external_job_id = CharField(index=True, null=True, max_length=64)
        metadata = CheckedJSONField(null=True)
        error_message = LongTextField(null=True)
        started_at = DateTime6Field()
        created_at = DateTime6Field()
        updated_at = DateTime6Field()
        completed_at = DateTime6Field(null=True)
        percent_complete = SmallIntegerField(null=True)
        canceled_at = DateTime6Field(null=True)
        owner = CharField(null=True, max_length=100)
        context_id = CharField(index=True, null=True, max_length=64)
        job_category = EnumField(JOB_CATEGORIES, check=True, default="system")

        class Meta:
            table_name = "job_tracking"

    class JobStep(BaseModel):
        id = BigAutoField()
        job = ForeignKeyField(JobTracking, on_delete="CASCADE", index=False)
        name = CharField(max_length=200)
        seq = IntegerField()
        status = EnumField(("running", "completed", "failed", "skipped"), check=True, default="running")
        started_at = DateTime6Field()
        completed_at = DateTime6Field(null=True)
        error_message = LongTextField(null=True)
        metadata = CheckedJSONField(null=True)

        class Meta:
            table_name = "job_steps"

    JobStep.add_index(JobStep.job, JobStep.seq, unique=True, name="uk_job_steps_job_seq")

    class JobExecutionLog(BaseModel):
        id = BigAutoField()
        job = ForeignKeyField(JobTracking, on_delete="CASCADE")
        log_level = EnumField(LOG_LEVELS, check=False, max_length=20)
        message = TextField()
        details = CheckedJSONField(null=True)
        operation_phase = CharField(null=True, max_length=100)
        created_at = DateTime6Field()

        class Meta:
            table_name = "job_execution_log"

    class LogEvent(BaseModel):
        id = BigAutoField()
        job = ForeignKeyField(JobTracking, null=True, on_delete="SET NULL")
        step = ForeignKeyField(JobStep, null=True, on_delete="SET NULL")
        level = EnumField(LOG_LEVELS, check=True)
        message = TextField()
        attrs = CheckedJSONField(null=True)
        ts = DateTime6Field()
        external_job_id = CharField(null=True)

        class Meta:
            table_name = "log_events"

    class VmaEnrollment(BaseModel):
        id = CharField(primary_key=True, max_length=36)
        pairing_code = CharField(unique=True, max_length=20)
        vma_public_key = TextField()
        vma_name = CharField(null=True)
        vma_version = CharField(null=True)
        vma_fingerprint = CharField(null=True)
        vma_ip_address = CharField(null=True, max_length=45)
        challenge_nonce = CharField(null=True, max_length=64)
        status = EnumField(ENROLLMENT_STATUSES, check=True, default="pending_verification")
        approved_by = CharField(null=True)
        approved_at = DateTime6Field(null=True)
        expires_at = DateTime6Field()
        created_at = DateTime6Field()
        updated_at = DateTime6Field()

        class Meta:
            table_name = "vma_enrollments"

    class VmaPairingCode(BaseModel):
        id = CharField(primary_key=True, max_length=36)
        pairing_code = CharField(unique=True, max_length=20)
        generated_by = CharField()
        used_by_enrollment = ForeignKeyField(VmaEnrollment, null=True, on_delete="SET NULL")
        expires_at = DateTime6Field()
        used_at = DateTime6Field(null=True)
        created_at = DateTime6Field()

        class Meta:
            table_name = "vma_pairing_codes"

    class VmaActiveConnection(BaseModel):
        id = CharField(primary_key=True, max_length=36)
        enrollment = ForeignKeyField(VmaEnrollment, unique=True, on_delete="CASCADE")
        vma_name = CharField()
        vma_fingerprint = CharField()
        ssh_user = CharField(max_length=50, default="vma_tunnel")
        connection_status = EnumField(("connected", "disconnected", "revoked"), check=True, default="connected")
        last_seen_at = DateTime6Field(null=True)
        connected_at = DateTime6Field()
        revoked_at = DateTime6Field(null=True)
        revoked_by = CharField(null=True)
        created_at = DateTime6Field()
        updated_at = DateTime6Field()

        class Meta:
            table_name = "vma_active_connections"

    class VmaConnectionAudit(BaseModel):
        id = BigAutoField()
        enrollment = ForeignKeyField(VmaEnrollment, null=True, on_delete="CASCADE")
        event_type = EnumField(AUDIT_EVENT_TYPES, check=True)
        vma_fingerprint = CharField(null=True)
        source_ip = CharField(null=True, max_length=45)
        user_agent = CharField(null=True)
        approved_by = CharField(null=True)
        event_details = CheckedJSONField(null=True)
        created_at = DateTime6Field()

        class Meta:
            table_name = "vma_connection_audit"

    models = [
        ApiUser, VmwareCredential, OsseaConfig, LinstorConfig, ReplicationSchedule, VmMachineGroup,
        ScheduleExecution, VmReplicationContext, ReplicationJob, VmDisk, CbtHistory, OsseaVolume, DeviceMapping,
        NbdExport, NetworkMapping, FailoverJob, VmGroupMembership, JobTracking, JobStep, JobExecutionLog, LogEvent,
        VmaEnrollment, VmaPairingCode, VmaActiveConnection, VmaConnectionAudit,
    ]
    _add_server_defaults(models)
    db.create_tables(models, safe=False)
    if mysql:
        for constraint in circular_constraints:
            db.execute_sql("ALTER TABLE vm_replication_contexts ADD " + constraint.sql)
    for sql in _view_sql(mysql).values():
        db.execute_sql(sql)


def down(migrator, db):
    mysql = isinstance(db, MySQLDatabase)
    for name in reversed(VIEW_NAMES):
        db.execute_sql(f"DROP VIEW IF EXISTS {name}")
    if mysql:
        for name, _ in CIRCULAR_FOREIGN_KEYS:
            db.execute_sql(f"ALTER TABLE vm_replication_contexts DROP FOREIGN KEY {name}")
    for table in ("vma_connection_audit", "vma_active_connections", "vma_pairing_codes", "vma_enrollments",
                  "log_events", "job_execution_log", "job_steps", "job_tracking", "vm_group_memberships",
                  "failover_jobs", "network_mappings", "nbd_exports", "device_mappings", "ossea_volumes",
                  "cbt_history", "vm_disks", "replication_jobs", "vm_replication_contexts", "schedule_executions",
                  "vm_machine_groups", "replication_schedules", "linstor_configs", "ossea_configs",
                  "vmware_credentials", "api_users"):
        db.execute_sql(f"DROP TABLE {table}")
