"""The scheduler: fires replication schedules for their machine groups (docs/design/scheduler.md).

One background thread does everything that is not a request: it sleeps until the earliest next fire
time of the enabled cron schedules (a reload — after every schedule write, and every
``scheduler_reload_seconds`` for writes made by other OMA processes — recomputes them; a changed
expression or time zone is re-registered), fires what is due, dispatches queued manual triggers and
follows the executions that still have work (about once a second while there are any). Work in one
thread needs no locks around the firing algorithm; requests only admit triggers and read the status.

A firing is one ``schedule_executions`` row (uuid) and one ``scheduler/schedule-execution`` JobLog job:

1. admission, in one transaction with the schedule row locked: the global cap (running executions
   across all schedules) and the schedule's ``skip_if_running`` (its previous execution still
   running, or a job it created still active) record the firing as ``skipped`` with the reason. A
   timed firing is claimed by its fire time (``scheduled_at``), so OMA processes sharing the database
   fire it once;
2. dispatch: the groups on the schedule by priority then name, and VMs whose membership overrides
   the schedule to this one; per group a child ``conflict-detection/check-vm-conflicts`` job checks
   each enabled member (by membership priority, then added_at) against the rules of docs/design/scheduler.md#one-firing — a VM with
   an active job is always skipped — reserving capacity for the eligible ones; each eligible VM gets a
   replication through :func:`replications.create` (which claims the VM atomically), linked to the
   execution, the group and, in the JobLog, to the execution's job;
3. the execution ends ``completed`` (``failed`` when no job could be created because of failures);
   its per-VM results, attempts and counters are in ``execution_details`` (read and written as an
   :class:`~oma_server.domain.schedule_state.ExecutionState`).

Afterwards the thread keeps following the execution: attempts whose replication ended update
``jobs_completed``/``jobs_failed``; a failed attempt (dispatch or replication; a cancelled one is
the operator's decision and is not retried) is retried up to ``retry_attempts`` times,
``retry_delay_minutes`` apart, within the same execution and under the same conflict rules (a
capacity conflict postpones the retry, any other conflict ends it). When nothing is
left to wait for, the execution is settled; if it completed and every VM's last attempt completed,
the schedule's enabled chain children fire ``chain_delay_minutes`` later (``triggered_by='chain'``).
This state lives in the execution row, so a restarted process resumes its own executions.

At start, executions this process left ``running`` (or any older than a dispatch can take) are
``cancelled`` ("interrupted"); fire times missed while the server was down are not caught up.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Iterable

from peewee import IntegrityError

from oma_server.config import Settings
from oma_server.db.database import database_proxy as db
from oma_server.db.database import db_for_update
from oma_server.db.fields import new_uuid
from oma_server.db.models import (
    CONTEXT_REPLICATION_BLOCKED_STATUSES,
    JOB_TERMINAL_STATUSES,
    REPLICATION_ACTIVE_STATUSES,
    JobCategory,
    JobStatus,
    JobTracking,
    JobTrackingStatus,
    JobType,
    ReplicationJob,
    ReplicationSchedule,
    ScheduleExecution,
    ScheduleExecutionStatus,
    ScheduleType,
    VmGroupMembership,
    VmMachineGroup,
    VmReplicationContext,
    utcnow,
)
from oma_server.db.transactions import run_transaction
from oma_server.domain import joblog, replications, schedules
from oma_server.domain.schedule_rules import (
    CAPACITY_CONFLICTS,
    REPLICATION_TYPE,
    Attempt,
    Capacity,
    Conflict,
    active_jobs,
    conflict_of,
    current_job,
    iso,
    members_of,
    parse_time,
)
from oma_server.domain.schedule_state import AttemptRecord, ChainFiring, Counters, ExecutionState, GroupSummary, VmState
from oma_server.domain.schedules import CHAIN_TRIGGER
from oma_server.domain.schedules import SCHEDULER_OWNER as OWNER
from oma_server.domain.text_rules import quote
from oma_server.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:
    from oma_server.workflows.replication import ReplicationEngine

log = logging.getLogger("oma_server.scheduler")

MONITOR_SECONDS = 1.0
# A dispatch takes seconds; a `running` execution older than this belongs to a process that died.
STALE_DISPATCH = timedelta(minutes=10)
# Executions older than this are not looked at for unfinished work at start (retries and chain delays
# are bounded well below it).
OPEN_WORK_HORIZON = timedelta(days=30)

# --- the engine ----------------------------------------------------------------------------------

@dataclass
class Registration:
    """An enabled cron schedule the engine fires (in memory)."""
    schedule_id: str
    schedule_name: str
    cron_expression: str
    timezone: str
    next_run: datetime
    last_run: datetime | None = None
    job_count: int = 0


@dataclass
class Admission:
    """A recorded firing: its execution (``running``, or ``skipped`` with the reason) and JobLog job
    (empty when skipped)."""
    execution: ScheduleExecution
    schedule: ReplicationSchedule
    job_id: str


@dataclass
class SchedulerStatus:
    is_running: bool
    started_at: datetime | None
    running_executions: int
    max_concurrent_executions: int
    last_reload_at: datetime | None
    registrations: list[dict[str, Any]] = field(default_factory=list)


class Scheduler:
    def __init__(self, settings: Settings, replication: ReplicationEngine):
        self._replication = replication
        self.instance = replication.instance
        self.max_running = settings.scheduler_max_concurrent_executions
        self._reload_seconds = settings.scheduler_reload_seconds
        self._lock = threading.Lock()
        self._registrations: dict[str, Registration] = {}
        self._busy: Counter[str] = Counter()  # admitted, not yet dispatched executions per schedule
        self._queue: queue.Queue[tuple[str, str]] = queue.Queue()
        self._open: set[str] = set()  # executions (of this process) with work left
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self.started_at: datetime | None = None
        self._last_reload: datetime | None = None
        self._last_reload_clock = 0.0

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Cancel interrupted executions, pick up unfinished ones, register the schedules, start the
        thread. Recorded as a ``scheduler/service-start`` job when there is anything to schedule."""
        self.started_at = utcnow()
        with db.connection_context():
            interrupted = self._cancel_interrupted()
            self._open = self._unfinished()
            self.reload()
            if interrupted or self._registrations or self._open:
                job = joblog.start_job(JobType.SCHEDULER, "service-start", owner=OWNER, category=JobCategory.SCHEDULER,
                                       metadata={"instance": self.instance})
                with joblog.step(job, "load-schedules") as step:
                    step.details.update(registered=len(self._registrations), interrupted_executions=interrupted,
                                        unfinished_executions=len(self._open))
                with joblog.step(job, "start-cron"):
                    self._thread.start()
                joblog.end_job(job, JobTrackingStatus.COMPLETED)
            else:
                self._thread.start()
        log.info("scheduler started: %d schedules registered", len(self._registrations))

    def stop(self) -> None:
        """Let the current firing finish, stop, and cancel admitted executions that never started."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        with db.connection_context():
            while True:
                try:
                    execution_id, _ = self._queue.get_nowait()
                except queue.Empty:
                    break
                self._cancel(execution_id, "cancelled: the OMA server stopped before the execution started")

    def reload(self) -> None:
        """Re-read the enabled cron schedules: keep the fire time of unchanged ones, compute it for new
        or changed ones (expression, time zone), drop the others. Cheap: one query."""
        with self._lock:  # reading under the lock: concurrent reloads never install an older state
            now = utcnow()
            rows = ReplicationSchedule.select().where(ReplicationSchedule.enabled == True,  # noqa: E712
                                                      ReplicationSchedule.schedule_type == ScheduleType.CRON)
            registrations: dict[str, Registration] = {}
            for s in rows:
                old = self._registrations.get(s.id)
                if old and (old.cron_expression, old.timezone) == (s.cron_expression, s.timezone):
                    old.schedule_name = s.name
                    registrations[s.id] = old
                    continue
                try:
                    next_run = schedules.next_fire(s.cron_expression, s.timezone, now)
                except InvalidArgument as exc:
                    log.warning("schedule %s (%s) cannot be registered: %s", s.name, s.id, exc.message)
                    continue
                registrations[s.id] = Registration(s.id, s.name, s.cron_expression, s.timezone, next_run,
                                                   old.last_run if old else None, old.job_count if old else 0)
            self._registrations = registrations
            self._last_reload, self._last_reload_clock = now, time.monotonic()
        self._wake.set()

    def status(self) -> SchedulerStatus:
        running = ScheduleExecution.select().where(ScheduleExecution.status == ScheduleExecutionStatus.RUNNING).count()
        with self._lock:
            registrations = [{
                "schedule_id": r.schedule_id, "schedule_name": r.schedule_name, "next_run": r.next_run,
                "last_run": r.last_run, "is_running": self._busy[r.schedule_id] > 0, "job_count": r.job_count,
            } for r in sorted(self._registrations.values(), key=lambda r: r.schedule_name)]
        return SchedulerStatus(self._thread.is_alive(), self.started_at, running, self.max_running,
                               self._last_reload, registrations)

    # --- admission -------------------------------------------------------------------------------
    def trigger(self, schedule_id: str, triggered_by: str, reason: str) -> Admission:
        """TriggerSchedule: admit a firing now (same rules as a timed one) and return at once."""
        schedule = schedules.get(schedule_id)
        if not schedule.enabled:
            raise FailedPrecondition(f"cannot trigger disabled schedule {quote(schedule.name)}; enable it first")
        admission = self._admit(schedule.id, utcnow(), triggered_by or "manual", reason)
        assert admission is not None  # only clock firings can be claimed by another process
        return admission

    def _skip_reason(self, schedule: ReplicationSchedule) -> str | None:
        running = ScheduleExecution.select().where(ScheduleExecution.status == ScheduleExecutionStatus.RUNNING).count()
        if running >= self.max_running:
            return f"{running} schedule executions are already running (limit {self.max_running})"
        if not schedule.skip_if_running:
            return None
        previous = ScheduleExecution.select(ScheduleExecution.id).where(
            ScheduleExecution.schedule == schedule.id, ScheduleExecution.status == ScheduleExecutionStatus.RUNNING).first()
        if previous:
            return f"skip_if_running: execution {previous.id} of this schedule is still running"
        job = (ReplicationJob.select(ReplicationJob.id)
               .join(ScheduleExecution, on=(ReplicationJob.schedule_execution == ScheduleExecution.id))
               .where(ScheduleExecution.schedule == schedule.id,
                      ReplicationJob.status.in_(REPLICATION_ACTIVE_STATUSES)).first())
        if job:
            return f"skip_if_running: replication job {job.id} started by this schedule is still active"
        return None

    def _admit(self, schedule_id: str, scheduled_at: datetime, triggered_by: str, reason: str) -> Admission | None:
        """Record a firing: skipped (cap, skip_if_running) or running with its JobLog job, in one
        transaction with the schedule row locked. None when another process already fired this
        clock firing (same schedule and fire time)."""
        now = utcnow()
        execution_id = new_uuid()
        # A clock firing's claim is its unique firing_key: the FOR UPDATE below serialises the schedulers on one
        # server, but on a Galera cluster it locks one node only; there the second insert of the key fails
        # certification, run_transaction runs it again and the exists() check then sees the first firing.
        firing_key = f"{schedule_id}@{scheduled_at.isoformat()}" if triggered_by == OWNER else None

        def fire() -> tuple[ReplicationSchedule, ScheduleExecution, str, str | None] | None:
            schedule = db_for_update(ReplicationSchedule.select().where(ReplicationSchedule.id == schedule_id)).first()
            if schedule is None:
                raise NotFound(f"no schedule {quote(schedule_id)}")
            if triggered_by == OWNER and ScheduleExecution.select().where(
                    ScheduleExecution.schedule == schedule_id, ScheduleExecution.scheduled_at == scheduled_at,
                    ScheduleExecution.triggered_by == triggered_by).exists():
                return None
            details: dict[str, Any] = {
                "execution_id": execution_id, "schedule_id": schedule.id, "schedule_name": schedule.name,
                "triggered_by": triggered_by, "trigger_reason": reason or None, "instance": self.instance,
            }
            skip = self._skip_reason(schedule)
            if skip:
                details.update(status=ScheduleExecutionStatus.SKIPPED.value, skipped_reason=skip,
                               summary=f"skipped: {skip}")
                execution = ScheduleExecution.create(
                    id=execution_id, schedule=schedule.id, scheduled_at=scheduled_at, started_at=now, completed_at=now,
                    status=ScheduleExecutionStatus.SKIPPED, triggered_by=triggered_by, execution_details=details,
                    execution_duration_seconds=0, firing_key=firing_key)
                job_id = ""
            else:
                job_id = joblog.start_job(
                    JobType.SCHEDULER, "schedule-execution", owner=OWNER, external_job_id=execution_id,
                    category=JobCategory.SCHEDULER,
                    metadata={"schedule_id": schedule.id, "execution_id": execution_id, "triggered_by": triggered_by})
                details.update(status=ScheduleExecutionStatus.RUNNING.value, job_id=job_id)
                execution = ScheduleExecution.create(
                    id=execution_id, schedule=schedule.id, scheduled_at=scheduled_at, started_at=now,
                    status=ScheduleExecutionStatus.RUNNING, triggered_by=triggered_by, execution_details=details,
                    firing_key=firing_key)
                step = "fire-schedule" if triggered_by in (OWNER, CHAIN_TRIGGER) else "trigger-schedule"
                with joblog.step(job_id, step) as handle:
                    handle.details.update(triggered_by=triggered_by, reason=reason or None,
                                          scheduled_at=iso(scheduled_at))
            return schedule, execution, job_id, skip

        try:
            fired = run_transaction(fire, what=f"firing schedule {schedule_id}")
        except IntegrityError:
            if firing_key is None:
                raise
            fired = None  # another process committed this firing between our check and our insert
        if fired is None:
            return None
        schedule, execution, job_id, skip = fired
        with self._lock:
            registration = self._registrations.get(schedule.id)
            if registration is not None:
                registration.last_run, registration.job_count = now, registration.job_count + 1
            if not skip:
                self._busy[schedule.id] += 1
        if skip:
            log.info("schedule %s: firing skipped: %s", schedule.name, skip)
        else:
            self._queue.put((execution_id, schedule.id))
            self._wake.set()
        return Admission(execution, schedule, job_id)

    # --- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                with db.connection_context():
                    if time.monotonic() - self._last_reload_clock >= self._reload_seconds:
                        self.reload()
                    self._fire_due()
                    self._dispatch_queued()
                    self._follow_open()
            except Exception:  # noqa: BLE001 - a database hiccup must not stop the scheduler
                log.exception("scheduler round failed; trying again")
            self._wake.wait(self._sleep_seconds())
            self._wake.clear()

    def _sleep_seconds(self) -> float:
        with self._lock:
            next_runs = [r.next_run for r in self._registrations.values()]
        wait = self._reload_seconds
        if next_runs:
            wait = min(wait, (min(next_runs) - utcnow()).total_seconds())
        if self._open:
            wait = min(wait, MONITOR_SECONDS)
        return max(0.0, wait)

    def _fire_due(self) -> None:
        now = utcnow()
        with self._lock:
            due = [r for r in self._registrations.values() if r.next_run <= now]
            fire_times = {r.schedule_id: r.next_run for r in due}
            for r in due:  # missed fire times (a long round, a suspended host) are not caught up
                r.next_run = schedules.next_fire(r.cron_expression, r.timezone, max(now, r.next_run))
        for schedule_id, fire_at in fire_times.items():
            schedule = ReplicationSchedule.get_or_none(ReplicationSchedule.id == schedule_id)
            if schedule is None or not schedule.enabled:
                continue  # changed by another process; the next reload drops it
            self._admit(schedule_id, fire_at, OWNER, "")

    def _dispatch_queued(self) -> None:
        while not self._stopping.is_set():
            try:
                execution_id, schedule_id = self._queue.get_nowait()
            except queue.Empty:
                return
            try:
                self._dispatch(execution_id)
            except Exception as exc:  # noqa: BLE001 - a bug fails this execution, not the scheduler
                log.exception("schedule execution %s crashed", execution_id)
                self._end(execution_id, ScheduleExecutionStatus.FAILED, f"internal error: {type(exc).__name__}: {exc}")
            finally:
                with self._lock:
                    self._busy[schedule_id] -= 1

    # --- dispatch --------------------------------------------------------------------------------
    def _dispatch(self, execution_id: str) -> None:
        execution = ScheduleExecution.get_or_none(ScheduleExecution.id == execution_id)
        if execution is None or execution.status != ScheduleExecutionStatus.RUNNING:
            return  # the schedule was deleted meanwhile (executions cascade)
        schedule = ReplicationSchedule.get_by_id(execution.schedule_id)
        state = ExecutionState.from_json(execution.execution_details)
        tracking = state.job_id
        state.vms, state.groups = [], []
        group_failures: list[dict[str, Any]] = []
        processed = members_of(schedule.id)
        for group, contexts in processed:
            by_id = {c.context_id: c for c in contexts}
            results: list[VmState] = []
            try:
                with joblog.step(tracking, "dispatch-group", {"group_id": group.id, "group_name": group.name}) as step:
                    results = self._detect(execution.id, schedule, group, contexts, tracking)
                    for entry in results:
                        if entry.can_schedule:
                            entry.attempts.append(self._dispatch_vm(
                                execution.id, schedule, group.id, by_id[entry.vm_context_id], tracking, 1))
                    step.details.update(asdict(Counters.of(results)))
            except joblog.StepFailed as exc:  # fail the group closed: nothing of it runs unchecked
                results = self._fail_group(group, contexts, results, exc.message)
                group_failures.append({"group_id": group.id, "group_name": group.name, "error": exc.message})
            state.vms.extend(results)
            state.groups.append(GroupSummary(group.id, group.name, Counters.of(results)))
            ScheduleExecution.update(execution_details=state.to_json()).where(
                ScheduleExecution.id == execution.id).execute()
        next_run = schedules.next_execution(schedule)
        if state.vms:
            VmReplicationContext.update(next_scheduled_at=next_run).where(
                VmReplicationContext.context_id.in_([vm.vm_context_id for vm in state.vms])).execute()
        self._finish_dispatch(execution, schedule, state, group_failures,
                              processed[0][0].id if len(processed) == 1 else None)

    def _detect(self, execution_id: str, schedule: ReplicationSchedule, group: VmMachineGroup,
                contexts: list[VmReplicationContext], parent_job: str) -> list[VmState]:
        """The group's conflict detection as a child JobLog job; results keyed by context id."""
        started = time.monotonic()
        job = joblog.start_job(JobType.CONFLICT_DETECTION, "check-vm-conflicts", owner=OWNER, parent_job_id=parent_job,
                               category=JobCategory.SCHEDULER,
                               metadata={"execution_id": execution_id, "schedule_id": schedule.id, "group_id": group.id})
        try:
            with joblog.step(job, "fetch-active-jobs") as step:
                active = active_jobs()
                step.details["active_jobs"] = len(active)
            with joblog.step(job, "analyze-vm-conflicts") as step:
                by_context = {j["context_id"]: j for j in active if j["context_id"]}
                capacity = Capacity(sum(1 for j in active if j["schedule_id"] == schedule.id),
                                    sum(1 for j in active if j["group_id"] == group.id), group.max_concurrent_vms)
                results = []
                for ctx in contexts:
                    job_now = current_job(ctx, by_context)
                    conflict = conflict_of(schedule, ctx, job_now, capacity)
                    if conflict is None:  # reserve the capacity this VM's job will take
                        capacity.schedule_jobs += 1
                        capacity.group_jobs += 1
                    results.append(VmState.new(group, ctx, job_now, conflict))
                conflicted = [r for r in results if not r.can_schedule]
                step.details.update(
                    total_vms=len(results), eligible_vms=len(results) - len(conflicted), conflicted_vms=len(conflicted),
                    disabled_vms=sum(1 for r in conflicted if r.conflict_type == Conflict.VM_DISABLED),
                    conflict_counts=dict(Counter(r.conflict_type.value for r in conflicted if r.conflict_type)),
                    scan_duration=round(time.monotonic() - started, 3))
        except joblog.StepFailed as exc:
            joblog.end_job(job, JobTrackingStatus.FAILED, exc.message)
            raise
        joblog.end_job(job, JobTrackingStatus.COMPLETED)
        return results

    @staticmethod
    def _fail_group(group: VmMachineGroup, contexts: list[VmReplicationContext], results: list[VmState],
                    error: str) -> list[VmState]:
        """A group whose processing failed: every VM not dispatched yet is skipped with the error."""
        known = {r.vm_context_id for r in results}
        results = results + [VmState.new(group, c, None, None) for c in contexts if c.context_id not in known]
        for entry in results:
            if entry.can_schedule and not entry.attempts:
                entry.skip(Conflict.GROUP_FAILED, error)
        return results

    def _dispatch_vm(self, execution_id: str, schedule: ReplicationSchedule, group_id: str | None,
                     ctx: VmReplicationContext, tracking: str | None, number: int) -> AttemptRecord:
        """One attempt: create and start the VM's replication; a VM that turned busy meanwhile is a
        skip, not a failure."""
        at = iso(utcnow())
        try:
            created = replications.create(replications.CreateRequest(
                context_id=ctx.context_id, replication_type=REPLICATION_TYPE[schedule.replication_type],
                schedule_execution_id=execution_id, vm_group_id=group_id or "", scheduled_by=OWNER), OWNER)
        except DomainError as exc:
            fresh = VmReplicationContext.get_or_none(VmReplicationContext.context_id == ctx.context_id)
            if fresh is not None and fresh.current_job_id:
                return AttemptRecord(number, at, Attempt.SKIPPED, conflict_type=Conflict.ACTIVE_JOB,
                                     reason=f"replication job {fresh.current_job_id} of this VM started meanwhile")
            if fresh is not None and fresh.current_status in CONTEXT_REPLICATION_BLOCKED_STATUSES:
                return AttemptRecord(number, at, Attempt.SKIPPED, conflict_type=Conflict.VM_IN_FAILOVER,
                                     reason=f"the VM is {fresh.current_status}")
            log.warning("schedule %s: replication of %s not started: %s", schedule.name, ctx.vm_name, exc.message)
            return AttemptRecord(number, at, Attempt.DISPATCH_FAILED, error=exc.message)
        if tracking:
            JobTracking.update(parent_job=tracking).where(JobTracking.id == created.tracking_job_id).execute()
        VmReplicationContext.update(last_scheduled_job_id=created.job.id).where(
            VmReplicationContext.context_id == ctx.context_id).execute()
        self._replication.submit(created.job.id)
        return AttemptRecord(number, at, Attempt.RUNNING, job_id=created.job.id)

    def _finish_dispatch(self, execution: ScheduleExecution, schedule: ReplicationSchedule, state: ExecutionState,
                         group_failures: list[dict[str, Any]], group_id: str | None) -> None:
        now = utcnow()
        vms = state.vms or []
        c = state.refresh_counters()
        failures = [{"vm_context_id": vm.vm_context_id, "vm_name": vm.vm_name, "error": a.error}
                    for vm in vms for a in vm.attempts if a.result == Attempt.DISPATCH_FAILED]
        failed = c.jobs_created == 0 and bool(failures or group_failures)
        status = ScheduleExecutionStatus.FAILED if failed else ScheduleExecutionStatus.COMPLETED
        error = None
        if failed:
            reasons = [f"{f['vm_name']}: {f['error']}" for f in failures] + \
                      [f"group {g['group_name']}: {g['error']}" for g in group_failures]
            error = "no replication could be started: " + "; ".join(reasons)
        duration = int((now - execution.started_at).total_seconds())
        for vm in vms:  # every failed first attempt may be retried
            if vm.last_result == Attempt.DISPATCH_FAILED:
                self._plan_retry(vm, schedule, now)
        state.record(status=status.value, group_id=group_id, started_at=iso(execution.started_at),
                     completed_at=iso(now), execution_time=f"{duration}s")
        ScheduleExecution.update(
            status=status, completed_at=now, execution_duration_seconds=duration, execution_details=state.to_json(),
            error_message=error, group=group_id,
            error_details={"dispatch_failures": failures, "group_failures": group_failures}
            if failures or group_failures else None, **c.columns(),
        ).where(ScheduleExecution.id == execution.id, ScheduleExecution.status == ScheduleExecutionStatus.RUNNING).execute()
        joblog.end_job(state.job_id, JobTrackingStatus.FAILED if failed else JobTrackingStatus.COMPLETED, error)
        self._open.add(execution.id)
        log.info("schedule %s: execution %s %s: %s", state.schedule_name, execution.id, status.value, c.summary())

    # --- following executions --------------------------------------------------------------------
    def _follow_open(self) -> None:
        for execution_id in sorted(self._open):
            if self._stopping.is_set():
                return
            if not self._follow(execution_id):
                self._open.discard(execution_id)

    def _follow(self, execution_id: str) -> bool:
        """Update attempts whose replication ended, run due retries, settle, fire chain children.
        Returns whether the execution still has work."""
        execution = ScheduleExecution.get_or_none(ScheduleExecution.id == execution_id)
        if execution is None:
            return False
        state = ExecutionState.from_json(execution.execution_details)
        schedule = ReplicationSchedule.get_or_none(ReplicationSchedule.id == execution.schedule_id)
        now = utcnow()
        changed = self._see_ended_jobs(state, schedule, now)
        changed |= self._retry_due(execution, state, schedule, now)
        if state.settled_at is None and not state.waiting():
            state.settled_at = iso(now)
            changed = True
            if execution.status == ScheduleExecutionStatus.COMPLETED and state.every_vm_completed():
                state.chain = [ChainFiring(child.id, iso(now + timedelta(minutes=child.chain_delay_minutes)))
                               for child in self._chain_children(execution.schedule_id)]
        for entry in state.chain or []:
            if entry.execution_id is None and parse_time(entry.due_at) <= now:
                entry.execution_id = self._fire_chain(entry.schedule_id, execution, parse_time(entry.due_at))
                changed = True
        if changed:
            c = state.refresh_counters()
            ScheduleExecution.update(execution_details=state.to_json(), **c.columns()).where(
                ScheduleExecution.id == execution_id).execute()
        return state.has_open_work()

    def _see_ended_jobs(self, state: ExecutionState, schedule: ReplicationSchedule | None, now: datetime) -> bool:
        running = state.running_attempts()
        if not running:
            return False
        jobs = {j.id: j for j in ReplicationJob.select(ReplicationJob.id, ReplicationJob.status,
                                                       ReplicationJob.error_message)
                .where(ReplicationJob.id.in_([a.job_id for _, a in running]))}
        changed = False
        for vm, attempt in running:
            job = jobs.get(attempt.job_id)
            if job is not None and job.status not in JOB_TERMINAL_STATUSES:
                continue
            attempt.result, attempt.ended_at = (Attempt(job.status) if job else Attempt.GONE), iso(now)
            if job is not None and job.status != JobStatus.COMPLETED and job.error_message:
                attempt.error = job.error_message
            if job is not None and job.status == JobStatus.FAILED:
                self._plan_retry(vm, schedule, now)
            changed = True
        return changed

    @staticmethod
    def _plan_retry(vm: VmState, schedule: ReplicationSchedule | None, now: datetime) -> None:
        if schedule is not None and len(vm.attempts) <= schedule.retry_attempts:
            vm.retry_at = iso(now + timedelta(minutes=schedule.retry_delay_minutes))

    def _retry_due(self, execution: ScheduleExecution, state: ExecutionState, schedule: ReplicationSchedule | None,
                   now: datetime) -> bool:
        due = [vm for vm in state.vms or [] if vm.retry_at and parse_time(vm.retry_at) <= now]
        if not due:
            return False
        active = active_jobs() if schedule is not None else []
        by_context = {j["context_id"]: j for j in active if j["context_id"]}
        for vm in due:
            ctx = VmReplicationContext.get_or_none(VmReplicationContext.context_id == vm.vm_context_id)
            group = VmMachineGroup.get_or_none(VmMachineGroup.id == vm.group_id) if vm.group_id else None
            conflict = self._retry_conflict(schedule, group, ctx, by_context, active)
            if conflict is not None and conflict[0] in CAPACITY_CONFLICTS:
                continue  # capacity frees up as jobs end: try again on a later round
            vm.retry_at = None
            number = len(vm.attempts) + 1
            if conflict is not None:
                vm.attempts.append(AttemptRecord(number, iso(now), Attempt.SKIPPED, conflict_type=conflict[0],
                                                 reason=conflict[1]))
                continue
            attempt = self._dispatch_vm(execution.id, schedule, vm.group_id, ctx, state.job_id, number)
            vm.attempts.append(attempt)
            if attempt.result == Attempt.DISPATCH_FAILED:
                self._plan_retry(vm, schedule, now)
            elif attempt.job_id:  # counts against the capacity of later retries in this round
                active.append({"id": attempt.job_id, "status": "pending", "context_id": ctx.context_id,
                               "group_id": vm.group_id, "schedule_id": schedule.id})
        return True

    @staticmethod
    def _retry_conflict(schedule: ReplicationSchedule | None, group: VmMachineGroup | None,
                        ctx: VmReplicationContext | None, by_context: dict[str, dict[str, Any]],
                        active: list[dict[str, Any]]) -> tuple[Conflict, str] | None:
        if schedule is None:
            return Conflict.SCHEDULE_DISABLED, "the schedule was deleted"
        if ctx is None or group is None or not VmGroupMembership.select().where(
                VmGroupMembership.group == group.id, VmGroupMembership.vm_context == ctx.context_id,
                VmGroupMembership.enabled == True).exists():  # noqa: E712
            return Conflict.NOT_MEMBER, "the VM is no longer an enabled member of the group"
        capacity = Capacity(sum(1 for j in active if j["schedule_id"] == schedule.id),
                            sum(1 for j in active if j["group_id"] == group.id), group.max_concurrent_vms)
        return conflict_of(schedule, ctx, current_job(ctx, by_context), capacity)

    @staticmethod
    def _chain_children(schedule_id: str) -> Iterable[ReplicationSchedule]:
        return ReplicationSchedule.select().where(
            ReplicationSchedule.chain_parent_schedule == schedule_id, ReplicationSchedule.enabled == True,  # noqa: E712
            ReplicationSchedule.schedule_type == ScheduleType.CHAIN).order_by(ReplicationSchedule.name)

    def _fire_chain(self, schedule_id: str, parent: ScheduleExecution, due: datetime) -> str:
        """Fire a chain child after its parent's execution; '' when it no longer is one."""
        child = ReplicationSchedule.get_or_none(ReplicationSchedule.id == schedule_id)
        if (child is None or not child.enabled or child.schedule_type != ScheduleType.CHAIN
                or child.chain_parent_schedule_id != parent.schedule_id):
            return ""
        admission = self._admit(child.id, due, CHAIN_TRIGGER, f"after execution {parent.id}")
        assert admission is not None  # only clock firings can be claimed by another process
        return admission.execution.id

    # --- ending executions -----------------------------------------------------------------------
    def _end(self, execution_id: str, status: ScheduleExecutionStatus, error: str) -> None:
        """End a running execution (and its JobLog job) without a dispatch result."""
        execution = ScheduleExecution.get_or_none(ScheduleExecution.id == execution_id)
        if execution is None:
            return
        now = utcnow()
        ended = ScheduleExecution.update(status=status, completed_at=now, error_message=error).where(
            ScheduleExecution.id == execution_id, ScheduleExecution.status == ScheduleExecutionStatus.RUNNING).execute()
        job_id = ExecutionState.from_json(execution.execution_details).job_id
        if ended and job_id:
            joblog.end_job(job_id, JobTrackingStatus.CANCELLED if status == ScheduleExecutionStatus.CANCELLED
                           else JobTrackingStatus.FAILED, error)

    def _cancel(self, execution_id: str, reason: str) -> None:
        self._end(execution_id, ScheduleExecutionStatus.CANCELLED, reason)

    def _cancel_interrupted(self) -> int:
        """Executions this process (or a dead one) left running: cancelled, "interrupted"."""
        cutoff = utcnow() - STALE_DISPATCH
        interrupted = 0
        for execution in ScheduleExecution.select().where(ScheduleExecution.status == ScheduleExecutionStatus.RUNNING):
            owner = ExecutionState.from_json(execution.execution_details).instance
            if owner in (None, self.instance) or (execution.started_at or execution.scheduled_at) < cutoff:
                self._cancel(execution.id, "interrupted: the OMA server stopped during this execution")
                interrupted += 1
        return interrupted

    def _unfinished(self) -> set[str]:
        """This process's executions with work left (running replications, retries, chain firings)."""
        horizon = utcnow() - OPEN_WORK_HORIZON
        rows = ScheduleExecution.select(ScheduleExecution.id, ScheduleExecution.execution_details).where(
            ScheduleExecution.status.in_([ScheduleExecutionStatus.COMPLETED, ScheduleExecutionStatus.FAILED]),
            ScheduleExecution.scheduled_at >= horizon)
        states = {e.id: ExecutionState.from_json(e.execution_details) for e in rows}
        return {execution_id for execution_id, state in states.items()
                if state.instance == self.instance and state.has_open_work()}
