"""What the failover family of workflows shares: typed dependencies, the run states, how a job ends.

:class:`FlowBase` is the base of the failover flow (:mod:`failover_steps`), the cleanup flows
(:mod:`cleanup`) and the engine (:mod:`failover`): CloudStack clients with the right timeouts, the
vCenter login, running steps on the runner, ending a job with its operation summary, interrupting
one, and the CloudStack actions several flows use (stop/destroy a VM, put volumes back on the OMA,
delete snapshots).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from oma_server.config import Settings
from oma_server.db.database import database_proxy as db
from oma_server.db.models import (
    FAILOVER_ACTIVE_STATUSES,
    ContextStatus,
    FailoverJob,
    FailoverJobStatus,
    JobStep,
    JobTracking,
    JobTrackingStatus,
    OsseaConfig,
    OsseaVolume,
    SnapshotStatus,
    StepStatus,
    VmDisk,
    VmReplicationContext,
    utcnow,
)
from oma_server.domain import (
    cloudstack_config,
    credentials,
    failover,
    joblog,
)
from oma_server.domain.crypto import SecretBox
from oma_server.domain.failover_config import FailoverConfig
from oma_server.errors import DeadlineExceeded, DomainError, FailedPrecondition
from oma_server.integrations.cloudstack import CloudStack
from oma_server.integrations.nbd_exports import ExportManager
from oma_server.integrations.vma_client import VmaClient
from oma_server.workflows import error_rules
from oma_server.workflows.error_rules import write_summary
from oma_server.workflows.hub import ProgressHub
from oma_server.workflows.placement import (
    Placement,
    clear_tracking,
    context_volumes,
    set_context_status,
    tracked_snapshot,
)
from oma_server.workflows.runner import WorkflowRunner
from oma_server.workflows.steps import JobLogRecorder, Step, run_steps

log = logging.getLogger("oma_server.failover")

_GONE_VM_STATES = ("Destroyed", "Expunging")


@dataclass
class FailoverDeps:
    """What the failover family needs; built once by :mod:`oma_server.startup`."""

    settings: Settings
    secrets: SecretBox
    vma: VmaClient
    exports: ExportManager
    replication: Any  # the ReplicationEngine (a live failover's final sync)


@dataclass
class FailoverRun:
    job_id: str
    ctx: VmReplicationContext
    record: FailoverJob
    config: OsseaConfig
    conf: FailoverConfig
    spec: dict[str, Any]
    actor: str
    disks: list[VmDisk] = field(default_factory=list)
    volumes: dict[str, OsseaVolume] = field(default_factory=dict)  # disk_id → replica volume
    snapshots: dict[str, str] = field(default_factory=dict)  # volume uuid → snapshot id made by this run
    destination_vm_id: str = ""
    name_was_free: bool = False
    moved: set[str] = field(default_factory=set)  # volume uuids that left the OMA in this run
    locked: bool = False
    status_flipped: bool = False
    injection_ran: bool = False
    final_sync_job: str = ""

    @property
    def kind(self) -> str:
        return self.conf.failover_type

    @property
    def failed_over_status(self) -> ContextStatus:
        return ContextStatus.FAILED_OVER_LIVE if self.kind == "live" else ContextStatus.FAILED_OVER_TEST

    def ordered_volumes(self) -> list[tuple[VmDisk, OsseaVolume]]:
        return [(d, self.volumes[d.disk_id]) for d in self.disks if d.disk_id in self.volumes]


@dataclass
class CleanupRun:
    job_id: str
    operation: str
    ctx: VmReplicationContext
    config: OsseaConfig
    record: FailoverJob | None
    rollback: bool = False
    power_on: bool = False
    force: bool = False
    failures: list[str] = field(default_factory=list)
    destinations: list[str] = field(default_factory=list)
    # A single snapshot recorded only on the failover record (written by the original implementation).
    legacy_snapshot_id: str = ""
    # Other VMs holding context volumes: stopped and stripped, never destroyed.
    holders: list[str] = field(default_factory=list)


class FlowBase:
    def __init__(self, deps: FailoverDeps, runner: WorkflowRunner):
        self.deps, self.runner = deps, runner
        self.settings, self._box = deps.settings, deps.secrets
        self.vma, self.exports = deps.vma, deps.exports

    @property
    def hub(self) -> ProgressHub:
        return self.runner.hub

    def cs(self, config: OsseaConfig, job_timeout: float) -> CloudStack:
        return cloudstack_config.client(config, self._box, poll_interval=self.settings.cloudstack_poll_interval_seconds,
                                        job_timeout=job_timeout)

    def stopped(self, job_id: str, exc: Exception) -> None:
        """The OMA stopped while the job ran its steps: end the job as interrupted."""
        with db.connection_context():
            self.interrupt(JobTracking.get_by_id(job_id), f"interrupted: {exc}")

    def interrupt(self, job: JobTracking, reason: str) -> None:
        log.warning("%s job %s: %s", job.operation, job.id, reason)
        with db.atomic():
            JobStep.update(status=StepStatus.FAILED, completed_at=utcnow(), error_message=reason).where(
                JobStep.job == job.id, JobStep.status == StepStatus.RUNNING).execute()
            record = FailoverJob.get_or_none(FailoverJob.job_id == job.id)
            if record is None:
                failover_id = (job.metadata or {}).get("failover_job_id")
                record = FailoverJob.get_or_none(FailoverJob.job_id == failover_id) if failover_id else None
            if record is not None and record.status in FAILOVER_ACTIVE_STATUSES:
                self.fail_record(record, reason)
            joblog.end_job(job.id, JobTrackingStatus.FAILED, reason)
            if job.context_id:
                write_summary(job.id, job.context_id, error_rules.Interrupted(reason))
        self.hub.notify(job.id)

    def fail_record(self, record: FailoverJob, reason: str) -> None:
        """Fail a non-terminal record; the context goes to cleanup_required when volumes may be mid-move."""
        moved = record.status not in (FailoverJobStatus.PENDING, FailoverJobStatus.VALIDATING)
        prefix = "rollback: " if record.status == FailoverJobStatus.REVERTING else ""
        with contextlib.suppress(FailedPrecondition):
            failover.move_failover_job(record.job_id, FailoverJobStatus.FAILED, error_message=prefix + reason)
        if moved and record.vm_context_id:
            set_context_status(record.vm_context_id, ContextStatus.CLEANUP_REQUIRED)

    def run_job_steps(self, job_id: str, steps: list[Step], state: Any, *, keep_going: bool = False,
               failures: list[str] | None = None) -> list[joblog.StepFailed]:
        """Run steps in order on the runner's step loop (each a job_steps row, a database connection per
        step). ``keep_going``: a failed step is recorded in ``failures`` and the next one runs; the
        failed steps are returned."""
        return run_steps(steps, state, JobLogRecorder(job_id), keep_going=keep_going,
                         stop_reason=lambda: "the OMA is stopping" if self.runner.stopping.is_set() else None,
                         after_step=lambda name: self.hub.notify(job_id),
                         on_failure=lambda failed: failures.append(failed.message) if failures is not None else None)

    def finish(self, job_id: str, context_id: str | None, error: str | None = None,
             cause: BaseException | None = None) -> None:
        """End the job once with its outcome and write the context's operation summary; ``cause`` is
        what made it fail (classified by type for the summary)."""
        joblog.end_job(job_id, JobTrackingStatus.FAILED if error else JobTrackingStatus.COMPLETED, error)
        if context_id:
            write_summary(job_id, context_id, cause)

    def login(self, ctx: VmReplicationContext) -> credentials.VCenterLogin:
        credential_id = ctx.credential_id or credentials.get_default().id
        return credentials.login_for(self._box, credential_id)

    def wait_power(self, login: credentials.VCenterLogin, vm_uuid: str, wanted: str, timeout: float,
                    interval: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.vma.power_state(login, vm_uuid).power_state
            if state == wanted or time.monotonic() >= deadline or self.runner.stopping.is_set():
                return state
            time.sleep(interval)

    def cleanup_failed(self, job_id: str, context_id: str | None, failover_job_id: str | None, error: str,
                        cause: BaseException | None = None) -> None:
        with db.atomic():
            if failover_job_id:
                record = FailoverJob.get_or_none(FailoverJob.job_id == failover_job_id)
                if record is not None and record.status == FailoverJobStatus.REVERTING:
                    failover.move_failover_job(failover_job_id, FailoverJobStatus.FAILED, error_message=f"rollback: {error}")
            if context_id:
                set_context_status(context_id, ContextStatus.CLEANUP_REQUIRED)
            self.finish(job_id, context_id, error, cause)

    # --- shared CloudStack actions --------------------------------------------------------------------------
    def stop_vm(self, cs: CloudStack, vm_id: str) -> str:
        vm = cs.get_virtual_machine(vm_id)
        if vm is None:
            return "missing"
        state = vm.state
        if state in ("Stopped", "Error", *_GONE_VM_STATES):
            return state
        cs.stop_virtual_machine(vm_id)
        deadline = time.monotonic() + self.settings.failover_vm_stop_wait_seconds
        while True:
            vm = cs.get_virtual_machine(vm_id)
            state = vm.state if vm else "missing"
            if state in ("Stopped", "missing"):
                return state
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"VM {vm_id} did not stop within {self.settings.failover_vm_stop_wait_seconds:.0f} s")
            time.sleep(max(0.05, self.settings.cloudstack_poll_interval_seconds))

    def destroy_vm(self, cs: CloudStack, place: Placement, context_id: str, vm_id: str) -> str:
        vm = cs.get_virtual_machine(vm_id)
        if vm is None or vm.state == "Expunging":
            return "already gone"
        holding = place.volumes_on(vm_id, context_volumes(context_id))
        if holding:
            # Expunging would delete a replica attached as its root disk.
            raise error_rules.VolumeMoveFailed(f"VM {vm_id} still holds replica volumes "
                                               f"{', '.join(v.volume_id for v in holding)}; it is not destroyed")
        cs.destroy_virtual_machine(vm_id, expunge=True)
        log.info("destination VM %s destroyed", vm_id)
        return "destroyed"

    def reattach_all(self, place: Placement, context_id: str) -> list[str]:
        """Every context volume back on the OMA with its export; mappings of OMA volumes in mode oma."""
        done = []
        for volume in context_volumes(context_id):
            where = place.location(volume)
            if where not in (None, place.oma_vm_id):
                raise error_rules.VolumeMoveFailed(f"volume {volume.volume_id} is attached to VM {where}, not the OMA")
            place.to_oma(volume)
            done.append(volume.volume_id)
        return done

    def delete_snapshots(self, config: OsseaConfig, context_id: str, only: dict[str, str] | None = None,
                          strict: bool = True) -> list[str]:
        """Delete tracked snapshots (those of ``only`` when given) and clear each volume's tracking only
        after its snapshot is gone. ``strict=False``: a snapshot that cannot be deleted stays tracked (a
        reverted one is deleted by the next failover) and is only logged."""
        cs = self.cs(config, self.settings.failover_snapshot_timeout_seconds)
        deleted, failures = [], []
        for volume in context_volumes(context_id):
            snapshot_id = tracked_snapshot(volume)
            if only is not None and volume.volume_id not in only and snapshot_id not in only.values():
                if volume.snapshot_status in (SnapshotStatus.CREATING, SnapshotStatus.FAILED) and not snapshot_id:
                    clear_tracking(volume)
                continue
            if snapshot_id:
                try:
                    if cs.get_snapshot(snapshot_id) is not None:
                        cs.delete_snapshot(snapshot_id)
                except DomainError as exc:
                    failures.append(f"snapshot {snapshot_id} of volume {volume.volume_id}: {exc.message}")
                    continue
                deleted.append(snapshot_id)
            clear_tracking(volume)
        if failures and strict:
            raise error_rules.SnapshotFailed("snapshots not deleted: " + "; ".join(failures))
        for failure in failures:
            log.warning("snapshot not deleted (it stays tracked): %s", failure)
        return deleted

