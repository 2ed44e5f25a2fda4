"""Peewee models for the OMA database: the 24 tables of docs/design/data-model.md plus ``api_users`` and
``api_revoked_tokens``.

The models are the runtime view of the schema; the schema itself is created by the versioned migrations in
``migrations/`` and ``migrate.schema_drift()`` checks that the two agree (CI fails on a model change without a
migration).  Conventions, so domain code never has to rediscover them:

* Table and column names are the original schema's.  A foreign key field is named after the column without ``_id``
  (``ReplicationJob.vm_context``), so ``job.vm_context_id`` is the raw id and ``job.vm_context`` the related row;
  queries and ``create()/update()`` accept either name.  Two columns get API-style attribute names:
  ``ReplicationJob.vcenter_host`` (column ``v_center_host``) and ``VmDisk.vmdk_path`` (column ``vm_dk_path``).
* The fixes of docs/design/data-model.md#tables-and-constraints are applied: ``vm_disks.job_id`` is nullable with ON DELETE SET NULL (deleting a
  job keeps disk rows and change ids), ``vm_replication_contexts.ossea_config_id`` is NULL (never 0) when no
  config applies, the long-text unique keys are varchars, and ``replication_jobs.nbd_export_name`` is varchar(191)
  so the original (status, nbd_export_name) index needs no prefix length.
* Every foreign key is a real constraint with the original ON DELETE (cascades are behaviour the code relies on),
  including the contexts ↔ jobs cycle (``current_job_id`` / ``last_successful_job_id``, ``DeferredForeignKey``
  here; the migration creates the constraints once both tables exist).
* Nullability: ``NULL`` in the original schema → nullable; ``NN`` or a default without ``NULL`` → NOT NULL (a NULL counter or
  flag is a bug, not a state).
* Types: the original ``timestamp`` columns are ``DATETIME(6)`` too (no 2038 limit, no session-time-zone
  conversion), ``tinyint unsigned`` is SMALLINT and ``bigint unsigned`` is BIGINT.
* Timestamps are naive UTC ``DATETIME(6)`` (see ``fields.UtcDateTimeField``); ``updated_at`` is set by ``save()`` and
  by every bulk ``Model.update(...)`` (``BaseModel.update`` adds it unless the caller sets it).  Upserts
  (``insert().on_conflict(update=...)``) must list ``updated_at`` themselves.
* UUID primary keys (the original ``DEFAULT uuid()``) are generated in Python so the caller knows the id.
* Decimals are rounded half-up in Python before they are written, so SQLite stores what MariaDB would.
* Status vocabularies are ``StrEnum`` classes (members *are* strings, usable directly in queries) with tuple
  constants for the groupings domain code needs; enum columns reject anything else (``fields.EnumField``).
  Columns that were ENUMs in the original also carry a CHECK; varchar columns whose vocabulary is closed
  (``replication_jobs.status``, docs/design/data-model.md#replication-job-status, ``replication_type``, ``vm_disks.sync_status``,
  ``cbt_history.sync_type``, the Volume Daemon's status columns, ``job_execution_log.log_level``) are validated in
  Python only, so an external writer such as the Volume Daemon is not broken by a new constraint.
"""
from __future__ import annotations

from decimal import ROUND_HALF_UP
from enum import StrEnum

from peewee import (
    AutoField,
    BigAutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    DecimalField,
    DeferredForeignKey,
    DoubleField,
    ForeignKeyField,
    IntegerField,
    Model,
    SmallIntegerField,
    TextField,
    sort_models,
)

from oma_server.db.database import database_proxy
from oma_server.db.fields import (
    EnumField,
    LongTextField,
    UtcDateTimeField,
    ValidatedJSONField,
    attach_server_defaults,
    new_uuid,
    utcnow,
)

# --------------------------------------------------------------------------------------------------------------
# Status vocabularies
# --------------------------------------------------------------------------------------------------------------


class ContextStatus(StrEnum):
    """``vm_replication_contexts.current_status`` (docs/design/data-model.md#vm-context-status)."""
    DISCOVERED = "discovered"
    REPLICATING = "replicating"
    READY_FOR_FAILOVER = "ready_for_failover"
    FAILED_OVER_TEST = "failed_over_test"
    FAILED_OVER_LIVE = "failed_over_live"
    COMPLETED = "completed"
    FAILED = "failed"
    CLEANUP_REQUIRED = "cleanup_required"


CONTEXT_STATUSES = tuple(ContextStatus)
#: Contexts in these states must not start a replication (CreateReplication → FAILED_PRECONDITION).
CONTEXT_REPLICATION_BLOCKED_STATUSES = (
    ContextStatus.FAILED_OVER_TEST, ContextStatus.FAILED_OVER_LIVE, ContextStatus.CLEANUP_REQUIRED)


class JobStatus(StrEnum):
    """``replication_jobs.status`` (docs/design/data-model.md#replication-job-status)."""
    PENDING = "pending"
    PROVISIONING = "provisioning"
    REPLICATING = "replicating"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


JOB_STATUSES = tuple(JobStatus)
JOB_TERMINAL_STATUSES = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)
#: "Active" = any non-terminal status (docs/design/data-model.md#replication-job-status).
REPLICATION_ACTIVE_STATUSES = tuple(s for s in JobStatus if s not in JOB_TERMINAL_STATUSES)
#: Original status names that are still accepted on read (API filters) and mean the mapped status.
LEGACY_JOB_STATUS_ALIASES = {"replication_failed": JobStatus.FAILED}


