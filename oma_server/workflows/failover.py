"""The failover engine: failovers, test-ends, rollbacks and failed-execution cleanups on one runner.

Each is a JobLog job of ordered named steps (the RPC returned long before), run on the engine's
:class:`~oma_server.workflows.runner.WorkflowRunner` and leased on its job_tracking row
(``worker``/``worker_heartbeat_at``, the same lease replications have). The flows are in their own
modules: :mod:`failover_steps` (the ten failover steps), :mod:`compensation` (undoing a failed
failover), :mod:`cleanup` (end test / rollback / failed-execution cleanup), :mod:`placement` (where the
replica volumes are) and :mod:`error_rules` (how a failure is explained).

Every job ends once with its real outcome; the failover record, the context and the operation summary
are written in the same transaction. Interrupted work — jobs this process drove before a restart, and
in a periodic sweep jobs whose process stopped renewing its lease — is failed ("interrupted by
restart") and its context marked cleanup_required when resources may be mid-move; it is never resumed
automatically. The sweep also ends test failovers whose auto-cleanup deadline passed.
"""
from __future__ import annotations

import contextlib
import logging
import socket
from datetime import datetime

from oma_server import logs
from oma_server.db.database import database_proxy as db
from oma_server.db.models import (
    FAILOVER_ACTIVE_STATUSES,
    JOB_TRACKING_ACTIVE_STATUSES,
    FailoverJob,
    FailoverJobStatus,
    JobTracking,
    utcnow,
)
from oma_server.domain import failover
from oma_server.errors import DomainError
from oma_server.workflows.cleanup import CleanupFlow
from oma_server.workflows.failover_common import FailoverDeps, FlowBase
from oma_server.workflows.failover_steps import FailoverFlow
from oma_server.workflows.lease import Lease
from oma_server.workflows.runner import WorkflowRunner

log = logging.getLogger("oma_server.failover")

INTERRUPTED = ("interrupted by restart: the OMA process running it stopped; "
               "run CleanupFailedExecution if resources were moved")


def failover_lease(instance: str, seconds: float) -> Lease:
    """Failover-family jobs are leased on their job_tracking row (docs/design/workflows.md)."""
    return Lease(JobTracking, JobTracking.worker, JobTracking.worker_heartbeat_at,
                 lambda: JobTracking.status.in_(list(JOB_TRACKING_ACTIVE_STATUSES))
                 & JobTracking.operation.in_(list(failover.ALL_OPERATIONS)), instance, seconds)


class FailoverEngine(FlowBase):
    def __init__(self, deps: FailoverDeps):
        s = deps.settings
        runner = WorkflowRunner("failover", s.failover_workers,
                                failover_lease(s.instance_name or socket.gethostname(), s.worker_lease_seconds))
        super().__init__(deps, runner)
        self._failover = FailoverFlow(deps, runner)
        self._cleanup = CleanupFlow(deps, runner)

    # --- public (failover.Worker) ---------------------------------------------------------------
    def lease(self, job_id: str) -> None:
        """Lease a job just created by a request to this process (same transaction as the row)."""
        self.runner.lease.take(job_id)

    def submit(self, job_id: str) -> None:
        self.runner.submit(job_id, lambda: self._run(job_id))

    def alive(self, job_id: str) -> bool:
        """Runs here, or its process renewed the lease in time."""
        if self.runner.is_running(job_id):
            return True
        job = JobTracking.get_or_none(JobTracking.id == job_id)
        if job is None or job.status not in JOB_TRACKING_ACTIVE_STATUSES:
            return False
        return self.runner.lease.alive(job)

    def start(self) -> None:
        """Fail what this process left running (and orphans of dead processes), then keep the leases
        and sweep every ``failover_sweep_seconds``."""
        with db.connection_context():
            self._fail_interrupted(startup=True)
        self.runner.every(self.settings.failover_sweep_seconds, self._sweep)
        self.runner.start()

    def stop(self) -> None:
        self.runner.stop()

    # --- recovery and the periodic sweep --------------------------------------------------------
    def _sweep(self) -> None:
        self._fail_interrupted(startup=False)
        self.auto_cleanup()

    def _fail_interrupted(self, *, startup: bool) -> None:
        lease = self.runner.lease
        for job in lease.orphans(startup=startup):
            # The claim makes one process end the job; a job running here is never an orphan.
            if self.runner.is_running(job.id) or not lease.claim(job.id, startup=startup):
                continue
            self.interrupt(job, INTERRUPTED)
        # Failover records whose job is gone (ended elsewhere or never tracked).
        cutoff = lease.cutoff()
        for record in FailoverJob.select().where(FailoverJob.status.in_(list(FAILOVER_ACTIVE_STATUSES))):
            owner = JobTracking.get_or_none(JobTracking.id == record.job_id)
            if record.status == FailoverJobStatus.REVERTING:
                children = JobTracking.select().where(JobTracking.parent_job == record.job_id,
                                                      JobTracking.status.in_(list(JOB_TRACKING_ACTIVE_STATUSES)))
                if children.exists():
                    continue
            elif owner is not None and owner.status in JOB_TRACKING_ACTIVE_STATUSES:
                continue
            if record.updated_at and record.updated_at >= cutoff:
                continue
            self.fail_record(record, "interrupted by restart: no job drives this failover any more")

    def auto_cleanup(self) -> None:
        """End completed test failovers whose auto-cleanup deadline passed (docs/design/failover.md#auto-cleanup)."""
        now = utcnow()
        rows = FailoverJob.select().where(FailoverJob.job_type == "test", FailoverJob.status == FailoverJobStatus.COMPLETED)
        for row in rows:
            spec = failover.loads(row.source_vm_spec)
            deadline = spec.get("cleanup_deadline")
            if not spec.get("auto_cleanup") or not deadline:
                continue
            try:
                if datetime.fromisoformat(str(deadline)) > now:
                    continue
                started = failover.start_end_test(row.job_id, f"auto-cleanup-{row.job_id}", "auto-cleanup", self)
            except (DomainError, ValueError) as exc:
                log.info("auto-cleanup of test failover %s not started: %s", row.job_id, exc)
                continue
            if not started.existing:
                log.info("test failover %s reached its deadline: cleanup job %s", row.job_id, started.job_id)
                self.submit(started.job_id)

    # --- dispatch -------------------------------------------------------------------------------
    def _run(self, job_id: str) -> None:
        try:
            with db.connection_context():
                job = JobTracking.get_or_none(JobTracking.id == job_id)
            if job is None or job.status not in JOB_TRACKING_ACTIVE_STATUSES:
                return
            with logs.bind(job_id=job_id, context_id=job.context_id, external_job_id=job.external_job_id):
                if job.operation in failover.FAILOVER_OPERATIONS.values():
                    self._failover.run(job)
                elif job.operation == failover.FAILED_EXECUTION_OPERATION:
                    self._cleanup.run_failed_execution(job)
                else:
                    self._cleanup.run_cleanup(job)
        except Exception:  # noqa: BLE001 - a bug must still end the job
            log.exception("failover job %s crashed", job_id)
            with contextlib.suppress(Exception), db.connection_context():
                job = JobTracking.get_or_none(JobTracking.id == job_id)
                if job is not None and job.status in JOB_TRACKING_ACTIVE_STATUSES:
                    self.interrupt(job, "internal error: the workflow crashed (see the server log)")
