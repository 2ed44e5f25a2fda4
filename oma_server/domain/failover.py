"""Failover, test cleanup, rollback and failed-execution cleanup requests (docs/design/failover.md), and their reads.

Every mutating request is answered at once: it is validated, the per-context lock is taken and the
JobLog job (and, for a failover, its ``failover_jobs`` row, ``job_id`` = the JobLog id) is written in
ONE transaction — a rejected request writes nothing — then the caller hands the job to the engine
(:mod:`oma_server.workflows.failover`), which runs the steps.

* **Lock** (docs/design/failover.md#one-operation-per-vm-and-restarts): at most one non-terminal failover, cleanup or rollback per context. The context row
  is locked (written by ``claim_row`` and read ``FOR UPDATE``, so the lock holds across the nodes of a Galera
  cluster too, docs/design/galera.md; SQLite's IMMEDIATE transaction serialises writers) and the request
  is refused with FAILED_PRECONDITION naming the running job while a failover record of the context is
  non-terminal (a cleanup/rollback moves it to ``reverting``) or a failover/cleanup job of the context
  is running. CleanupFailedExecution ignores jobs whose process is gone (no heartbeat): it exists for them.
* **Idempotency**: ``request_id`` is stored in the job's metadata; repeating it answers with that job.
* ``failover_jobs.status`` moves only through :func:`move_failover_job` (docs/design/failover.md#failover-job-status, one guarded helper).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Protocol

from oma_server.db.database import db_for_update
from oma_server.db.models import (
    FAILOVER_ACTIVE_STATUSES,
    JOB_TRACKING_ACTIVE_STATUSES,
    ContextStatus,
    FailoverJob,
    FailoverJobStatus,
    FailoverJobType,
    JobCategory,
    JobStep,
    JobTracking,
    JobType,
    ReplicationJob,
    VmDisk,
    VmReplicationContext,
    utcnow,
)
from oma_server.db.transactions import claim_row, run_transaction
from oma_server.domain import cloudstack_config, contexts, joblog
from oma_server.domain.failover_config import FailoverConfig, FailoverRequest, resolve
from oma_server.domain.text_rules import quote
from oma_server.errors import FailedPrecondition, InvalidArgument, NotFound, require

log = logging.getLogger("oma_server.failover")

# JobLog operations of this module (job_tracking.operation).
FAILOVER_OPERATIONS = {"live": "unified-live-failover", "test": "unified-test-failover"}
END_TEST_OPERATION = "test-failover-cleanup"
ROLLBACK_OPERATIONS = {"live": "enhanced-live-failover-rollback", "test": "enhanced-test-failover-rollback"}
FAILED_EXECUTION_OPERATION = "failed-execution-cleanup"
COMPENSATION_OPERATION = "failover-compensation"
CLEANUP_OPERATIONS = (END_TEST_OPERATION, *ROLLBACK_OPERATIONS.values(), FAILED_EXECUTION_OPERATION)
ALL_OPERATIONS = (*FAILOVER_OPERATIONS.values(), *CLEANUP_OPERATIONS, COMPENSATION_OPERATION)
#: Steps a failover records (validation … status-update), used as the progress denominator.
FAILOVER_STEP_COUNT = 10

#: failover_jobs.status transitions (docs/design/failover.md#failover-job-status); "any non-terminal → failed" is spelled out.
TRANSITIONS: dict[FailoverJobStatus, tuple[FailoverJobStatus, ...]] = {
    FailoverJobStatus.PENDING: (FailoverJobStatus.VALIDATING, FailoverJobStatus.FAILED),
    FailoverJobStatus.VALIDATING: (FailoverJobStatus.SNAPSHOTTING, FailoverJobStatus.FAILED),
    FailoverJobStatus.SNAPSHOTTING: (FailoverJobStatus.CREATING_VM, FailoverJobStatus.FAILED),
    FailoverJobStatus.CREATING_VM: (FailoverJobStatus.SWITCHING_VOLUME, FailoverJobStatus.FAILED),
    FailoverJobStatus.SWITCHING_VOLUME: (FailoverJobStatus.POWERING_ON, FailoverJobStatus.FAILED),
    FailoverJobStatus.POWERING_ON: (FailoverJobStatus.COMPLETED, FailoverJobStatus.FAILED),
    FailoverJobStatus.COMPLETED: (FailoverJobStatus.REVERTING,),
    FailoverJobStatus.FAILED: (FailoverJobStatus.REVERTING,),
    FailoverJobStatus.REVERTING: (FailoverJobStatus.CLEANUP, FailoverJobStatus.FAILED),
    FailoverJobStatus.CLEANUP: (),
}
#: Progress of a failover record without JobLog steps (compatibility mapping, docs/design/failover.md#failover-job-status).
STATUS_PROGRESS = {"pending": 0, "validating": 10, "snapshotting": 25, "creating_vm": 50, "switching_volume": 75,
                   "powering_on": 90, "completed": 100, "failed": 0, "cleanup": 100}
FAILOVER_STATES = (ContextStatus.FAILED_OVER_TEST, ContextStatus.FAILED_OVER_LIVE, ContextStatus.CLEANUP_REQUIRED)


class Worker(Protocol):
    """What the request side needs from the engine: lease a new job to it, and whether a job still
    runs somewhere (its process renewed the lease)."""

    def lease(self, job_id: str) -> None: ...

    def alive(self, job_id: str) -> bool: ...


def move_failover_job(job_id: str, to: FailoverJobStatus | str, **values: Any) -> None:
    """Move a failover record to ``to`` when docs/design/failover.md#failover-job-status allows it from its current status (a conditional
    update: compare-and-set on both databases); FAILED_PRECONDITION otherwise."""
    to = FailoverJobStatus(to)
    sources = [s for s, targets in TRANSITIONS.items() if to in targets]
    now = utcnow()
    if to in (FailoverJobStatus.COMPLETED, FailoverJobStatus.FAILED, FailoverJobStatus.CLEANUP):
        values.setdefault("completed_at", now)
    moved = FailoverJob.update(status=to, **values).where(
        FailoverJob.job_id == job_id, FailoverJob.status.in_(sources)).execute()
    if not moved:
        row = FailoverJob.get_or_none(FailoverJob.job_id == job_id)
        if row is None:
            raise NotFound(f"no failover job {quote(job_id)}")
        raise FailedPrecondition(f"failover job {job_id} is {row.status}; it cannot become {to}")
    log.info("failover job %s → %s", job_id, to)


def external_id(prefix: str, vm_name: str, now: datetime) -> str:
    """``<prefix>-<vm name>-<unix>``, the VM name shortened so the id fits its 64-character column."""
    suffix = f"-{int(now.timestamp())}"
    room = joblog.EXTERNAL_ID_MAX - len(prefix) - 1 - len(suffix)
    return f"{prefix}-{vm_name[:max(room, 0)]}{suffix}"


def loads(text: Any) -> dict[str, Any]:
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@dataclass
class Started:
    """What a Start RPC answers."""

    job_id: str
    external_job_id: str
    context_id: str
    failover_job_id: str
    vm_name: str
    status: str = ""
    message: str = ""
    configuration: FailoverConfig | None = None
    existing: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# --- the lock and idempotency --------------------------------------------------------------------

def _lock_context(context_id: str) -> VmReplicationContext:
    """The per-context lock: a write of the row (claim_row), so that on a Galera cluster, where ``FOR UPDATE``
    locks one node only, two requests for one VM through different nodes conflict at certification (the loser is
    run again by run_transaction, or answered UNAVAILABLE "try again")."""
    claim_row(VmReplicationContext, context_id)
    return db_for_update(VmReplicationContext.select().where(VmReplicationContext.context_id == context_id)).get()


def _running_jobs(context_id: str) -> list[JobTracking]:
    return list(JobTracking.select().where(
        JobTracking.context_id == context_id, JobTracking.operation.in_(list(ALL_OPERATIONS)),
        JobTracking.status.in_(list(JOB_TRACKING_ACTIVE_STATUSES))).order_by(JobTracking.started_at.desc()))


def ensure_free(ctx: VmReplicationContext, worker: Worker | None, *, ignore_dead: bool = False,
                except_failover: str = "") -> None:
    """FAILED_PRECONDITION naming the running job while another failover/cleanup/rollback holds the VM."""
    for job in _running_jobs(ctx.context_id):
        if ignore_dead and worker is not None and not worker.alive(job.id):
            continue
        raise FailedPrecondition(
            f"VM {quote(ctx.vm_name)} is busy: {job.operation} job {job.id} ({job.external_job_id or '-'}) is running")
    active = FailoverJob.select().where(FailoverJob.vm_context == ctx.context_id,
                                        FailoverJob.status.in_(list(FAILOVER_ACTIVE_STATUSES)))
    for row in active:
        if row.job_id == except_failover:
            continue
        if ignore_dead and worker is not None and not worker.alive(row.job_id):
            continue
        raise FailedPrecondition(
            f"VM {quote(ctx.vm_name)} is busy: {row.job_type} failover {row.job_id} is {row.status}")


def _repeated(context_id: str, operations: Iterable[str], request_id: str) -> JobTracking | None:
    if not request_id:
        return None
    recent = (JobTracking.select().where(JobTracking.context_id == context_id,
                                         JobTracking.operation.in_(list(operations)))
              .order_by(JobTracking.started_at.desc()).limit(50))
    for job in recent:
        if (job.metadata or {}).get("request_id") == request_id:
            return job
    return None


def _check_cloudstack() -> None:
    cloudstack_config.require_active()


# --- StartFailover / StartLiveFailover / StartTestFailover ----------------------------------------

def _source_spec(ctx: VmReplicationContext, config: FailoverConfig, request: FailoverRequest) -> dict[str, Any]:
    disks = contexts.disks(ctx.context_id)
    first = disks[0] if disks else None
    return {
        "name": ctx.vm_name, "vmware_vm_id": ctx.vmware_vm_id, "vcenter_host": ctx.vcenter_host,
        "cpus": ctx.cpu_count or (first.cpu_count if first else 0) or 0,
        "memory_mb": ctx.memory_mb or (first.memory_mb if first else 0) or 0,
        "os_type": ctx.os_type or (first.os_type if first else "") or "",
        "power_state": ctx.power_state or "",
        "disks": [{"disk_id": d.disk_id, "capacity_bytes": d.capacity_bytes, "unit_number": d.unit_number,
                   "label": d.label, "ossea_volume_id": d.ossea_volume_id} for d in disks],
        "networks": (first.network_config if first else None) or [],
        "destination_name": config.destination_name, "destination_hostname": config.destination_hostname,
        "configuration": config.message_fields(),
        "test_duration": config.test_duration, "auto_cleanup": config.auto_cleanup,
        "custom_config": request.custom_config or {}, "notification_config": request.notification_config or {},
    }


def _existing_failover(job: JobTracking) -> Started:
    row = FailoverJob.get_or_none(FailoverJob.job_id == job.id)
    spec = loads(row.source_vm_spec) if row else {}
    ctx = VmReplicationContext.get_or_none(VmReplicationContext.context_id == job.context_id)
    return Started(job.id, job.external_job_id or "", job.context_id or "", job.id,
                   ctx.vm_name if ctx else (row.source_vm_name if row else ""),
                   status=str(row.status) if row else "", existing=True,
                   message="a request with this request_id already started this failover",
                   configuration=_config_from_spec(spec))


def _config_from_spec(spec: dict[str, Any]) -> FailoverConfig | None:
    values = spec.get("configuration")
    if not isinstance(values, dict):
        return None
    try:
        return FailoverConfig(**values)
    except TypeError:
        return None


def start_failover(request: FailoverRequest, actor: str, worker: Worker) -> Started:
    """Validate and record a failover (JobLog job + failover_jobs row, status pending) in one
    transaction; the caller submits the job to the engine."""
    require(request.context_id.strip(), "context_id is required")
    ctx = contexts.get(request.context_id)
    if request.failover_type in FAILOVER_OPERATIONS:
        earlier = _repeated(ctx.context_id, [FAILOVER_OPERATIONS[request.failover_type]], request.request_id)
        if earlier is not None:
            return _existing_failover(earlier)
    now = utcnow()
    config, ctx = resolve(request, now=now)
    _check_cloudstack()
    kind = config.failover_type
    ext = external_id(f"unified-{kind}-failover", ctx.vm_name, now)
    def claim() -> str:
        locked = _lock_context(ctx.context_id)
        # A job still running on the VM is the first thing to name (the operator waits for it or cancels it);
        # only a VM at rest in a failover state asks for an end, a rollback or a cleanup.
        ensure_free(locked, worker)
        if locked.current_status in FAILOVER_STATES:
            raise FailedPrecondition(
                f"VM {quote(ctx.vm_name)} is {locked.current_status}: end the test failover, roll back or clean up first")
        newest = (ReplicationJob.select(ReplicationJob.id).where(ReplicationJob.vm_context == ctx.context_id)
                  .order_by(ReplicationJob.created_at.desc()).first())
        job_id = joblog.start_job(
            JobType.FAILOVER, FAILOVER_OPERATIONS[kind], owner=actor, context_id=ctx.context_id, external_job_id=ext,
            category=JobCategory.FAILOVER, expected_steps=FAILOVER_STEP_COUNT,
            metadata={"context_id": ctx.context_id, "vmware_vm_id": ctx.vmware_vm_id, "vm_name": ctx.vm_name,
                      "failover_type": kind, "external_job_id": ext, "request_id": request.request_id or None,
                      "configuration": config.message_fields()},
        )
        worker.lease(job_id)
        JobTracking.update(metadata={**JobTracking.get_by_id(job_id).metadata, "failover_job_id": job_id}).where(
            JobTracking.id == job_id).execute()
        FailoverJob.create(
            vm_context=ctx.context_id, job_id=job_id, vm_id=ctx.vmware_vm_id,
            replication_job_id=newest.id if newest else None, job_type=kind, status=FailoverJobStatus.PENDING,
            source_vm_name=ctx.vm_name, source_vm_spec=dumps(_source_spec(ctx, config, request)),
            network_mappings=dumps({"network_strategy": config.network_strategy,
                                    "mappings": config.network_mappings,
                                    "unmapped": config.unmapped_networks}),
            started_at=now,
        )
        return job_id

    job_id = run_transaction(claim, what=f"starting a {kind} failover of VM {quote(ctx.vm_name)}")
    return Started(job_id, ext, ctx.context_id, job_id, ctx.vm_name, status=FailoverJobStatus.PENDING,
                   message=f"{kind} failover of {ctx.vm_name} started", configuration=config)


# --- EndTestFailover / CleanupTestFailover / StartRollback --------------------------------------

def _failover_record(identifier: str) -> FailoverJob:
    require(identifier, "job_id is required")
    row = FailoverJob.get_or_none(FailoverJob.job_id == identifier)
    if row is None:
        tracked = (JobTracking.select(JobTracking.id).where(
            JobTracking.external_job_id == identifier,
            JobTracking.operation.in_(list(FAILOVER_OPERATIONS.values())))
            .order_by(JobTracking.started_at.desc()).first())
        if tracked is not None:
            row = FailoverJob.get_or_none(FailoverJob.job_id == tracked.id)
    if row is None:
        raise NotFound(f"no failover job {quote(identifier)}")
    return row


def _newest_record(ctx: VmReplicationContext, failover_type: str) -> FailoverJob:
    row = (FailoverJob.select().where(FailoverJob.vm_context == ctx.context_id, FailoverJob.job_type == failover_type)
           .order_by(FailoverJob.created_at.desc(), FailoverJob.id.desc()).first())
    if row is None:
        raise FailedPrecondition(f"VM {quote(ctx.vm_name)} has no {failover_type} failover to clean up or roll back")
    return row


def _start_revert(record: FailoverJob, *, operation: str, ext: str, actor: str, worker: Worker,
                  request_id: str, metadata: dict[str, Any]) -> str:
    """The cleanup/rollback JobLog job (child of the failover job), the record moved to reverting."""
    if record.status not in (FailoverJobStatus.COMPLETED, FailoverJobStatus.FAILED):
        if record.status == FailoverJobStatus.CLEANUP:
            raise FailedPrecondition(f"failover {record.job_id} was already cleaned up")
        raise FailedPrecondition(f"failover {record.job_id} is {record.status}; wait for it to end")
    def claim() -> str:
        locked = _lock_context(record.vm_context_id)
        ensure_free(locked, worker)
        parent = record.job_id if JobTracking.select().where(JobTracking.id == record.job_id).exists() else None
        job_id = joblog.start_job(
            JobType.CLEANUP, operation, owner=actor, context_id=record.vm_context_id, external_job_id=ext,
            category=JobCategory.SYSTEM, parent_job_id=parent,
            metadata={**metadata, "failover_job_id": record.job_id, "request_id": request_id or None,
                      "context_id": record.vm_context_id},
        )
        worker.lease(job_id)
        move_failover_job(record.job_id, FailoverJobStatus.REVERTING, completed_at=None)
        return job_id

    return run_transaction(claim, what=f"starting {operation} of failover {record.job_id}")


def start_end_test(identifier: str, request_id: str, actor: str, worker: Worker) -> Started:
    record = _failover_record(identifier)
    if record.job_type != FailoverJobType.TEST:
        raise InvalidArgument(f"invalid_job_type: failover {record.job_id} is a {record.job_type} failover, "
                              "not a test failover (use StartRollback)")
    return _end_test(record, request_id, actor, worker, cleanup_type="")


def _end_test(record: FailoverJob, request_id: str, actor: str, worker: Worker, cleanup_type: str) -> Started:
    ctx = contexts.get(record.vm_context_id)
    earlier = _repeated(ctx.context_id, [END_TEST_OPERATION], request_id)
    if earlier is not None:
        return Started(earlier.id, earlier.external_job_id or "", ctx.context_id, record.job_id, ctx.vm_name,
                       existing=True, message="a request with this request_id already started this cleanup")
    _check_cloudstack()
    now = utcnow()
    ext = external_id("cleanup-test-failover", ctx.vm_name, now)
    job_id = _start_revert(record, operation=END_TEST_OPERATION, ext=ext, actor=actor, worker=worker,
                           request_id=request_id,
                           metadata={"vm_name": ctx.vm_name, "failover_type": "test", "cleanup_type": cleanup_type})
    return Started(job_id, ext, ctx.context_id, record.job_id, ctx.vm_name,
                   message=f"ending test failover {record.job_id} of {ctx.vm_name}")


def start_cleanup_test(*, vm_name: str, context_id: str, vmware_vm_id: str, cleanup_type: str, request_id: str,
                       actor: str, worker: Worker) -> Started:
    ctx = resolve_context(vm_name=vm_name, context_id=context_id, vmware_vm_id=vmware_vm_id)
    return _end_test(_newest_record(ctx, "test"), request_id, actor, worker, cleanup_type)


@dataclass
class RollbackRequest:
    context_id: str = ""
    vm_name: str = ""
    vmware_vm_id: str = ""
    failover_type: str = ""
    failover_job_id: str = ""
    power_on_source: bool | None = None
    force_cleanup: bool | None = None
    request_id: str = ""


def start_rollback(request: RollbackRequest, actor: str, worker: Worker) -> Started:
    require(request.context_id, "context_id is required")
    require(request.vm_name, "vm_name is required")
    if request.failover_type not in set(FailoverJobType):
        raise InvalidArgument(f"failover_type must be 'live' or 'test' (got {quote(request.failover_type)})")
    ctx = contexts.get(request.context_id)
    if request.vm_name != ctx.vm_name:
        raise InvalidArgument(f"vm_name {quote(request.vm_name)} is not the name of context {ctx.context_id} ({quote(ctx.vm_name)})")
    if request.vmware_vm_id and request.vmware_vm_id != ctx.vmware_vm_id:
        raise InvalidArgument(f"vmware_vm_id {quote(request.vmware_vm_id)} is not the VMware id of context {ctx.context_id}")
    kind = request.failover_type
    operation = ROLLBACK_OPERATIONS[kind]
    power_on = request.power_on_source if request.power_on_source is not None else kind == "live"
    force = bool(request.force_cleanup)
    earlier = _repeated(ctx.context_id, [operation], request.request_id)
    if earlier is not None:
        meta = earlier.metadata or {}
        return Started(earlier.id, earlier.external_job_id or "", ctx.context_id, meta.get("failover_job_id", ""),
                       ctx.vm_name, existing=True, message="a request with this request_id already started this rollback",
                       extra={"power_on_source": meta.get("power_on_source", power_on),
                              "force_cleanup": meta.get("force_cleanup", force), "rollback_type": f"{kind}_rollback",
                              "vmware_vm_id": ctx.vmware_vm_id})
    if request.failover_job_id:
        record = _failover_record(request.failover_job_id)
        if record.vm_context_id != ctx.context_id:
            raise InvalidArgument(f"failover {record.job_id} belongs to another VM")
        if record.job_type != kind:
            raise InvalidArgument(f"failover {record.job_id} is a {record.job_type} failover, not {kind}")
    else:
        record = _newest_record(ctx, kind)
    _check_cloudstack()
    now = utcnow()
    ext = external_id(f"rollback-{kind}-failover", ctx.vm_name, now)
    job_id = _start_revert(record, operation=operation, ext=ext, actor=actor, worker=worker,
                           request_id=request.request_id,
                           metadata={"vm_name": ctx.vm_name, "vmware_vm_id": ctx.vmware_vm_id, "failover_type": kind,
                                     "power_on_source": power_on, "force_cleanup": force})
    return Started(job_id, ext, ctx.context_id, record.job_id, ctx.vm_name,
                   message=f"rolling back {kind} failover {record.job_id} of {ctx.vm_name}",
                   extra={"power_on_source": power_on, "force_cleanup": force, "rollback_type": f"{kind}_rollback",
                          "vmware_vm_id": ctx.vmware_vm_id})


# --- CleanupFailedExecution -------------------------------------------------------------------------

def start_cleanup_failed(*, vm_name: str, context_id: str, request_id: str, actor: str, worker: Worker) -> Started:
    ctx = resolve_context(vm_name=vm_name, context_id=context_id)
    earlier = _repeated(ctx.context_id, [FAILED_EXECUTION_OPERATION], request_id)
    if earlier is not None:
        return Started(earlier.id, earlier.external_job_id or "", ctx.context_id,
                       (earlier.metadata or {}).get("failover_job_id") or "", ctx.vm_name, existing=True,
                       message="a request with this request_id already started this cleanup")
    newest = (FailoverJob.select().where(FailoverJob.vm_context == ctx.context_id)
              .order_by(FailoverJob.created_at.desc(), FailoverJob.id.desc()).first())
    if newest is None and ctx.current_status not in FAILOVER_STATES:
        raise FailedPrecondition(f"VM {quote(ctx.vm_name)} has no failover to clean up (status {ctx.current_status})")
    if ctx.current_job_id:
        raise FailedPrecondition(f"VM {quote(ctx.vm_name)} has an active replication job {ctx.current_job_id}; "
                                 "wait for it or cancel it first")
    _check_cloudstack()
    now = utcnow()
    ext = external_id("cleanup-failed", ctx.vm_name, now)
    def claim() -> str:
        locked = _lock_context(ctx.context_id)
        ensure_free(locked, worker, ignore_dead=True)
        job_id = joblog.start_job(
            JobType.CLEANUP, FAILED_EXECUTION_OPERATION, owner=actor, context_id=ctx.context_id, external_job_id=ext,
            category=JobCategory.SYSTEM, parent_job_id=newest.job_id if newest is not None and JobTracking.select().where(
                JobTracking.id == newest.job_id).exists() else None,
            metadata={"vm_name": ctx.vm_name, "failover_job_id": newest.job_id if newest else None,
                      "request_id": request_id or None, "context_id": ctx.context_id},
        )
        worker.lease(job_id)
        return job_id

    job_id = run_transaction(claim, what=f"starting the cleanup of the failed execution of VM {quote(ctx.vm_name)}")
    return Started(job_id, ext, ctx.context_id, newest.job_id if newest else "", ctx.vm_name,
                   message=f"cleaning up the failed execution of {ctx.vm_name}")


def resolve_context(*, vm_name: str = "", context_id: str = "", vmware_vm_id: str = "") -> VmReplicationContext:
    if context_id:
        ctx = contexts.get(context_id)
        if vm_name and vm_name != ctx.vm_name:
            raise InvalidArgument(f"vm_name {quote(vm_name)} is not the name of context {ctx.context_id}")
        return ctx
    if vmware_vm_id:
        found = list(VmReplicationContext.select().where(VmReplicationContext.vmware_vm_id == vmware_vm_id).limit(2))
        if len(found) == 1:
            return found[0]
    require(vm_name, "vm_name or context_id is required")
    return contexts.get_by_name(vm_name)


def readiness_context(vm_id: str) -> VmReplicationContext:
    """GetFailoverReadiness: a context id (preferred) or a VMware VM id."""
    require(vm_id, "vm_id (context id or VMware VM id) is required")
    ctx = VmReplicationContext.get_or_none(VmReplicationContext.context_id == vm_id)
    if ctx is not None:
        return ctx
    found = list(VmReplicationContext.select().where(VmReplicationContext.vmware_vm_id == vm_id).limit(2))
    if len(found) > 1:
        raise FailedPrecondition(f"VMware id {quote(vm_id)} is managed in several vCenters; give the context id")
    if not found:
        raise NotFound(f"no managed VM with context id or VMware id {quote(vm_id)}")
    return found[0]


# --- reads ------------------------------------------------------------------------------------------

@dataclass
class StatusView:
    job: JobTracking | None
    steps: list[JobStep]
    record: FailoverJob | None

    @property
    def terminal(self) -> bool:
        if self.job is not None:
            return self.job.status not in JOB_TRACKING_ACTIVE_STATUSES
        return self.record is None or self.record.status not in FAILOVER_ACTIVE_STATUSES


def find(identifier: str) -> StatusView:
    """By JobLog id, then external job id, then failover job id (never by context id: that would
    answer about an unrelated operation)."""
    require(identifier, "job_id is required")
    job = JobTracking.get_or_none(JobTracking.id == identifier, JobTracking.operation.in_(list(ALL_OPERATIONS)))
    if job is None:
        job = (JobTracking.select().where(JobTracking.external_job_id == identifier,
                                          JobTracking.operation.in_(list(ALL_OPERATIONS)))
               .order_by(JobTracking.started_at.desc()).first())
    record = None
    if job is not None:
        record = FailoverJob.get_or_none(FailoverJob.job_id == job.id)
        if record is None:
            failover_id = (job.metadata or {}).get("failover_job_id") or job.parent_job_id
            if failover_id:
                record = FailoverJob.get_or_none(FailoverJob.job_id == failover_id)
    else:
        record = FailoverJob.get_or_none(FailoverJob.job_id == identifier)
        if record is not None:
            job = JobTracking.get_or_none(JobTracking.id == record.job_id)
    if job is None and record is None:
        raise NotFound(f"no failover, cleanup or rollback job {quote(identifier)}")
    steps = joblog.steps_of([job.id])[job.id] if job is not None else []
    return StatusView(job, steps, record)


def record_progress(record: FailoverJob) -> int:
    """JobLog step progress of the failover job when it exists, else the status mapping."""
    job = JobTracking.get_or_none(JobTracking.id == record.job_id)
    if job is not None:
        return int(joblog.progress(job, joblog.steps_of([job.id])[job.id])["step_completion_percentage"])
    return STATUS_PROGRESS.get(record.status, 50)


def list_failover_jobs(*, failover_type: str = "", status: str = "", vm_id: str = "", context_id: str = ""):
    query = FailoverJob.select()
    if failover_type:
        if failover_type not in set(FailoverJobType):
            raise InvalidArgument(f"failover_type must be 'live' or 'test' (got {quote(failover_type)})")
        query = query.where(FailoverJob.job_type == failover_type)
    if status:
        if status not in set(FailoverJobStatus):
            raise InvalidArgument(f"unknown failover status {quote(status)}; one of {', '.join(FailoverJobStatus)}")
        query = query.where(FailoverJob.status == status)
    if vm_id:
        query = query.where(FailoverJob.vm_id == vm_id)
    if context_id:
        query = query.where(FailoverJob.vm_context == context_id)
    return query.order_by(FailoverJob.created_at.desc(), FailoverJob.id.desc())


def duration_seconds(started: datetime | None, completed: datetime | None) -> int:
    if started is None:
        return 0
    return max(0, int(((completed or utcnow()) - started).total_seconds()))


def os_disk_first(disks: list[VmDisk], os_disk: VmDisk | None) -> list[VmDisk]:
    """The OS disk first, then the others in controller/unit order."""
    ordered = sorted(disks, key=contexts.disk_sort_key)
    if os_disk is not None:
        ordered = [os_disk] + [d for d in ordered if d.id != os_disk.id]
    return ordered