class ReplicationType(StrEnum):
    """``replication_jobs.replication_type``."""
    INITIAL = "initial"
    INCREMENTAL = "incremental"


class CbtSyncType(StrEnum):
    """``cbt_history.sync_type`` (docs/design/replication.md#change-ids)."""
    FULL = "full"
    INCREMENTAL = "incremental"


class VmaErrorClassification(StrEnum):
    """``replication_jobs.vma_error_classification``."""
    MIGRATION_ERROR = "migration_error"
    POLLING = "polling"
    JOB_LOST = "job_lost"
    VMA_UNREACHABLE_TIMEOUT = "vma_unreachable_timeout"
    VMA_REPORTED_FAILURE = "vma_reported_failure"


class DiskSyncStatus(StrEnum):
    """``vm_disks.sync_status`` (docs/design/data-model.md#disk-sync-status)."""
    PENDING = "pending"
    SYNCING = "syncing"
    COMPLETED = "completed"
    FAILED = "failed"


class NbdExportStatus(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    STOPPED = "stopped"
    ERROR = "error"


class OsseaVolumeStatus(StrEnum):
    CREATING = "creating"
    AVAILABLE = "available"
    ATTACHED = "attached"
    DETACHED = "detached"
    ERROR = "error"


class SnapshotStatus(StrEnum):
    """``ossea_volumes.snapshot_status`` and ``device_mappings.snapshot_status``."""
    NONE = "none"
    CREATING = "creating"
    READY = "ready"
    FAILED = "failed"
    ROLLBACK_COMPLETE = "rollback_complete"


class NetworkValidationStatus(StrEnum):
    PENDING = "pending"
    VALID = "valid"
    INVALID = "invalid"


class NetworkMappingType(StrEnum):
    LIVE = "live"
    TEST = "test"
    BOTH = "both"


class DeviceOperationMode(StrEnum):
    """``device_mappings.operation_mode``: attached to the OMA (replication) or to a failover VM."""
    OMA = "oma"
    FAILOVER = "failover"


class FailoverJobType(StrEnum):
    LIVE = "live"
    TEST = "test"


class FailoverJobStatus(StrEnum):
    """``failover_jobs.status`` (docs/design/failover.md#failover-job-status)."""
    PENDING = "pending"
    VALIDATING = "validating"
    SNAPSHOTTING = "snapshotting"
    CREATING_VM = "creating_vm"
    SWITCHING_VOLUME = "switching_volume"
    POWERING_ON = "powering_on"
    COMPLETED = "completed"
    FAILED = "failed"
    CLEANUP = "cleanup"
    REVERTING = "reverting"


FAILOVER_JOB_STATUSES = tuple(FailoverJobStatus)
FAILOVER_TERMINAL_STATUSES = (FailoverJobStatus.COMPLETED, FailoverJobStatus.FAILED, FailoverJobStatus.CLEANUP)
FAILOVER_ACTIVE_STATUSES = tuple(s for s in FailoverJobStatus if s not in FAILOVER_TERMINAL_STATUSES)


class ScheduleType(StrEnum):
    CRON = "cron"
    CHAIN = "chain"


class ScheduleReplicationType(StrEnum):
    """``replication_schedules.replication_type``."""
    FULL = "full"
    INCREMENTAL = "incremental"
    AUTO = "auto"


class ScheduleExecutionStatus(StrEnum):
    """``schedule_executions.status`` (docs/design/scheduler.md#execution-status)."""
    SCHEDULED = "scheduled"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


SCHEDULE_EXECUTION_TERMINAL_STATUSES = (
    ScheduleExecutionStatus.COMPLETED, ScheduleExecutionStatus.FAILED,
    ScheduleExecutionStatus.SKIPPED, ScheduleExecutionStatus.CANCELLED)


class JobType(StrEnum):
    """``job_tracking.job_type`` (replication work uses ``MIGRATION``, rollback/cleanup ``CLEANUP``)."""
    CLEANUP = "cleanup"
    FAILOVER = "failover"
    MIGRATION = "migration"
    CLOUDSTACK = "cloudstack"
    VOLUME_DAEMON = "volume_daemon"
    LINSTOR = "linstor"
    VIRTIO = "virtio"
    OSSEA = "ossea"
    SCHEDULER = "scheduler"
    DISCOVERY = "discovery"
    BULK_OPERATIONS = "bulk-operations"
    GROUP_MANAGEMENT = "group-management"
    CONFLICT_DETECTION = "conflict-detection"
    PHANTOM_DETECTION = "phantom-detection"
    SCHEDULE_MANAGEMENT = "schedule_management"
    SCHEDULE_CONTROL = "schedule_control"


class JobTrackingStatus(StrEnum):
    """``job_tracking.status`` (docs/design/jobs.md#job-and-step-lifecycle)."""
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


JOB_TRACKING_TERMINAL_STATUSES = (
    JobTrackingStatus.COMPLETED, JobTrackingStatus.FAILED, JobTrackingStatus.CANCELLED)
#: The statuses listed by the ``active_jobs`` view.
JOB_TRACKING_ACTIVE_STATUSES = (JobTrackingStatus.PENDING, JobTrackingStatus.RUNNING)


class JobCategory(StrEnum):
    SYSTEM = "system"
    FAILOVER = "failover"
    REPLICATION = "replication"
    SCHEDULER = "scheduler"
    DISCOVERY = "discovery"
    BULK = "bulk"


class StepStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"


class LogLevel(StrEnum):
    """``log_events.level`` and ``job_execution_log.log_level`` (``ERROR`` rows feed ``active_jobs.error_count``)."""
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARN = "WARN"
    ERROR = "ERROR"


class EnrollmentStatus(StrEnum):
    """``vma_enrollments.status`` (docs/design/enrollment.md#states)."""
    PENDING_VERIFICATION = "pending_verification"
    AWAITING_APPROVAL = "awaiting_approval"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"


#: Enrollments the expiry sweep may move to ``expired``.
ENROLLMENT_EXPIRABLE_STATUSES = (EnrollmentStatus.PENDING_VERIFICATION, EnrollmentStatus.AWAITING_APPROVAL)


class ConnectionStatus(StrEnum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    REVOKED = "revoked"


class AuditEventType(StrEnum):
    ENROLLMENT = "enrollment"
    VERIFICATION = "verification"
    APPROVAL = "approval"
    REJECTION = "rejection"
    CONNECTION = "connection"
    DISCONNECTION = "disconnection"
    REVOCATION = "revocation"


# --------------------------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------------------------


class BaseModel(Model):
    """Binds to ``database_proxy`` and sets ``updated_at`` in ``save()`` and in bulk ``update()``."""

    class Meta:
        database = database_proxy

    def save(self, force_insert=False, only=None):
        updated_at = self._meta.fields.get("updated_at")
        if updated_at is not None:
            self.updated_at = utcnow()
            if only is not None:
                only = [*only, updated_at]
        return super().save(force_insert=force_insert, only=only)

    @classmethod
    def update(cls, data=None, /, **update):
        """Bulk UPDATE that also sets ``updated_at`` (unless the caller sets it) on tables that have one."""
        data = cls._normalize_data(data, update)
        updated_at = cls._meta.fields.get("updated_at")
        if updated_at is not None and not any(getattr(key, "name", None) == "updated_at" for key in data):
            data[updated_at] = utcnow()
        return super().update(data)


# --------------------------------------------------------------------------------------------------------------
# Settings and credentials
# --------------------------------------------------------------------------------------------------------------


class VmwareCredential(BaseModel):
    id = AutoField()
    credential_name = CharField(255, unique=True)
    vcenter_host = CharField(255)
    username = CharField(255)
    password_encrypted = TextField()
    datacenter = CharField(255)
    is_active = BooleanField(default=True)
    is_default = BooleanField(default=False)
    created_at = UtcDateTimeField(default=utcnow)
    updated_at = UtcDateTimeField(default=utcnow)
    created_by = CharField(255, null=True)
    last_used = UtcDateTimeField(null=True)
    usage_count = IntegerField(default=0)
    # How the vCenter's TLS certificate is verified (added by migration 0002): a pinned SHA-1/SHA-256
    # thumbprint, or explicitly insecure; neither → the system CA store.
    tls_thumbprint = CharField(255, default="")
    tls_insecure = BooleanField(default=False)

    class Meta:
        table_name = "vmware_credentials"


class OsseaConfig(BaseModel):
    """CloudStack ("OSSEA") connection settings; the active config is the highest id with ``is_active``."""
    id = BigAutoField()
    name = CharField(255, unique=True)
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
    created_at = UtcDateTimeField(default=utcnow, null=True)
    updated_at = UtcDateTimeField(default=utcnow, null=True)
    is_active = BooleanField(default=True)

    class Meta:
        table_name = "ossea_configs"


class LinstorConfig(BaseModel):
    id = AutoField()
    name = CharField(255, unique=True)
    api_url = CharField(255)
    api_port = IntegerField(default=3370)
    api_protocol = CharField(10, default="http")
    api_key = CharField(512, null=True)
    api_secret = CharField(512, null=True)
    connection_timeout_seconds = IntegerField(default=30)
    retry_attempts = IntegerField(default=3)
    description = TextField(null=True)
    created_at = UtcDateTimeField(default=utcnow)
    updated_at = UtcDateTimeField(default=utcnow)
    is_active = BooleanField(default=True)

    class Meta:
        table_name = "linstor_configs"


class UserRole(StrEnum):
    """``api_users.role``: ``admin`` may do everything; ``operator`` everything but managing users and VMA
    enrollments (the method → role table is ``oma_server.domain.auth.ADMIN_ONLY_METHODS``)."""
    ADMIN = "admin"
    OPERATOR = "operator"


class ApiUser(BaseModel):
    """Logins of the OMA's own API (AuthService); ``password_hash`` is a salted hash, never the password.

    ``tokens_valid_after``: bearer tokens issued before this instant are refused (set by ChangePassword,
    RevokeUserTokens, disabling; a new user's starts at its creation, so a re-created name never inherits the
    old user's tokens)."""
    id = AutoField()
    username = CharField(255, unique=True)
    password_hash = CharField(255)
    created_at = UtcDateTimeField(default=utcnow)
    is_active = BooleanField(default=True)
    role = EnumField(UserRole, check=False, max_length=16, default=UserRole.ADMIN)
    tokens_valid_after = UtcDateTimeField(null=True)

    class Meta:
        table_name = "api_users"


class ApiRevokedToken(BaseModel):
    """Bearer tokens ended one by one (AuthService.Logout) before they expire: the token id (``jti``) and the
    token's own expiry, after which the row is pointless and is pruned."""
    jti = CharField(64, primary_key=True)
    user = ForeignKeyField(ApiUser, on_delete="CASCADE", backref="revoked_tokens")
    expires_at = UtcDateTimeField(index=True)
    revoked_at = UtcDateTimeField(default=utcnow)

    class Meta:
        table_name = "api_revoked_tokens"


# --------------------------------------------------------------------------------------------------------------
# Scheduler and machine groups
# --------------------------------------------------------------------------------------------------------------


class ReplicationSchedule(BaseModel):
    id = CharField(64, primary_key=True, default=new_uuid)
    name = CharField(255, unique=True)
    description = TextField(null=True)
    cron_expression = CharField(100)
    schedule_type = EnumField(ScheduleType, check=True, default=ScheduleType.CRON)
    timezone = CharField(50, default="UTC")
    chain_parent_schedule = ForeignKeyField(
        "self", null=True, on_delete="SET NULL", column_name="chain_parent_schedule_id", backref="chain_children")
    chain_delay_minutes = IntegerField(default=0)
    replication_type = EnumField(ScheduleReplicationType, check=True, default=ScheduleReplicationType.AUTO)
    max_concurrent_jobs = IntegerField(default=1)
    retry_attempts = IntegerField(default=3)
    retry_delay_minutes = IntegerField(default=30)
    enabled = BooleanField(default=True)
    skip_if_running = BooleanField(default=True)
    created_at = UtcDateTimeField(default=utcnow)
    updated_at = UtcDateTimeField(default=utcnow)
    created_by = CharField(255, default="system")

    class Meta:
        table_name = "replication_schedules"


class VmMachineGroup(BaseModel):
    id = CharField(64, primary_key=True, default=new_uuid)
    name = CharField(255, unique=True)
    description = TextField(null=True)
    schedule = ForeignKeyField(ReplicationSchedule, null=True, on_delete="SET NULL", backref="groups")
    max_concurrent_vms = IntegerField(default=5)
    priority = IntegerField(default=0)  # lower number = higher priority
    created_at = UtcDateTimeField(default=utcnow)
    updated_at = UtcDateTimeField(default=utcnow)
    created_by = CharField(255, default="system")

    class Meta:
        table_name = "vm_machine_groups"


class ScheduleExecution(BaseModel):
    """One firing of a schedule (no ``updated_at`` column by design)."""
    id = CharField(64, primary_key=True, default=new_uuid)
    schedule = ForeignKeyField(ReplicationSchedule, on_delete="CASCADE", backref="executions")
    group = ForeignKeyField(VmMachineGroup, null=True, on_delete="SET NULL", backref="executions")
    scheduled_at = UtcDateTimeField()
    started_at = UtcDateTimeField(null=True)
    completed_at = UtcDateTimeField(null=True)
    status = EnumField(ScheduleExecutionStatus, check=True, default=ScheduleExecutionStatus.SCHEDULED)
    vms_eligible = IntegerField(default=0)
    jobs_created = IntegerField(default=0)
    jobs_completed = IntegerField(default=0)
    jobs_failed = IntegerField(default=0)
    jobs_skipped = IntegerField(default=0)
    execution_details = ValidatedJSONField(null=True)
    error_message = TextField(null=True)
    error_details = ValidatedJSONField(null=True)
    execution_duration_seconds = IntegerField(null=True)
    created_at = UtcDateTimeField(default=utcnow)
    triggered_by = CharField(255, default="scheduler")
    # "<schedule id>@<fire time>" for clock firings, NULL otherwise: the unique index is the cross-process claim of
    # one tick (docs/design/galera.md).
    firing_key = CharField(128, null=True, unique=True)

    class Meta:
        table_name = "schedule_executions"


# --------------------------------------------------------------------------------------------------------------
# VM contexts, replication jobs and their per-disk state
# --------------------------------------------------------------------------------------------------------------


class VmReplicationContext(BaseModel):
    """Master record per managed VM."""
    context_id = CharField(64, primary_key=True, default=new_uuid)
    vm_name = CharField(255, index=True)
    vmware_vm_id = CharField(255, index=True)
    vm_path = CharField(500)
    vcenter_host = CharField(255, index=True)
    datacenter = CharField(255)
    current_status = EnumField(ContextStatus, check=True, default=ContextStatus.DISCOVERED, index=True)
    current_job = DeferredForeignKey(
        "ReplicationJob", null=True, on_delete="SET NULL", column_name="current_job_id", backref="+")
    total_jobs_run = IntegerField(default=0)
    successful_jobs = IntegerField(default=0)
    failed_jobs = IntegerField(default=0)
    last_successful_job = DeferredForeignKey(
        "ReplicationJob", null=True, on_delete="SET NULL", column_name="last_successful_job_id", backref="+")
    cpu_count = IntegerField(null=True)
    memory_mb = IntegerField(null=True)
    os_type = CharField(255, null=True)
    power_state = CharField(50, null=True)
    vm_tools_version = CharField(255, null=True)
    created_at = UtcDateTimeField(default=utcnow)
    updated_at = UtcDateTimeField(default=utcnow)
    first_job_at = UtcDateTimeField(null=True)
    last_job_at = UtcDateTimeField(null=True)
    last_status_change = UtcDateTimeField(default=utcnow)
    auto_added = BooleanField(default=False, index=True)
    last_scheduled_job_id = CharField(255, null=True)
    next_scheduled_at = UtcDateTimeField(null=True, index=True)
    scheduler_enabled = BooleanField(default=True, index=True)
    credential = ForeignKeyField(
        VmwareCredential, null=True, on_delete="SET NULL", column_name="credential_id", backref="contexts")
    ossea_config_id = IntegerField(null=True)  # no FK in the original schema; NULL (never 0) when no config is active
    last_operation_summary = ValidatedJSONField(null=True)

    class Meta:
        table_name = "vm_replication_contexts"


VmReplicationContext.add_index(
    VmReplicationContext.vmware_vm_id, VmReplicationContext.vcenter_host, unique=True, name="unique_vm_per_vcenter")
VmReplicationContext.add_index(
    VmReplicationContext.vm_name, VmReplicationContext.vcenter_host, unique=True, name="unique_vm_name_per_vcenter")


class ReplicationJob(BaseModel):
    """One row per replication run (``id`` = ``job-…``, generated by the domain code)."""
    id = CharField(191, primary_key=True)
    vm_context = ForeignKeyField(
        VmReplicationContext, null=True, on_delete="CASCADE", column_name="vm_context_id", backref="replication_jobs")
    source_vm_id = LongTextField()
    source_vm_name = LongTextField()
    source_vm_path = LongTextField()
    vcenter_host = LongTextField(column_name="v_center_host")
    datacenter = LongTextField()
    replication_type = EnumField(ReplicationType, check=False)
    target_network = LongTextField(null=True)
    status = EnumField(JobStatus, check=False, max_length=191, default=JobStatus.PENDING)
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
    nbd_export_name = CharField(191, null=True)
    target_device = LongTextField(null=True)
    ossea_config = ForeignKeyField(OsseaConfig, null=True, column_name="ossea_config_id", backref="replication_jobs")
    created_at = UtcDateTimeField(default=utcnow, null=True)
    updated_at = UtcDateTimeField(default=utcnow, null=True)
    started_at = UtcDateTimeField(null=True)
    completed_at = UtcDateTimeField(null=True)
    vma_sync_type = CharField(50, null=True)
    vma_current_phase = CharField(100, null=True)
    vma_throughput_mbps = DecimalField(10, 2, default=0, auto_round=True, rounding=ROUND_HALF_UP)
    vma_eta_seconds = IntegerField(null=True)
    vma_last_poll_at = UtcDateTimeField(null=True)
    vma_error_classification = EnumField(VmaErrorClassification, check=False, max_length=50, null=True)
    vma_error_details = TextField(null=True)
    setup_progress_percent = DecimalField(5, 2, default=0, auto_round=True, rounding=ROUND_HALF_UP)
    schedule_execution = ForeignKeyField(
        ScheduleExecution, null=True, on_delete="SET NULL", backref="replication_jobs")
    scheduled_by = CharField(255, null=True, index=True)
    vm_group = ForeignKeyField(VmMachineGroup, null=True, on_delete="SET NULL", backref="replication_jobs")
    # The OMA process running the job's workflow and its last heartbeat (migration 0004): a lease, so
    # several OMA processes on one database never drive the same job and a survivor takes over.
    worker = CharField(255, null=True, index=True)
    worker_heartbeat_at = UtcDateTimeField(null=True)
    # The VMware snapshot the VMA reads this job from (migration 0012): a resume after a VMA crash must
    # read the same snapshot (docs/design/resume.md). ``snapshot_id`` holds its name.
    vma_snapshot_moref = CharField(191, null=True)

    class Meta:
        table_name = "replication_jobs"
        indexes = (
            (("status", "nbd_export_name"), False),
            (("status", "updated_at"), False),
            (("status", "completed_at"), False),
        )


class VmDisk(BaseModel):
    """One row per (context, disk), updated in place by every job (``job_id`` = latest job, NULL after discovery)."""
    id = BigAutoField()
    vm_context = ForeignKeyField(
        VmReplicationContext, null=True, on_delete="CASCADE", index=False, backref="disks")
    job = ForeignKeyField(ReplicationJob, null=True, on_delete="SET NULL", backref="disks")
    disk_id = CharField(191)
    vmdk_path = LongTextField(column_name="vm_dk_path")
    size_gb = BigIntegerField()
    datastore = LongTextField(null=True)
    unit_number = BigIntegerField(null=True)
    label = LongTextField(null=True)
    capacity_bytes = BigIntegerField(null=True)
    provisioning_type = LongTextField(null=True)
    ossea_volume_id = BigIntegerField(null=True)  # numeric ossea_volumes.id, deliberately no FK
    disk_change_id = LongTextField(null=True)
    sync_status = EnumField(DiskSyncStatus, check=False, max_length=191, default=DiskSyncStatus.PENDING)
    sync_progress_percent = DoubleField(default=0)
    bytes_synced = BigIntegerField(default=0)
    created_at = UtcDateTimeField(default=utcnow, null=True)
    updated_at = UtcDateTimeField(default=utcnow, null=True)
    cpu_count = IntegerField(default=0)
    memory_mb = IntegerField(default=0)
    os_type = CharField(255, default="")
    vm_tools_version = CharField(255, default="")
    display_name = CharField(255, default="")
    power_state = CharField(255, default="")
    vmware_uuid = CharField(255, default="")
    network_config = ValidatedJSONField(null=True)
    annotation = TextField(null=True)
    bios_setup = TextField(null=True)
    # The last checkpoint of the disk's copy by ``job`` (migration 0012): every planned byte below it is
    # written and flushed on the replica, so a resume of that job starts here. NULL: none yet.
    checkpoint_offset = BigIntegerField(null=True)

    class Meta:
        table_name = "vm_disks"


VmDisk.add_index(VmDisk.vm_context, VmDisk.disk_id, unique=True, name="uk_vm_context_disk")


class CbtHistory(BaseModel):
    """Audit of change ids per job and disk."""
    id = BigAutoField()
    vm_context = ForeignKeyField(VmReplicationContext, null=True, on_delete="CASCADE", backref="cbt_history")
    job = ForeignKeyField(ReplicationJob, on_delete="CASCADE", backref="cbt_history")
    disk_id = LongTextField()
    change_id = LongTextField()
    previous_change_id = LongTextField(null=True)
    sync_type = EnumField(CbtSyncType, check=False)
    blocks_changed = BigIntegerField(null=True)
    bytes_transferred = BigIntegerField(null=True)
    sync_duration_seconds = BigIntegerField(null=True)
    sync_success = BooleanField(default=False)
    created_at = UtcDateTimeField(default=utcnow, null=True)

    class Meta:
        table_name = "cbt_history"


# --------------------------------------------------------------------------------------------------------------
# Volume Daemon tables (CloudStack volumes, attachments, NBD exports)
# --------------------------------------------------------------------------------------------------------------


class OsseaVolume(BaseModel):
    """CloudStack volume created for a replica; ``vm_disks.ossea_volume_id`` points at ``id`` numerically."""
    id = BigAutoField()
    vm_context = ForeignKeyField(VmReplicationContext, null=True, on_delete="CASCADE", backref="ossea_volumes")
    volume_id = CharField(191, unique=True)
    volume_name = LongTextField()
    size_gb = BigIntegerField()
    ossea_config = ForeignKeyField(OsseaConfig, null=True, column_name="ossea_config_id", backref="ossea_volumes")
    volume_type = LongTextField(null=True)
    device_path = LongTextField(null=True)
    mount_point = LongTextField(null=True)
    status = EnumField(OsseaVolumeStatus, check=False, max_length=191, default=OsseaVolumeStatus.CREATING)
    created_at = UtcDateTimeField(default=utcnow, null=True)
    updated_at = UtcDateTimeField(default=utcnow, null=True)
    snapshot_id = CharField(191, null=True)
    snapshot_created_at = UtcDateTimeField(null=True)
    snapshot_status = EnumField(SnapshotStatus, check=False, max_length=50, default=SnapshotStatus.NONE)

    class Meta:
        table_name = "ossea_volumes"


class DeviceMapping(BaseModel):
    """The Volume Daemon's view of an attached volume."""
    id = CharField(64, primary_key=True, default=new_uuid)
    vm_context = ForeignKeyField(VmReplicationContext, null=True, on_delete="CASCADE", backref="device_mappings")
    volume_uuid = CharField(64, unique=True)
    volume_id_numeric = BigIntegerField(null=True)
    vm_id = CharField(64)
    operation_mode = EnumField(DeviceOperationMode, check=True, default=DeviceOperationMode.OMA)
    cloudstack_device_id = IntegerField(null=True)
    requires_device_correlation = BooleanField(default=True)
    device_path = CharField(255, unique=True)
    cloudstack_state = CharField(32)
    linux_state = CharField(32)
    size = BigIntegerField()
    last_sync = UtcDateTimeField(default=utcnow)
    created_at = UtcDateTimeField(default=utcnow)
    updated_at = UtcDateTimeField(default=utcnow)
    ossea_snapshot_id = CharField(191, null=True)
    snapshot_created_at = UtcDateTimeField(null=True)
    snapshot_status = EnumField(SnapshotStatus, check=False, max_length=50, default=SnapshotStatus.NONE)
    persistent_device_name = CharField(255, null=True)
    symlink_path = CharField(255, null=True)

    class Meta:
        table_name = "device_mappings"


class NbdExport(BaseModel):
    id = BigAutoField()
    vm_context = ForeignKeyField(VmReplicationContext, null=True, on_delete="CASCADE", backref="nbd_exports")
    job = ForeignKeyField(ReplicationJob, null=True, on_delete="CASCADE", backref="nbd_exports")
    volume_id = CharField(64, default="")
    vm_disk = ForeignKeyField(VmDisk, null=True, on_delete="CASCADE", backref="nbd_exports")
    device_mapping = ForeignKeyField(
        DeviceMapping, field=DeviceMapping.volume_uuid, null=True, on_delete="CASCADE",
        column_name="device_mapping_uuid", backref="nbd_exports")
    export_name = CharField(191, unique=True)
    port = BigIntegerField()
    device_path = LongTextField()
    config_path = LongTextField(default="")
    status = EnumField(NbdExportStatus, check=False, max_length=191, default=NbdExportStatus.PENDING)
    created_at = UtcDateTimeField(default=utcnow, null=True)
    updated_at = UtcDateTimeField(default=utcnow, null=True)

    class Meta:
        table_name = "nbd_exports"


# --------------------------------------------------------------------------------------------------------------
# Network mappings and failover
# --------------------------------------------------------------------------------------------------------------


class NetworkMapping(BaseModel):
    id = BigAutoField()
    vm_id = CharField(255)  # in practice the VM name
    source_network_name = CharField(255)
    destination_network_id = CharField(255)
    destination_network_name = CharField(255)
    is_test_network = BooleanField(default=False)
    created_at = UtcDateTimeField(default=utcnow)
    updated_at = UtcDateTimeField(default=utcnow)
    vm_context = ForeignKeyField(
        VmReplicationContext, null=True, on_delete="CASCADE", index=False, backref="network_mappings")
    vmware_vm_id = CharField(255, null=True)
    validation_status = EnumField(NetworkValidationStatus, check=True, default=NetworkValidationStatus.PENDING)
    mapping_type = EnumField(NetworkMappingType, check=True, default=NetworkMappingType.LIVE)
    network_strategy = CharField(50, null=True)
    last_validated = UtcDateTimeField(null=True)

    class Meta:
        table_name = "network_mappings"


NetworkMapping.add_index(
    NetworkMapping.vm_id, NetworkMapping.source_network_name, NetworkMapping.is_test_network,
    unique=True, name="unique_vm_network_type")
NetworkMapping.add_index(
    NetworkMapping.vm_context, NetworkMapping.source_network_name, NetworkMapping.is_test_network,
    unique=True, name="unique_context_network_type")


class FailoverJob(BaseModel):
    id = BigAutoField()
    vm_context = ForeignKeyField(VmReplicationContext, null=True, on_delete="CASCADE", backref="failover_jobs")
    job_id = CharField(255, unique=True)  # equals the JobLog id of the failover job
    vm_id = CharField(255)
    replication_job_id = CharField(255, null=True)  # no FK: nulled explicitly when the replication job is deleted
    job_type = EnumField(FailoverJobType, check=True)
    status = EnumField(FailoverJobStatus, check=True, default=FailoverJobStatus.PENDING)
    source_vm_name = CharField(255)
    source_vm_spec = TextField(null=True)
    network_mappings = TextField(null=True)
    error_message = TextField(null=True)
    destination_vm_id = CharField(255, null=True)
    ossea_snapshot_id = CharField(255, null=True)
    linstor_snapshot_name = CharField(255, null=True)
    linstor_config_id = IntegerField(null=True)
    created_at = UtcDateTimeField(default=utcnow)
    updated_at = UtcDateTimeField(default=utcnow)
    started_at = UtcDateTimeField(null=True)
    completed_at = UtcDateTimeField(null=True)

    class Meta:
        table_name = "failover_jobs"


class VmGroupMembership(BaseModel):
    """A VM may belong to several groups (unique per group); no ``updated_at`` column by design."""
    id = CharField(64, primary_key=True, default=new_uuid)
    group = ForeignKeyField(VmMachineGroup, on_delete="CASCADE", index=False, backref="memberships")
    vm_context = ForeignKeyField(VmReplicationContext, on_delete="CASCADE", backref="group_memberships")
    enabled = BooleanField(default=True)
    priority = IntegerField(default=0)
    schedule_override = ForeignKeyField(
        ReplicationSchedule, null=True, on_delete="SET NULL", column_name="schedule_override_id",
        backref="override_memberships")
    added_at = UtcDateTimeField(default=utcnow)
    added_by = CharField(255, default="system")

    class Meta:
        table_name = "vm_group_memberships"


VmGroupMembership.add_index(VmGroupMembership.group, VmGroupMembership.vm_context, unique=True, name="unique_vm_group")


# --------------------------------------------------------------------------------------------------------------
# JobLog
# --------------------------------------------------------------------------------------------------------------


class JobTracking(BaseModel):
    """One row per tracked operation; children are deleted with their parent."""
    id = CharField(64, primary_key=True, default=new_uuid)
    parent_job = ForeignKeyField("self", null=True, on_delete="CASCADE", backref="children")
    job_type = EnumField(JobType, check=True, null=True)
    operation = CharField(100)
    status = EnumField(JobTrackingStatus, check=True, null=True, index=True)
    cloudstack_job_id = CharField(64, null=True)
    external_job_id = CharField(64, null=True, index=True)
    metadata = ValidatedJSONField(null=True)
    error_message = LongTextField(null=True)
    started_at = UtcDateTimeField(default=utcnow)
    created_at = UtcDateTimeField(default=utcnow)
    updated_at = UtcDateTimeField(default=utcnow)
    completed_at = UtcDateTimeField(null=True)
    percent_complete = SmallIntegerField(null=True)
    canceled_at = UtcDateTimeField(null=True)
    owner = CharField(100, null=True)
    context_id = CharField(64, null=True, index=True)  # VM context correlation, deliberately no FK
    job_category = EnumField(JobCategory, check=True, default=JobCategory.SYSTEM)
    # The OMA process running the job's workflow and its last heartbeat (migration 0011): the lease
    # replication_jobs has, for the failover family of workflows (docs/design/workflows.md).
    worker = CharField(255, null=True, index=True)
    worker_heartbeat_at = UtcDateTimeField(null=True)

    class Meta:
        table_name = "job_tracking"


class JobStep(BaseModel):
    id = BigAutoField()
    job = ForeignKeyField(JobTracking, on_delete="CASCADE", index=False, backref="steps")
    name = CharField(200)
    seq = IntegerField()
    status = EnumField(StepStatus, check=True, default=StepStatus.RUNNING)
    started_at = UtcDateTimeField(default=utcnow)
    completed_at = UtcDateTimeField(null=True)
    error_message = LongTextField(null=True)
    metadata = ValidatedJSONField(null=True)

    class Meta:
        table_name = "job_steps"


JobStep.add_index(JobStep.job, JobStep.seq, unique=True, name="uk_job_steps_job_seq")


class JobExecutionLog(BaseModel):
    """Phase-level log of a job; the JobLog writer adds an ``ERROR`` row when a step fails, which is what the
    ``active_jobs.error_count`` view column counts."""
    id = BigAutoField()
    job = ForeignKeyField(JobTracking, on_delete="CASCADE", backref="execution_log")
    log_level = EnumField(LogLevel, check=False, max_length=20)
    message = TextField()
    details = ValidatedJSONField(null=True)
    operation_phase = CharField(100, null=True)
    created_at = UtcDateTimeField(default=utcnow)

    class Meta:
        table_name = "job_execution_log"


class LogEvent(BaseModel):
    """Structured log records (INFO and above) that carry a job id; kept when the job is deleted."""
    id = BigAutoField()
    job = ForeignKeyField(JobTracking, null=True, on_delete="SET NULL", backref="log_events")
    step = ForeignKeyField(JobStep, null=True, on_delete="SET NULL", backref="log_events")
    level = EnumField(LogLevel, check=True)
    message = TextField()
    attrs = ValidatedJSONField(null=True)
    ts = UtcDateTimeField(default=utcnow)
    external_job_id = CharField(255, null=True)

    class Meta:
        table_name = "log_events"


# --------------------------------------------------------------------------------------------------------------
# VMA enrollment
# --------------------------------------------------------------------------------------------------------------


class VmaEnrollment(BaseModel):
    id = CharField(36, primary_key=True, default=new_uuid)
    pairing_code = CharField(20, unique=True)
    vma_public_key = TextField()
    vma_name = CharField(255, null=True)
    vma_version = CharField(255, null=True)
    vma_fingerprint = CharField(255, null=True)
    vma_ip_address = CharField(45, null=True)
    challenge_nonce = CharField(64, null=True)
    verification_attempts = IntegerField(default=0)  # failed signature checks; the fifth rejects
    status = EnumField(EnrollmentStatus, check=True, default=EnrollmentStatus.PENDING_VERIFICATION)
    approved_by = CharField(255, null=True)
    approved_at = UtcDateTimeField(null=True)
    expires_at = UtcDateTimeField()
    created_at = UtcDateTimeField(default=utcnow)
    updated_at = UtcDateTimeField(default=utcnow)

    class Meta:
        table_name = "vma_enrollments"


class VmaPairingCode(BaseModel):
    id = CharField(36, primary_key=True, default=new_uuid)
    pairing_code = CharField(20, unique=True)
    generated_by = CharField(255)
    used_by_enrollment = ForeignKeyField(
        VmaEnrollment, null=True, on_delete="SET NULL", column_name="used_by_enrollment_id", backref="pairing_codes")
    expires_at = UtcDateTimeField()
    used_at = UtcDateTimeField(null=True)
    created_at = UtcDateTimeField(default=utcnow)

    class Meta:
        table_name = "vma_pairing_codes"


class VmaActiveConnection(BaseModel):
    id = CharField(36, primary_key=True, default=new_uuid)
    enrollment = ForeignKeyField(VmaEnrollment, unique=True, on_delete="CASCADE", backref="connections")
    vma_name = CharField(255)
    vma_fingerprint = CharField(255)
    ssh_user = CharField(50, default="vma_tunnel")
    # The OMA-side port the VMA's RemoteForward listens on. NULL once revoked, so the port can be reused.
    reverse_tunnel_port = IntegerField(null=True, unique=True)
    connection_status = EnumField(ConnectionStatus, check=True, default=ConnectionStatus.CONNECTED)
    last_seen_at = UtcDateTimeField(null=True)
    connected_at = UtcDateTimeField(default=utcnow)
    revoked_at = UtcDateTimeField(null=True)
    revoked_by = CharField(255, null=True)
    created_at = UtcDateTimeField(default=utcnow)
    updated_at = UtcDateTimeField(default=utcnow)

    class Meta:
        table_name = "vma_active_connections"


class VmaConnectionAudit(BaseModel):
    id = BigAutoField()
    enrollment = ForeignKeyField(VmaEnrollment, null=True, on_delete="CASCADE", backref="audit_events")
    event_type = EnumField(AuditEventType, check=True)
    vma_fingerprint = CharField(255, null=True)
    source_ip = CharField(45, null=True)
    user_agent = CharField(255, null=True)
    approved_by = CharField(255, null=True)  # the acting user of the event
    event_details = ValidatedJSONField(null=True)
    created_at = UtcDateTimeField(default=utcnow)

    class Meta:
        table_name = "vma_connection_audit"


#: Every table model in dependency order (parents first; the contexts → jobs back-references are deferred).
ALL_MODELS: tuple[type[BaseModel], ...] = tuple(sort_models([
    VmwareCredential, OsseaConfig, LinstorConfig, ApiUser, ApiRevokedToken, ReplicationSchedule, VmMachineGroup,
    ScheduleExecution, VmReplicationContext, ReplicationJob, VmDisk, CbtHistory, OsseaVolume, DeviceMapping, NbdExport,
    NetworkMapping, FailoverJob, VmGroupMembership, JobTracking, JobStep, JobExecutionLog, LogEvent, VmaEnrollment, VmaPairingCode,
    VmaActiveConnection, VmaConnectionAudit,
]))
TABLE_NAMES = frozenset(model._meta.table_name for model in ALL_MODELS)

attach_server_defaults(ALL_MODELS)
