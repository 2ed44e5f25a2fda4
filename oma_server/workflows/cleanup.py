"""Ending a failover: end test / cleanup / rollback (docs/design/failover.md#end-test-cleanup-and-rollback) and failed-execution cleanup (docs/design/failover.md#failed-execution-cleanup).

End test, cleanup and rollback: failover-job-retrieval, test-vm-shutdown, volume-detachment,
multi-volume-snapshot-cleanup (a failed revert is fatal), volume-mode-switch-oma,
volume-reattachment-to-oma, test-vm-deletion, failover-job-status-update, vm-context-status-update
(+ source-vm-power-on for a rollback).

Failed-execution cleanup: analyze-volume-state, detach-attached-volumes, destroy-destination-vm,
cleanup-snapshots, reattach-all-volumes, reset-vm-state — reconciled against CloudStack, idempotent.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from oma_server.db.database import database_proxy as db
from oma_server.db.models import (
    FAILOVER_ACTIVE_STATUSES,
    JOB_TRACKING_ACTIVE_STATUSES,
    REPLICATION_ACTIVE_STATUSES,
    ContextStatus,
    FailoverJob,
    FailoverJobStatus,
    JobStep,
    JobTracking,
    JobTrackingStatus,
    OsseaVolume,
    ReplicationJob,
    SnapshotStatus,
    StepStatus,
    VmReplicationContext,
    utcnow,
)
from oma_server.domain import (
    cloudstack_config,
    contexts,
    credentials,
    failover,
    joblog,
)
from oma_server.errors import DeadlineExceeded, DomainError, NotFound
from oma_server.workflows.error_rules import SnapshotFailed
from oma_server.workflows.failover_common import CleanupRun, FlowBase
from oma_server.workflows.placement import (
    Placement,
    context_volumes,
    force_full_resync,
    set_context_status,
    tracked_snapshot,
    unlock_mappings,
)
from oma_server.workflows.steps import Step, Stopping

log = logging.getLogger("oma_server.failover")


class CleanupFlow(FlowBase):
    """Runs end-test/cleanup/rollback jobs (:meth:`run_cleanup`) and failed-execution cleanups
    (:meth:`run_failed_execution`)."""

    # === end test, cleanup, rollback =======================================================================
    def _cleanup_steps(self, run: CleanupRun) -> list[Step]:
        steps = [
            Step("failover-job-retrieval", self._retrieve),
            Step("test-vm-shutdown", self._shutdown_destination,
                 skip_if=lambda r: None if r.record and r.record.destination_vm_id else "no destination VM ID"),
            Step("volume-detachment", self._detach_destination,
                 skip_if=lambda r: None if r.record and r.record.destination_vm_id else "no destination VM ID"),
            Step("multi-volume-snapshot-cleanup", self._snapshot_cleanup),
            Step("volume-mode-switch-oma", lambda r, s: s.details.update(
                unlocked=unlock_mappings(r.ctx.context_id, r.config.oma_vm_id or ""))),
            *([Step("legacy-cloudstack-snapshot-rollback", self._legacy_revert),
               Step("legacy-cloudstack-snapshot-deletion", self._legacy_delete)] if run.legacy_snapshot_id else []),
            Step("volume-reattachment-to-oma", lambda r, s: s.details.update(
                reattached=self.reattach_all(Placement(self, r.config), r.ctx.context_id))),
            Step("test-vm-deletion", self._delete_destination,
                 skip_if=lambda r: None if r.record and r.record.destination_vm_id else "no destination VM ID"),
            Step("failover-job-status-update", self._record_cleanup),
            Step("vm-context-status-update", self._context_ready),
        ]
        if run.rollback:
            steps.append(Step("source-vm-power-on", self._power_on,
                                     skip_if=lambda r: None if r.power_on else "power_on_source is false"))
        return steps

    def run_cleanup(self, job: JobTracking) -> None:
        """End test, cleanup or rollback: completed, or failed with the context cleanup_required."""
        meta = job.metadata or {}
        try:
            with db.connection_context():
                ctx = contexts.get(job.context_id)
                record = FailoverJob.get_or_none(FailoverJob.job_id == meta.get("failover_job_id"))
                run = CleanupRun(job.id, job.operation, ctx, cloudstack_config.require_active(), record,
                                 rollback=job.operation in failover.ROLLBACK_OPERATIONS.values(),
                                 power_on=bool(meta.get("power_on_source")), force=bool(meta.get("force_cleanup")))
                # Records of this implementation carry their configuration and track snapshots per volume.
                if record is not None and "configuration" not in failover.loads(record.source_vm_spec):
                    run.legacy_snapshot_id = (record.ossea_snapshot_id or "").strip()
        except DomainError as exc:
            with db.connection_context():
                self.cleanup_failed(job.id, job.context_id, meta.get("failover_job_id"), exc.message, exc)
            return
        cause: BaseException | None = None
        try:
            failed = self.run_job_steps(job.id, self._cleanup_steps(run), run, keep_going=run.force, failures=run.failures)
            cause = failed[0].cause if failed else None
        except joblog.StepFailed as exc:
            run.failures.append(exc.message)
            cause = exc.cause
        except Stopping as exc:
            self.stopped(job.id, exc)
            return
        with db.connection_context():
            if run.failures:
                self.cleanup_failed(job.id, run.ctx.context_id, record.job_id if record else None,
                                     "; ".join(run.failures), cause)
            else:
                with db.atomic():
                    self.finish(job.id, run.ctx.context_id)

    def _retrieve(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        if run.record is None:
            raise NotFound("the failover record to clean up no longer exists")
        step.details.update(failover_job_id=run.record.job_id, failover_type=str(run.record.job_type),
                            destination_vm_id=run.record.destination_vm_id or None,
                            legacy_snapshot_id=run.record.ossea_snapshot_id or None, status=str(run.record.status))

    def _shutdown_destination(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        cs = self.cs(run.config, self.settings.failover_vm_timeout_seconds)
        step.details["state"] = self.stop_vm(cs, run.record.destination_vm_id)

    def _detach_destination(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        place = Placement(self, run.config)
        detached = []
        for volume in place.volumes_on(run.record.destination_vm_id, context_volumes(run.ctx.context_id)):
            place.detach(volume)
            detached.append(volume.volume_id)
        step.details["detached"] = detached

    def _snapshot_cleanup(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        """Revert every volume from its snapshot (fatal on failure: the replica would keep the destination
        VM's writes, which CBT cannot see), then delete the snapshots."""
        place = Placement(self, run.config)
        cs = self.cs(run.config, self.settings.failover_snapshot_timeout_seconds)
        reverted, not_reverted = [], []
        for volume in context_volumes(run.ctx.context_id):
            snapshot_id = tracked_snapshot(volume)
            if not snapshot_id or volume.snapshot_status != SnapshotStatus.READY:
                continue
            try:
                if place.location(volume) == place.oma_vm_id:
                    place.detach(volume)
                cs.revert_snapshot(snapshot_id)
            except DomainError as exc:
                if not run.force:
                    raise SnapshotFailed(f"revert of volume {volume.volume_id} from snapshot {snapshot_id} failed: "
                                             f"{exc.message}; snapshots kept") from None
                not_reverted.append(f"{volume.volume_id}: {exc.message}")
                force_full_resync(volume)
                continue
            OsseaVolume.update(snapshot_status=SnapshotStatus.ROLLBACK_COMPLETE).where(OsseaVolume.id == volume.id).execute()
            reverted.append(volume.volume_id)
        step.details.update(reverted=reverted)
        step.details["deleted"] = self.delete_snapshots(run.config, run.ctx.context_id, strict=False)
        if not_reverted:
            raise SnapshotFailed("not reverted (a full resync is forced for these disks): " + "; ".join(not_reverted))

    def _legacy_revert(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        cs = self.cs(run.config, self.settings.failover_snapshot_timeout_seconds)
        snapshot = cs.get_snapshot(run.legacy_snapshot_id)
        if snapshot is None:
            raise NotFound(f"legacy snapshot {run.legacy_snapshot_id} no longer exists in CloudStack")
        if snapshot.state != "BackedUp":
            log.warning("legacy snapshot %s is %s, not BackedUp", run.legacy_snapshot_id, snapshot.state)
        cs.revert_snapshot(run.legacy_snapshot_id)
        step.details.update(snapshot_id=run.legacy_snapshot_id, volume_id=snapshot.volume_id or None)

    def _legacy_delete(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        cs = self.cs(run.config, self.settings.failover_snapshot_timeout_seconds)
        cs.delete_snapshot(run.legacy_snapshot_id)
        step.details["snapshot_id"] = run.legacy_snapshot_id

    def _delete_destination(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        cs = self.cs(run.config, self.settings.failover_vm_timeout_seconds)
        step.details["result"] = self.destroy_vm(cs, Placement(self, run.config), run.ctx.context_id,
                                                  run.record.destination_vm_id)

    def _record_cleanup(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        if run.failures:  # force_cleanup went on after failures: the record says so
            failover.move_failover_job(run.record.job_id, FailoverJobStatus.FAILED,
                                       error_message="rollback: " + "; ".join(run.failures))
            step.details["status"] = "failed"
            return
        failover.move_failover_job(run.record.job_id, FailoverJobStatus.CLEANUP)
        step.details["status"] = "cleanup"

    def _context_ready(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        wanted = ContextStatus.CLEANUP_REQUIRED if run.failures else ContextStatus.READY_FOR_FAILOVER
        step.details["status"] = str(set_context_status(run.ctx.context_id, wanted))

    def _power_on(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        login = self.login(run.ctx)
        before = self.vma.power_state(login, run.ctx.vmware_vm_id).power_state
        step.details["previous_state"] = before
        if before == "poweredOn":
            step.details["method"] = "already-on"
            return
        result = self.vma.power_on(login, run.ctx.vmware_vm_id, timeout_seconds=self.settings.failover_power_on_seconds)
        step.details["message"] = result.message
        state = self.wait_power(login, run.ctx.vmware_vm_id, "poweredOn",
                                 float(self.settings.failover_power_on_seconds), 2.0)
        step.details["new_state"] = state
        if state != "poweredOn":
            raise DeadlineExceeded(f"power-on timeout: {run.ctx.vm_name} is {state}")
        credentials.record_use(login.credential_id)


    # === failed-execution cleanup ===========================================================================
    def run_failed_execution(self, job: JobTracking) -> None:
        """Failed-execution cleanup: everything back on the OMA, the VM ready for failover again."""
        meta = job.metadata or {}
        try:
            with db.connection_context():
                ctx = contexts.get(job.context_id)
                record = FailoverJob.get_or_none(FailoverJob.job_id == meta.get("failover_job_id")) \
                    if meta.get("failover_job_id") else None
                run = CleanupRun(job.id, job.operation, ctx, cloudstack_config.require_active(), record)
        except DomainError as exc:
            with db.connection_context():
                self.cleanup_failed(job.id, job.context_id, None, exc.message, exc)
            return
        steps = [
            Step("analyze-volume-state", self._analyze),
            Step("detach-attached-volumes", self._detach_everywhere),
            Step("destroy-destination-vm", self._destroy_destinations,
                 skip_if=lambda r: None if r.destinations else "no destination VM found"),
            Step("cleanup-snapshots", self._cleanup_snapshots),
            Step("reattach-all-volumes", lambda r, s: s.details.update(
                reattached=self.reattach_all(Placement(self, r.config), r.ctx.context_id))),
            Step("reset-vm-state", self._reset_state),
        ]
        try:
            self.run_job_steps(job.id, steps, run)
        except joblog.StepFailed as exc:
            with db.connection_context():
                self.cleanup_failed(job.id, run.ctx.context_id, None, exc.message, exc.cause)
            return
        except Stopping as exc:
            self.stopped(job.id, exc)
            return
        with db.connection_context(), db.atomic():
            self.finish(job.id, run.ctx.context_id)

    def _analyze(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        place = Placement(self, run.config)
        cs = self.cs(run.config, self.settings.failover_vm_timeout_seconds)
        found: list[str] = []
        holders: list[str] = []
        states = {}
        for volume in context_volumes(run.ctx.context_id):
            try:
                where = place.location(volume)
            except NotFound:
                states[volume.volume_id] = "missing"
                continue
            states[volume.volume_id] = "on_oma" if where == place.oma_vm_id else (f"on_vm:{where}" if where else "detached")
            if where and where != place.oma_vm_id:
                holders.append(where)
        if run.record is not None:
            if run.record.destination_vm_id:
                found.append(run.record.destination_vm_id)
            else:
                hostname = failover.loads(run.record.source_vm_spec).get("destination_hostname")
                since = (run.record.started_at or run.record.created_at) - timedelta(seconds=5)
                for vm in cs.find_virtual_machines(hostname) if hostname else []:
                    if vm.created is not None and vm.created >= since:  # made by that failover, not someone else's VM
                        found.append(vm.id)
        run.destinations = [vm for vm in dict.fromkeys(found) if vm != place.oma_vm_id]
        run.holders = [vm for vm in dict.fromkeys(holders) if vm not in run.destinations]
        step.details.update(volumes=states, destination_vms=run.destinations, other_vms_holding_volumes=run.holders,
                            failover_job_id=run.record.job_id if run.record else None)

    def _detach_everywhere(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        """Volumes on destination VMs come off (the VMs are stopped first); volumes on the OMA whose
        snapshot must be reverted come off too (CloudStack reverts only detached volumes)."""
        place = Placement(self, run.config)
        cs = self.cs(run.config, self.settings.failover_vm_timeout_seconds)
        for vm_id in [*run.destinations, *run.holders]:
            step.details[f"vm:{vm_id}"] = self.stop_vm(cs, vm_id)
        detached = []
        for volume in context_volumes(run.ctx.context_id):
            try:
                where = place.location(volume)
            except NotFound:
                continue
            needs_revert = bool(tracked_snapshot(volume)) and volume.snapshot_status == SnapshotStatus.READY
            if where and (where != place.oma_vm_id or needs_revert):
                place.detach(volume)
                detached.append(volume.volume_id)
        step.details["detached"] = detached

    def _destroy_destinations(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        cs = self.cs(run.config, self.settings.failover_vm_timeout_seconds)
        place = Placement(self, run.config)
        for vm_id in run.destinations:
            step.details[vm_id] = self.destroy_vm(cs, place, run.ctx.context_id, vm_id)

    def _cleanup_snapshots(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        cs = self.cs(run.config, self.settings.failover_snapshot_timeout_seconds)
        reverted, lost = [], []
        for volume in context_volumes(run.ctx.context_id):
            snapshot_id = tracked_snapshot(volume)
            if not snapshot_id or volume.snapshot_status != SnapshotStatus.READY:
                continue
            if cs.get_snapshot(snapshot_id) is None:
                lost.append(snapshot_id)  # nothing to revert from: only a full copy makes the replica trustworthy
                force_full_resync(volume)
                continue
            try:
                cs.revert_snapshot(snapshot_id)
            except DomainError as exc:
                raise SnapshotFailed(f"revert of volume {volume.volume_id} from snapshot {snapshot_id} failed: "
                                         f"{exc.message}") from None
            OsseaVolume.update(snapshot_status=SnapshotStatus.ROLLBACK_COMPLETE).where(OsseaVolume.id == volume.id).execute()
            reverted.append(volume.volume_id)
        step.details.update(reverted=reverted, missing_snapshots=lost,
                            deleted=self.delete_snapshots(run.config, run.ctx.context_id))

    def _reset_state(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        reason = f"superseded by cleanup {run.job_id}"
        failed_records, ended_jobs = [], []
        with db.atomic():
            for record in FailoverJob.select().where(FailoverJob.vm_context == run.ctx.context_id,
                                                     FailoverJob.status.in_(list(FAILOVER_ACTIVE_STATUSES))):
                failover.move_failover_job(record.job_id, FailoverJobStatus.FAILED, error_message=reason)
                failed_records.append(record.job_id)
            record = FailoverJob.get_or_none(FailoverJob.job_id == run.record.job_id) if run.record else None
            if record is not None and record.status == FailoverJobStatus.COMPLETED:  # its VM is gone now
                failover.move_failover_job(record.job_id, FailoverJobStatus.REVERTING)
                failover.move_failover_job(record.job_id, FailoverJobStatus.CLEANUP)
            for job in JobTracking.select().where(JobTracking.context_id == run.ctx.context_id,
                                                  JobTracking.operation.in_(list(failover.ALL_OPERATIONS)),
                                                  JobTracking.status.in_(list(JOB_TRACKING_ACTIVE_STATUSES)),
                                                  JobTracking.id != run.job_id):
                JobStep.update(status=StepStatus.FAILED, completed_at=utcnow(), error_message=reason).where(
                    JobStep.job == job.id, JobStep.status == StepStatus.RUNNING).execute()
                joblog.end_job(job.id, JobTrackingStatus.FAILED, reason)
                ended_jobs.append(job.id)
            unlock_mappings(run.ctx.context_id, run.config.oma_vm_id or "")
            ctx = VmReplicationContext.get_by_id(run.ctx.context_id)
            values: dict[Any, Any] = {VmReplicationContext.current_status: ContextStatus.READY_FOR_FAILOVER,
                                      VmReplicationContext.last_status_change: utcnow()}
            if ctx.current_job_id and not ReplicationJob.select().where(
                    ReplicationJob.id == ctx.current_job_id,
                    ReplicationJob.status.in_(list(REPLICATION_ACTIVE_STATUSES))).exists():
                values[VmReplicationContext.current_job] = None
            VmReplicationContext.update(values).where(VmReplicationContext.context_id == ctx.context_id).execute()
        step.details.update(failover_jobs_failed=failed_records, jobs_ended=ended_jobs, context_status="ready_for_failover")


