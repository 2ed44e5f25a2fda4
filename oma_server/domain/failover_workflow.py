"""The failover engine: failovers, test cleanups, rollbacks and failed-execution cleanups, each a JobLog
job of ordered named steps run on a small thread pool (the RPC returned long before).

Failover (live and test, spec §2.3) — ``failover_jobs.status`` in brackets:

    validation                      readiness checks (§2.10), blocking            [pending → validating]
    source-vm-power-off             live: graceful shutdown, then power-off, verified
    final-sync                      live: an in-process replication, followed to its end
    volume-mode-switch-failover     context → failed_over_*, mappings locked      [→ snapshotting]
    multi-volume-snapshot-creation  one CloudStack snapshot per volume, all or nothing
    virtio-driver-injection         Windows + a configured command only; otherwise skipped (never faked)
    vm-creation                     one NIC per source network, exact display name [→ creating_vm → switching_volume]
    volume-attachment               template root removed; exports stopped; OS → device 0, data disks in order
    vm-startup-and-validation       start, then check the running VM              [→ powering_on]
    status-update                   context status confirmed                      [→ completed]

Any failure after the context changed runs the compensation saga of §2.4 as a child job
(``failover-compensation``): stop and strip the destination VM, destroy it, revert moved volumes from
their snapshots (test: always; live: when injection ran), put every volume back on the OMA with its NBD
export, delete the run's snapshots, unlock, context back to ready_for_failover — or, when an action
failed, leave the snapshots, set ``cleanup_required`` and let CleanupFailedExecution finish.

End test / cleanup / rollback (§2.7): failover-job-retrieval, test-vm-shutdown, volume-detachment,
multi-volume-snapshot-cleanup (a failed revert is fatal), volume-mode-switch-oma,
volume-reattachment-to-oma, test-vm-deletion, failover-job-status-update, vm-context-status-update
(+ source-vm-power-on for a rollback).

Failed-execution cleanup (§2.13): analyze-volume-state, detach-attached-volumes, destroy-destination-vm,
cleanup-snapshots, reattach-all-volumes, reset-vm-state — reconciled against CloudStack, idempotent.

Every job ends once with its real outcome; the failover record, the context and the operation summary
(``last_operation_summary``) are written in the same transaction. Running jobs carry the process name
and a heartbeat (``job_tracking.updated_at``); at start, and in a periodic sweep for other processes'
jobs, interrupted work is failed ("interrupted by restart") and its context marked cleanup_required when
resources may be mid-move — never resumed automatically.
"""
from __future__ import annotations

import contextlib
import logging
import shlex
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from oma_server import logs
from oma_server.db.database import database_proxy as db
from oma_server.db.models import (
    FAILOVER_ACTIVE_STATUSES,
    JOB_TRACKING_ACTIVE_STATUSES,
    REPLICATION_ACTIVE_STATUSES,
    ContextStatus,
    DeviceMapping,
    DeviceOperationMode,
    FailoverJob,
    FailoverJobStatus,
    JobCategory,
    JobStatus,
    JobStep,
    JobTracking,
    JobTrackingStatus,
    JobType,
    OsseaConfig,
    OsseaVolume,
    OsseaVolumeStatus,
    ReplicationJob,
    SnapshotStatus,
    StepStatus,
    VmDisk,
    VmReplicationContext,
    utcnow,
)
from oma_server.domain import (
    cloudstack_config,
    contexts,
    credentials,
    failover,
    job_lifecycle,
    joblog,
    readiness,
    replications,
    volumes,
)
from oma_server.domain.failover_config import FailoverConfig, duration_seconds
from oma_server.domain.replication_workflow import ProgressHub
from oma_server.domain.step_names import friendly_step_name
from oma_server.domain.text_rules import quote
from oma_server.errors import DeadlineExceeded, DomainError, FailedPrecondition, NotFound
from oma_server.integrations.cloudstack import CloudStack, CloudStackError

log = logging.getLogger("oma_server.failover")

_GONE_VM_STATES = ("Destroyed", "Expunging")
_NON_WINDOWS = ("linux", "ubuntu", "debian", "centos", "rhel", "redhat", "sles", "suse", "rocky", "alma", "oracle",
                "photon", "coreos", "freebsd", "solaris", "darwin", "other")

# Error sanitising for operation summaries (§6.6): keywords → category, severity, user message, actions.
# First match wins; data, not branches.
_ERROR_RULES: tuple[tuple[tuple[str, ...], str, str, str, tuple[str, ...]], ...] = (
    (("virt-v2v", "virtio", "injection"), "compatibility", "error", "Preparing drivers for the destination failed",
     ("Check the guest OS and retry with skip_virtio if drivers are already present",)),
    (("not ready", "readiness", "ready_for_failover", "no completed replication", "without a"),
     "configuration", "warning", "The VM is not ready for failover",
     ("Run GetFailoverReadiness and fix the failed checks",)),
    (("insufficient", "quota", "capacity"), "platform", "error", "CloudStack has no capacity for the VM",
     ("Free capacity or choose another service offering",)),
    (("template", "offering"), "configuration", "error", "The CloudStack template or offering is not usable",
     ("Check template_id and service_offering_id of the CloudStack configuration",)),
    (("snapshot",), "storage", "critical", "Volume snapshots could not be created, reverted or deleted",
     ("Run CleanupFailedExecution to restore the replica volumes",)),
    (("already attached", "detach", "attach", "volume"), "storage", "error", "Moving the replica volumes failed",
     ("Run CleanupFailedExecution to put the volumes back on the OMA",)),
    (("network",), "network", "error", "The destination networks are not usable",
     ("Check the VM's network mappings",)),
    (("unreachable", "connection", "timeout", "did not answer", "in time", "deadline"), "connectivity", "error",
     "A service did not answer in time", ("Check connectivity to CloudStack and the VMA, then retry",)),
    (("permission", "denied", "credential", "refused"), "configuration", "error", "Access was refused",
     ("Check the CloudStack keys and the vCenter credential",)),
    (("not found", "no longer", "does not exist", "gone"), "configuration", "error", "A resource no longer exists",
     ("Refresh the VM (replicate again) and retry",)),
)


class _Stopping(Exception):
    """The OMA is shutting down: the job ends as interrupted."""


def classify_error(message: str) -> dict[str, Any]:
    text = (message or "").lower()
    for words, category, severity, user_message, actions in _ERROR_RULES:
        if any(w in text for w in words):
            return {"error_category": category, "error_severity": severity, "user_message": user_message,
                    "actionable_steps": list(actions)}
    return {"error_category": "platform", "error_severity": "error", "user_message": "The operation failed",
            "actionable_steps": ["Check the job's steps and logs (JobLogService.GetJob)"]}


def _guest_family(os_type: str) -> str:
    text = (os_type or "").lower()
    if "win" in text:
        return "windows"
    if not text or text == "unknown":
        return "unknown"
    return "other" if any(w in text for w in _NON_WINDOWS) else "unknown"


def _parse_cs_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.strptime(value, "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        return None
    return parsed.astimezone(timezone.utc).replace(tzinfo=None)


# --- where the replica volumes are (spec §1.2) -------------------------------------------------------

class Placement:
    """Moves a context's replica volumes between the OMA and a destination VM, keeping
    device_mappings, nbd_exports and ossea_volumes in step with CloudStack. Every mutation first
    looks at CloudStack's state, so repeating it is safe."""

    def __init__(self, engine: "FailoverEngine", config: OsseaConfig):
        self.engine, self.config = engine, config
        self.oma_vm_id = config.oma_vm_id or ""
        self.cs = engine.cs(config, engine.settings.failover_volume_timeout_seconds)
        self.exports = engine.exports

    def remote(self, volume: OsseaVolume) -> dict[str, Any] | None:
        return self.cs.get_volume(volume.volume_id)

    def location(self, volume: OsseaVolume) -> str | None:
        """The CloudStack VM the volume is attached to (None = detached); NotFound if it is gone."""
        remote = self.remote(volume)
        if remote is None:
            raise NotFound(f"replica volume {volume.volume_id} ({volume.volume_name}) no longer exists in CloudStack")
        return remote.get("virtualmachineid") or None

    def detach(self, volume: OsseaVolume) -> str | None:
        """Detach from wherever it is attached (the OMA: its NBD export is stopped first); the mapping
        row goes (DETACHED has none). Returns the VM it was attached to."""
        attached_to = self.location(volume)
        if attached_to is None or attached_to == self.oma_vm_id:
            self.exports.remove(volumes.export_name(volume.volume_id))
        if attached_to:
            self.cs.detach_volume(volume.volume_id)
            log.info("volume %s detached from VM %s", volume.volume_id, attached_to)
        with db.atomic():
            DeviceMapping.delete().where(DeviceMapping.volume_uuid == volume.volume_id).execute()
            OsseaVolume.update(status=OsseaVolumeStatus.DETACHED, device_path=None).where(
                OsseaVolume.id == volume.id).execute()
        return attached_to

    def attach_to(self, volume: OsseaVolume, vm_id: str, device_id: int | None) -> DeviceMapping:
        """Attach to a destination VM (device 0 = root) and record the mapping with a placeholder
        device path unique per volume (``remote-vm-<vm>-<volume>``)."""
        remote = self.remote(volume)
        if remote is None:
            raise NotFound(f"replica volume {volume.volume_id} no longer exists in CloudStack")
        attached_to = remote.get("virtualmachineid")
        if attached_to and attached_to != vm_id:
            raise FailedPrecondition(f"volume {volume.volume_id} is attached to VM {attached_to}; detach it first")
        if not attached_to:
            remote = self.cs.attach_volume(volume.volume_id, vm_id, device_id)
            log.info("volume %s attached to VM %s as device %s", volume.volume_id, vm_id, remote.get("deviceid"))
        values = {
            "vm_context": volume.vm_context_id, "volume_id_numeric": volume.id, "vm_id": vm_id,
            "operation_mode": DeviceOperationMode.FAILOVER, "cloudstack_device_id": remote.get("deviceid"),
            "requires_device_correlation": False, "device_path": f"remote-vm-{vm_id}-{volume.volume_id}",
            "cloudstack_state": "attached", "linux_state": "n/a",
            "size": int(remote.get("size") or volume.size_gb * volumes.GIB), "last_sync": utcnow(),
        }
        with db.atomic():
            if DeviceMapping.select().where(DeviceMapping.volume_uuid == volume.volume_id).exists():
                DeviceMapping.update(values).where(DeviceMapping.volume_uuid == volume.volume_id).execute()
            else:
                DeviceMapping.create(volume_uuid=volume.volume_id, **values)
            OsseaVolume.update(status=OsseaVolumeStatus.ATTACHED, device_path=None).where(
                OsseaVolume.id == volume.id).execute()
        return DeviceMapping.get(DeviceMapping.volume_uuid == volume.volume_id)

    def to_oma(self, volume: OsseaVolume) -> DeviceMapping:
        """Attached to the OMA (unless it is already), device found, mapping ``oma``, NBD export served."""
        s = self.engine.settings
        mapping = volumes.attach(self.cs, self.config, volume, device_dir=s.device_dir, wait_seconds=s.device_wait_seconds)
        disk = VmDisk.get_or_none(VmDisk.ossea_volume_id == volume.id)
        if disk is not None:
            volumes.export(self.exports, mapping, disk, disk.job_id)
        return mapping

    def remove_template_root(self, vm_id: str, keep: set[str]) -> list[str]:
        """Detach and delete the ROOT disk the template gave the new VM (not a replica volume)."""
        removed = []
        for remote in self.cs.list_volumes(virtualmachineid=vm_id):
            if remote.get("type") == "ROOT" and remote["id"] not in keep:
                self.cs.detach_volume(remote["id"])
                self.cs.delete_volume(remote["id"])
                removed.append(remote["id"])
        return removed

    def volumes_on(self, vm_id: str, candidates: list[OsseaVolume]) -> list[OsseaVolume]:
        """Context volumes CloudStack reports attached to ``vm_id`` plus those whose mapping says so."""
        try:
            remote_ids = {v["id"] for v in self.cs.list_volumes(virtualmachineid=vm_id)}
        except CloudStackError as exc:
            if exc.cs_code != 431:
                raise
            remote_ids = set()  # the VM is gone
        mapped = {m.volume_uuid for m in DeviceMapping.select(DeviceMapping.volume_uuid).where(DeviceMapping.vm_id == vm_id)}
        return [v for v in candidates if v.volume_id in remote_ids or v.volume_id in mapped]


def context_volumes(context_id: str) -> list[OsseaVolume]:
    return list(OsseaVolume.select().where(OsseaVolume.vm_context == context_id).order_by(OsseaVolume.id))


def _clear_tracking(volume: OsseaVolume) -> None:
    OsseaVolume.update(snapshot_id=None, snapshot_created_at=None, snapshot_status=SnapshotStatus.NONE).where(
        OsseaVolume.id == volume.id).execute()


def _tracked_snapshot(volume: OsseaVolume) -> str:
    """The tracked snapshot id ('' is read as NULL, as the original wrote it)."""
    return (volume.snapshot_id or "").strip()


# --- workflow states -----------------------------------------------------------------------------------

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


# --- the engine ------------------------------------------------------------------------------------------

class FailoverEngine:
    def __init__(self, runtime: Any):
        s = runtime.settings
        self.runtime, self.settings, self._box = runtime, s, runtime.secrets
        self.instance = s.instance_name or socket.gethostname()
        self.hub = ProgressHub()
        self._pool = ThreadPoolExecutor(max_workers=max(1, s.failover_workers), thread_name_prefix="failover")
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="failover-sweep", daemon=True)

    @property
    def exports(self):
        return self.runtime.components["exports"]

    @property
    def vma(self):
        return self.runtime.components["vma"]

    def cs(self, config: OsseaConfig, job_timeout: float) -> CloudStack:
        return cloudstack_config.client(config, self._box, poll_interval=self.settings.cloudstack_poll_interval_seconds,
                                        job_timeout=job_timeout)

    # --- public ----------------------------------------------------------------------------------------
    def submit(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._running:
                return
            self._running.add(job_id)
        try:
            self._pool.submit(self._run, job_id)
        except RuntimeError:  # shutting down: the next start fails the job as interrupted
            with self._lock:
                self._running.discard(job_id)
            log.warning("job %s not started: the OMA is stopping", job_id)

    def alive(self, job_id: str) -> bool:
        """Runs here, or its process renewed its heartbeat within the lease."""
        with self._lock:
            if job_id in self._running:
                return True
        job = JobTracking.get_or_none(JobTracking.id == job_id)
        if job is None or job.status not in JOB_TRACKING_ACTIVE_STATUSES:
            return False
        return bool(job.updated_at and job.updated_at >= failover.heartbeat_cutoff(self.settings.worker_lease_seconds))

    def start(self) -> None:
        self.recover()
        self._sweeper.start()

    def stop(self) -> None:
        self._stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._sweeper.is_alive():
            self._sweeper.join(timeout=5)

    # --- recovery and the periodic sweep ------------------------------------------------------------------
    def recover(self) -> None:
        """At start: fail the failover jobs this process left running (and orphans of dead processes)."""
        with db.connection_context():
            self._fail_interrupted(startup=True)

    def _sweep_loop(self) -> None:
        heartbeat = min(10.0, max(0.2, self.settings.worker_lease_seconds / 3))
        sweep = self.settings.failover_sweep_seconds
        tick = min(heartbeat, sweep) if sweep > 0 else heartbeat
        last_beat = last_sweep = time.monotonic()
        while not self._stopping.wait(tick):
            try:
                with db.connection_context():
                    now = time.monotonic()
                    if now - last_beat >= heartbeat:
                        last_beat = now
                        with self._lock:
                            mine = list(self._running)
                        if mine:
                            JobTracking.update(updated_at=utcnow()).where(
                                JobTracking.id.in_(mine),
                                JobTracking.status.in_(list(JOB_TRACKING_ACTIVE_STATUSES))).execute()
                    if sweep > 0 and now - last_sweep >= sweep:
                        last_sweep = now
                        self._fail_interrupted(startup=False)
                        self.auto_cleanup()
            except Exception:  # noqa: BLE001 - the sweep must survive a database hiccup
                log.exception("failover sweep failed; trying again")

    def _fail_interrupted(self, *, startup: bool) -> None:
        cutoff = failover.heartbeat_cutoff(self.settings.worker_lease_seconds)
        jobs = JobTracking.select().where(JobTracking.operation.in_(list(failover.ALL_OPERATIONS)),
                                          JobTracking.status.in_(list(JOB_TRACKING_ACTIVE_STATUSES)))
        for job in jobs:
            with self._lock:
                if job.id in self._running:
                    continue
            mine = (job.metadata or {}).get("worker") == self.instance
            if (startup and mine) or (job.updated_at and job.updated_at < cutoff):
                self._interrupt(job, "interrupted by restart: the OMA process running it stopped; "
                                     "run CleanupFailedExecution if resources were moved")
        # Failover records whose job is gone (ended elsewhere or never tracked).
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
            self._fail_record(record, "interrupted by restart: no job drives this failover any more")

    def _stopped(self, job_id: str, exc: Exception) -> None:
        """The OMA stopped while the job ran its steps: end the job as interrupted."""
        with db.connection_context():
            self._interrupt(JobTracking.get_by_id(job_id), f"interrupted: {exc}")

    def _interrupt(self, job: JobTracking, reason: str) -> None:
        log.warning("%s job %s: %s", job.operation, job.id, reason)
        with db.atomic():
            JobStep.update(status=StepStatus.FAILED, completed_at=utcnow(), error_message=reason).where(
                JobStep.job == job.id, JobStep.status == StepStatus.RUNNING).execute()
            record = FailoverJob.get_or_none(FailoverJob.job_id == job.id)
            if record is None:
                failover_id = (job.metadata or {}).get("failover_job_id")
                record = FailoverJob.get_or_none(FailoverJob.job_id == failover_id) if failover_id else None
            if record is not None and record.status in FAILOVER_ACTIVE_STATUSES:
                self._fail_record(record, reason)
            joblog.end_job(job.id, JobTrackingStatus.FAILED, reason)
            if job.context_id:
                _write_summary(job.id, job.context_id)
        self.hub.notify(job.id)

    def _fail_record(self, record: FailoverJob, reason: str) -> None:
        """Fail a non-terminal record; the context goes to cleanup_required when volumes may be mid-move."""
        moved = record.status not in (FailoverJobStatus.PENDING, FailoverJobStatus.VALIDATING)
        prefix = "rollback: " if record.status == FailoverJobStatus.REVERTING else ""
        with contextlib.suppress(FailedPrecondition):
            failover.move_failover_job(record.job_id, FailoverJobStatus.FAILED, error_message=prefix + reason)
        if moved and record.vm_context_id:
            _set_context_status(record.vm_context_id, ContextStatus.CLEANUP_REQUIRED)

    def auto_cleanup(self) -> None:
        """End completed test failovers whose auto-cleanup deadline passed (§2.9)."""
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

    # --- dispatch -------------------------------------------------------------------------------------
    def _run(self, job_id: str) -> None:
        try:
            with db.connection_context():
                job = JobTracking.get_or_none(JobTracking.id == job_id)
            if job is None or job.status not in JOB_TRACKING_ACTIVE_STATUSES:
                return
            with logs.bind(job_id=job_id, context_id=job.context_id, external_job_id=job.external_job_id):
                if job.operation in failover.FAILOVER_OPERATIONS.values():
                    self._run_failover(job)
                elif job.operation == failover.FAILED_EXECUTION_OPERATION:
                    self._run_failed_execution(job)
                else:
                    self._run_cleanup(job)
        except Exception:  # noqa: BLE001 - a bug must still end the job
            log.exception("failover job %s crashed", job_id)
            with contextlib.suppress(Exception), db.connection_context():
                job = JobTracking.get_or_none(JobTracking.id == job_id)
                if job is not None and job.status in JOB_TRACKING_ACTIVE_STATUSES:
                    self._interrupt(job, "internal error: the workflow crashed (see the server log)")
        finally:
            with self._lock:
                self._running.discard(job_id)
            self.hub.notify(job_id)

    def _steps(self, job_id: str, steps: list[joblog.Step], state: Any, *, keep_going: bool = False,
               failures: list[str] | None = None) -> None:
        """Run steps in order (each a job_steps row, a database connection per step). ``keep_going``:
        a failed step is recorded in ``failures`` and the next one runs."""
        for s in steps:
            if self._stopping.is_set():
                raise _Stopping("the OMA is stopping")
            with db.connection_context():
                reason = s.skip_if(state) if s.skip_if else None
                try:
                    if reason:
                        joblog.skip_step(job_id, s.name, reason)
                    else:
                        with joblog.step(job_id, s.name) as handle:
                            s.run(state, handle)
                except joblog.StepFailed as exc:
                    if not keep_going:
                        raise
                    assert failures is not None
                    failures.append(exc.message)
                finally:
                    self.hub.notify(job_id)

    # === failover =====================================================================================
    def _load_failover(self, job: JobTracking) -> FailoverRun:
        record = FailoverJob.get(FailoverJob.job_id == job.id)
        ctx = contexts.get(record.vm_context_id)
        spec = failover.loads(record.source_vm_spec)
        conf = FailoverConfig(**spec["configuration"], context_id=ctx.context_id, vmware_vm_id=ctx.vmware_vm_id)
        conf.network_mappings = failover.loads(record.network_mappings).get("mappings") or conf.network_mappings
        return FailoverRun(job.id, ctx, record, cloudstack_config.require_active(), conf, spec, job.owner or "system")

    def _failover_steps(self) -> list[joblog.Step]:
        return [
            joblog.Step("validation", self._validate,
                        skip_if=lambda r: "skip_validation requested" if r.conf.skip_validation else None),
            joblog.Step("source-vm-power-off", self._power_off, skip_if=lambda r: None if r.kind == "live"
                        and r.conf.power_off_source else "test failover: the source VM keeps running"),
            joblog.Step("final-sync", self._final_sync, skip_if=lambda r: None if r.kind == "live"
                        and r.conf.perform_final_sync else "no final sync for this failover"),
            joblog.Step("volume-mode-switch-failover", self._lock_volumes),
            joblog.Step("multi-volume-snapshot-creation", self._snapshot),
            joblog.Step("virtio-driver-injection", self._inject, skip_if=self._injection_skip_reason),
            joblog.Step("vm-creation", self._create_vm),
            joblog.Step("volume-attachment", self._attach),
            joblog.Step("vm-startup-and-validation", self._start_vm),
            joblog.Step("status-update", self._status_update),
        ]

    def _run_failover(self, job: JobTracking) -> None:
        try:
            with db.connection_context():
                run = self._load_failover(job)
                failover.move_failover_job(job.id, FailoverJobStatus.VALIDATING)
        except DomainError as exc:
            with db.connection_context(), db.atomic():
                record = FailoverJob.get_or_none(FailoverJob.job_id == job.id)
                if record is not None and record.status in FAILOVER_ACTIVE_STATUSES:
                    failover.move_failover_job(job.id, FailoverJobStatus.FAILED, error_message=exc.message)
                self._end(job.id, job.context_id, exc.message)
            return
        try:
            self._steps(job.id, self._failover_steps(), run)
        except joblog.StepFailed as exc:
            self._failover_failed(run, exc.step, exc.message)
            return
        except _Stopping as exc:
            self._stopped(job.id, exc)
            return
        with db.connection_context(), db.atomic():
            self._end(job.id, run.ctx.context_id)
        log.info("%s failover of %s completed: destination VM %s", run.kind, run.ctx.vm_name, run.destination_vm_id)

    def _end(self, job_id: str, context_id: str | None, error: str | None = None) -> None:
        joblog.end_job(job_id, JobTrackingStatus.FAILED if error else JobTrackingStatus.COMPLETED, error)
        if context_id:
            _write_summary(job_id, context_id)

    # step 1
    def _validate(self, run: FailoverRun, step: joblog.StepHandle) -> None:
        ctx = contexts.get(run.ctx.context_id)
        result = readiness.failover_readiness(ctx, run.kind, vma=self.vma if run.kind == "live" else None,
                                              own_failover_job_id=run.job_id)
        step.details.update(readiness_score=result.score, is_valid=result.is_valid,
                            checks={c.check_name: c.status for c in result.checks})
        if not result.is_valid:
            raise FailedPrecondition("the VM is not ready for failover: " + "; ".join(result.errors))

    # step 2
    def _login(self, ctx: VmReplicationContext) -> credentials.VCenterLogin:
        credential_id = ctx.credential_id or credentials.get_default().id
        return credentials.login_for(self._box, credential_id)

    def _power_off(self, run: FailoverRun, step: joblog.StepHandle) -> None:
        login = self._login(run.ctx)
        before = self.vma.power_state(login, run.ctx.vmware_vm_id).power_state
        step.details["previous_state"] = before
        if before == "poweredOff":
            step.details["method"] = "already-off"
            return
        result = self.vma.power_off(login, run.ctx.vmware_vm_id, timeout_seconds=self.settings.failover_power_off_seconds,
                                    force_after_timeout=True)
        step.details.update(method=result.method, message=result.message)
        state = self._wait_power(login, run.ctx.vmware_vm_id, "poweredOff", 120.0, 1.0)
        step.details["new_state"] = state
        if state != "poweredOff":
            raise DeadlineExceeded(f"graceful shutdown timeout: {run.ctx.vm_name} is still {state}")
        credentials.record_use(login.credential_id)

    def _wait_power(self, login: credentials.VCenterLogin, vm_uuid: str, wanted: str, timeout: float,
                    interval: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.vma.power_state(login, vm_uuid).power_state
            if state == wanted or time.monotonic() >= deadline or self._stopping.is_set():
                return state
            time.sleep(interval)

    # step 3
    def _final_sync(self, run: FailoverRun, step: joblog.StepHandle) -> None:
        engine = self.runtime.components["replication"]
        created = replications.create(replications.CreateRequest(
            context_id=run.ctx.context_id, scheduled_by=job_lifecycle.FINAL_SYNC_SCHEDULER,
            request_id=f"final-sync-{run.job_id}",
            for_failover_job=run.job_id),
            run.actor)
        run.final_sync_job = created.job.id
        step.details["replication_job_id"] = created.job.id
        if not created.repeated:
            engine.submit(created.job.id)
        deadline = time.monotonic() + self.settings.failover_final_sync_timeout_seconds
        seen = engine.hub.version(created.job.id)
        while True:
            job = ReplicationJob.get_by_id(created.job.id)
            joblog.set_percent(run.job_id, float(job.progress_percent or 0))
            if job.status == JobStatus.COMPLETED:
                step.details.update(replication_type=str(job.replication_type), bytes_transferred=job.bytes_transferred)
                return
            if job.status not in REPLICATION_ACTIVE_STATUSES:
                raise FailedPrecondition(
                    f"final sync {job.id} {job.status}: {job.error_message or 'no error given'}; the source VM "
                    f"{run.ctx.vm_name} is powered off — roll back with power_on_source to start it again")
            if self._stopping.is_set() or time.monotonic() > deadline:
                with contextlib.suppress(DomainError):
                    engine.cancel(job.id, "the failover stopped waiting for its final sync")
                if self._stopping.is_set():
                    raise _Stopping("the OMA is stopping")
                raise DeadlineExceeded(
                    f"final sync {job.id} did not end within {self.settings.failover_final_sync_timeout_seconds:.0f} s "
                    f"(cancelled); the source VM {run.ctx.vm_name} is powered off")
            seen = engine.hub.wait(job.id, seen, 1.0)

    # step 4 (+ the context status change of §2.3 item 5)
    def _lock_volumes(self, run: FailoverRun, step: joblog.StepHandle) -> None:
        failover.move_failover_job(run.job_id, FailoverJobStatus.SNAPSHOTTING)
        disks = list(VmDisk.select().where(VmDisk.vm_context == run.ctx.context_id))
        if not disks:
            raise FailedPrecondition(f"VM {quote(run.ctx.vm_name)} has no disks")
        run.disks = failover.os_disk_first(disks, readiness.os_disk(disks))
        replicas = volumes.replicas_of(run.disks)
        missing = [d.disk_id for d in run.disks if d.ossea_volume_id not in replicas]
        if missing:
            raise FailedPrecondition(f"no replica volume for {', '.join(missing)}; replicate the VM first")
        run.volumes = {d.disk_id: replicas[d.ossea_volume_id] for d in run.disks}
        mappings = {m.volume_uuid: m for m in DeviceMapping.select().where(
            DeviceMapping.volume_uuid.in_([v.volume_id for v in run.volumes.values()]))}
        off_oma = [v.volume_id for v in run.volumes.values()
                   if v.volume_id not in mappings or mappings[v.volume_id].vm_id != run.config.oma_vm_id]
        if off_oma:
            raise FailedPrecondition(f"replica volumes not attached to the OMA: {', '.join(off_oma)}")
        now = utcnow()
        with db.atomic():
            flipped = VmReplicationContext.update(
                current_status=run.failed_over_status, last_status_change=now).where(
                VmReplicationContext.context_id == run.ctx.context_id,
                VmReplicationContext.current_status == ContextStatus.READY_FOR_FAILOVER,
                VmReplicationContext.current_job.is_null()).execute()
            if not flipped:
                ctx = VmReplicationContext.get_by_id(run.ctx.context_id)
                busy = f" (replication {ctx.current_job_id} is running)" if ctx.current_job_id else ""
                raise FailedPrecondition(f"VM {quote(ctx.vm_name)} is {ctx.current_status}{busy}, not ready_for_failover")
            locked = DeviceMapping.update(operation_mode=DeviceOperationMode.FAILOVER).where(
                DeviceMapping.vm_context == run.ctx.context_id, DeviceMapping.vm_id == run.config.oma_vm_id).execute()
        run.status_flipped = run.locked = True
        step.details.update(context_status=str(run.failed_over_status), mappings_locked=locked,
                            os_disk=run.disks[0].disk_id)

    # step 5
    def _snapshot(self, run: FailoverRun, step: joblog.StepHandle) -> None:
        cs = self.cs(run.config, self.settings.failover_snapshot_timeout_seconds)
        for _, volume in run.ordered_volumes():
            current = OsseaVolume.get_by_id(volume.id)
            leftover = _tracked_snapshot(current)
            if not leftover:
                continue
            if current.snapshot_status == SnapshotStatus.ROLLBACK_COMPLETE:
                # An earlier cleanup reverted from it but could not delete it: delete it now.
                if cs.get_snapshot(leftover) is not None:
                    cs.delete_snapshot(leftover)
                _clear_tracking(current)
            else:
                raise FailedPrecondition(
                    f"volume {current.volume_id} still tracks snapshot {leftover} ({current.snapshot_status}) of an "
                    "earlier failover; run CleanupFailedExecution first")
        unix = int(time.time())
        made, failures = [], []
        for disk, volume in run.ordered_volumes():
            OsseaVolume.update(snapshot_status=SnapshotStatus.CREATING).where(OsseaVolume.id == volume.id).execute()
            name = f"multi-test-failover-{disk.disk_id}-{unix}"
            try:
                snap = cs.create_snapshot(volume.volume_id, name)
            except DomainError as exc:
                OsseaVolume.update(snapshot_status=SnapshotStatus.FAILED).where(OsseaVolume.id == volume.id).execute()
                failures.append(f"{disk.disk_id} ({volume.volume_id}): {exc.message}")
                continue
            now = utcnow()
            OsseaVolume.update(snapshot_id=snap["id"], snapshot_created_at=now,
                               snapshot_status=SnapshotStatus.READY).where(OsseaVolume.id == volume.id).execute()
            run.snapshots[volume.volume_id] = snap["id"]
            made.append({"volume_uuid": volume.volume_id, "volume_name": volume.volume_name, "snapshot_id": snap["id"],
                         "snapshot_name": name, "disk_id": disk.disk_id, "created_at": now.isoformat()})
        summary = {"snapshots": made, "total_volumes": len(run.volumes), "success_count": len(made),
                   "failure_count": len(failures)}
        if made:  # shown as the record's snapshot id (the per-volume ids are on ossea_volumes)
            FailoverJob.update(ossea_snapshot_id=made[0]["snapshot_id"]).where(
                FailoverJob.job_id == run.job_id).execute()
        step.details["multi_volume_snapshots"] = summary
        _merge_job_metadata(run.job_id, {"multi_volume_snapshots": summary})
        if failures:
            raise FailedPrecondition("snapshot creation failed (all volumes must be protected, the run's snapshots "
                                     "are deleted): " + "; ".join(failures))

    # step 6
    def _injection_skip_reason(self, run: FailoverRun) -> str | None:
        if run.conf.skip_virtio:
            return "skip_virtio requested"
        os_type = (run.disks[0].os_type if run.disks else "") or run.ctx.os_type or ""
        if _guest_family(os_type) == "other":
            return f"skipped - VM is not Windows ({os_type})"
        if not self.settings.virtio_injection_command.strip():
            return ("no driver injection command is configured (OMA_VIRTIO_INJECTION_COMMAND); "
                    f"drivers were not injected into the {os_type or 'unknown'} guest")
        return None

    def _inject(self, run: FailoverRun, step: joblog.StepHandle) -> None:
        disk, volume = run.ordered_volumes()[0]
        mapping = DeviceMapping.get(DeviceMapping.volume_uuid == volume.volume_id)
        command = [*shlex.split(self.settings.virtio_injection_command), mapping.device_path,
                   f"virtio-{run.ctx.vmware_vm_id}-{int(time.time())}"]
        step.details.update(os_disk=disk.disk_id, device_path=mapping.device_path)
        run.injection_ran = True
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=self.settings.virtio_injection_timeout_seconds, check=False)
            if done.returncode != 0:
                raise FailedPrecondition(f"driver injection exited with {done.returncode}: "
                                         f"{(done.stderr or done.stdout).strip()[-500:]}")
        except (OSError, subprocess.TimeoutExpired, FailedPrecondition) as exc:
            message = exc.message if isinstance(exc, DomainError) else f"driver injection could not run: {exc}"
            if run.kind == "live":
                step.details.update(virtio_status="failed_non_fatal", virtio_error=message)
                log.warning("driver injection failed (live failover continues): %s", message)
                return
            raise FailedPrecondition(message) from None
        step.details["virtio_status"] = "drivers-injected-successfully"

    # step 7
    def _network_ids(self, run: FailoverRun) -> list[str]:
        nics = run.spec.get("networks") or (run.disks[0].network_config if run.disks else None) or []
        sources = list(dict.fromkeys(n.get("network_name") for n in nics if isinstance(n, dict) and n.get("network_name")))
        if not sources:
            if not run.config.network_id:
                raise FailedPrecondition("the VM has no recorded networks and the CloudStack configuration no network_id")
            return [run.config.network_id]
        unmapped = [n for n in sources if not run.conf.network_mappings.get(n)]
        if unmapped:
            raise FailedPrecondition(f"no destination network for source network(s) {', '.join(unmapped)}: "
                                     "add network mappings")
        ids = [run.conf.network_mappings[n] for n in sources]
        return list(dict.fromkeys(ids))  # CloudStack refuses a network listed twice

    def _create_vm(self, run: FailoverRun, step: joblog.StepHandle) -> None:
        failover.move_failover_job(run.job_id, FailoverJobStatus.CREATING_VM)
        cs = self.cs(run.config, self.settings.failover_vm_timeout_seconds)
        name = run.conf.destination_hostname
        existing = cs.find_virtual_machines(name)
        if existing:
            raise FailedPrecondition(
                f"a CloudStack VM named {quote(name)} already exists ({existing[0]['id']}, {existing[0].get('state')}); "
                "remove it or run CleanupFailedExecution")
        run.name_was_free = True
        networks = self._network_ids(run)
        zone = next((z for z in cs.list_zones() if run.config.zone in (z["id"], z.get("name"))), None)
        if zone is None:
            raise FailedPrecondition(f"CloudStack zone {quote(run.config.zone)} of the configuration does not exist")
        offering = next((o for o in cs.list_service_offerings() if o["id"] == run.config.service_offering_id), None)
        if offering is None:
            raise FailedPrecondition(f"service offering {quote(run.config.service_offering_id)} of the CloudStack "
                                     "configuration does not exist")
        cpus = int(run.spec.get("cpus") or run.ctx.cpu_count or 1)
        memory = int(run.spec.get("memory_mb") or run.ctx.memory_mb or 1024)
        details: dict[str, Any] = {}
        if offering.get("iscustomized"):
            details = {"cpuNumber": cpus, "memory": memory}
            if not offering.get("cpuspeed"):
                details["cpuSpeed"] = 1000
        elif (offering.get("cpunumber"), offering.get("memory")) != (cpus, memory):
            step.details["sizing_warning"] = (f"offering {offering.get('name')} gives {offering.get('cpunumber')} vCPU / "
                                              f"{offering.get('memory')} MB; the source has {cpus} vCPU / {memory} MB")
        vm = cs.deploy_virtual_machine(name=name, display_name=run.conf.destination_name, zone_id=zone["id"],
                                       service_offering_id=offering["id"], template_id=run.config.template_id or "",
                                       network_ids=networks, details=details, start=False)
        run.destination_vm_id = vm["id"]
        failover.move_failover_job(run.job_id, FailoverJobStatus.SWITCHING_VOLUME, destination_vm_id=vm["id"])
        step.details.update(destination_vm_id=vm["id"], name=name, display_name=run.conf.destination_name,
                            network_ids=networks, cpus=cpus, memory_mb=memory)

    # step 8
    def _attach(self, run: FailoverRun, step: joblog.StepHandle) -> None:
        place = Placement(self, run.config)
        vm_id = run.destination_vm_id
        keep = {v.volume_id for v in run.volumes.values()}
        step.details["template_root_removed"] = place.remove_template_root(vm_id, keep)
        attached = []
        for index, (disk, volume) in enumerate(run.ordered_volumes()):
            where = place.location(volume)
            if where != vm_id:
                run.moved.add(volume.volume_id)
                if where is not None:
                    place.detach(volume)  # stops the NBD export, detaches from the OMA, drops the mapping
                mapping = place.attach_to(volume, vm_id, 0 if index == 0 else None)
            else:
                mapping = DeviceMapping.get_or_none(DeviceMapping.volume_uuid == volume.volume_id) or \
                    place.attach_to(volume, vm_id, 0 if index == 0 else None)
            attached.append({"disk_id": disk.disk_id, "volume_id": volume.volume_id,
                             "device_id": mapping.cloudstack_device_id, "root": index == 0})
        step.details["volumes"] = attached

    # step 9
    def _start_vm(self, run: FailoverRun, step: joblog.StepHandle) -> None:
        failover.move_failover_job(run.job_id, FailoverJobStatus.POWERING_ON)
        cs = self.cs(run.config, self.settings.failover_vm_timeout_seconds)
        cs.start_virtual_machine(run.destination_vm_id)
        vm = cs.get_virtual_machine(run.destination_vm_id) or {}
        warnings = []
        if vm.get("state") != "Running":
            warnings.append(f"the VM is {vm.get('state')}, not Running")
        cpus, memory = int(run.spec.get("cpus") or 0), int(run.spec.get("memory_mb") or 0)
        if cpus and vm.get("cpunumber") and int(vm["cpunumber"]) != cpus:
            warnings.append(f"{vm['cpunumber']} vCPU instead of {cpus}")
        if memory and vm.get("memory") and int(vm["memory"]) != memory:
            warnings.append(f"{vm['memory']} MB instead of {memory} MB")
        step.details.update(state=vm.get("state"), warnings=warnings,
                            nics=[{"network_id": n.get("networkid"), "ip": n.get("ipaddress"), "mac": n.get("macaddress")}
                                  for n in vm.get("nic") or []])
        for warning in warnings:
            log.warning("destination VM %s: %s", run.destination_vm_id, warning)

    # step 10
    def _status_update(self, run: FailoverRun, step: joblog.StepHandle) -> None:
        now = utcnow()
        with db.atomic():
            ctx = VmReplicationContext.get_by_id(run.ctx.context_id)
            if ctx.current_status != run.failed_over_status:
                VmReplicationContext.update(current_status=run.failed_over_status, last_status_change=now).where(
                    VmReplicationContext.context_id == ctx.context_id).execute()
            values: dict[str, Any] = {}
            if run.kind == "test" and run.conf.auto_cleanup:
                deadline = now + timedelta(seconds=duration_seconds(run.conf.test_duration or "2h"))
                spec = {**run.spec, "cleanup_deadline": deadline.isoformat()}
                values["source_vm_spec"] = failover.dumps(spec)
                step.details["cleanup_deadline"] = deadline.isoformat()
            failover.move_failover_job(run.job_id, FailoverJobStatus.COMPLETED, **values)
        step.details.update(context_status=str(run.failed_over_status), destination_vm_id=run.destination_vm_id)

    # --- failure and compensation -------------------------------------------------------------------------
    def _failover_failed(self, run: FailoverRun, failed_step: str, message: str) -> None:
        error = message
        context_status: ContextStatus | None = None
        if failed_step == "status-update":
            # The destination VM runs: never tear it down for a bookkeeping error (§2.4 rows 13/14).
            error += f"; the destination VM {run.destination_vm_id} is running with the volumes attached"
        elif failed_step == "final-sync":
            if run.final_sync_job:
                with contextlib.suppress(DomainError), db.connection_context():
                    job = ReplicationJob.get_by_id(run.final_sync_job)
                    if job.status in REPLICATION_ACTIVE_STATUSES:
                        self.runtime.components["replication"].cancel(job.id, "the failover failed")
            # §2.4 row 4: the context stays ready for failover (job_lifecycle releases a failed final
            # sync that way); the replicas keep the last completed sync's change ids.
            error += "; the next live failover final-syncs again from the last completed sync"
        elif run.status_flipped or run.locked or run.snapshots or run.destination_vm_id or run.name_was_free:
            ok, problems = self._compensate(run)
            if ok:
                error += "; compensation restored the VM (volumes back on the OMA, snapshots deleted)"
                context_status = ContextStatus.READY_FOR_FAILOVER
            else:
                error += "; compensation failed: " + "; ".join(problems) + \
                         " — run CleanupFailedExecution"
                context_status = ContextStatus.CLEANUP_REQUIRED
        source_off = run.kind == "live" and run.conf.power_off_source
        if source_off and failed_step not in ("validation", "source-vm-power-off", "final-sync"):
            error += (f"; the source VM {run.ctx.vm_name} stays powered off: roll back with power_on_source "
                      "to start it again")
        with db.connection_context(), db.atomic():
            if context_status is not None:
                _set_context_status(run.ctx.context_id, context_status)
            with contextlib.suppress(FailedPrecondition):
                failover.move_failover_job(run.job_id, FailoverJobStatus.FAILED, error_message=error)
            self._end(run.job_id, run.ctx.context_id, error)
        log.warning("%s failover of %s failed: %s", run.kind, run.ctx.vm_name, error)

    def _compensate(self, run: FailoverRun) -> tuple[bool, list[str]]:
        """The saga of §2.4 as a child job; returns (everything restored, problems)."""
        with db.connection_context():
            comp_id = joblog.start_job(JobType.CLEANUP, failover.COMPENSATION_OPERATION, owner="system",
                                       context_id=run.ctx.context_id, parent_job_id=run.job_id,
                                       category=JobCategory.SYSTEM,
                                       metadata={"failover_job_id": run.job_id, "worker": self.instance})
            _merge_job_metadata(run.job_id, {"compensation_job_id": comp_id})
        with self._lock:
            self._running.add(comp_id)
        problems: list[str] = []
        place = Placement(self, run.config)
        vm_cs = self.cs(run.config, self.settings.failover_vm_timeout_seconds)
        destinations: list[str] = []

        def find_destinations(state: Any, step: joblog.StepHandle) -> None:
            found = [run.destination_vm_id] if run.destination_vm_id else []
            if run.name_was_free:  # only a VM this run created may be found by its name
                found += [vm["id"] for vm in vm_cs.find_virtual_machines(run.conf.destination_hostname)]
            destinations.extend(dict.fromkeys(found))
            step.details["destination_vms"] = list(destinations)
            for vm_id in destinations:
                step.details[vm_id] = self._stop_vm(vm_cs, vm_id)

        def detach_from_destinations(state: Any, step: joblog.StepHandle) -> None:
            candidates = [OsseaVolume.get_by_id(v.id) for v in context_volumes(run.ctx.context_id)]
            detached = []
            for vm_id in destinations:
                for volume in place.volumes_on(vm_id, candidates):
                    place.detach(volume)
                    run.moved.add(volume.volume_id)
                    detached.append(volume.volume_id)
            step.details["detached"] = detached

        def destroy(state: Any, step: joblog.StepHandle) -> None:
            for vm_id in destinations:
                step.details[vm_id] = self._destroy_vm(vm_cs, place, run.ctx.context_id, vm_id)

        def revert_targets() -> list[OsseaVolume]:
            wanted = set(run.moved) if run.kind == "test" else set()
            if run.injection_ran and run.volumes:
                wanted.add(run.ordered_volumes()[0][1].volume_id)
            return [v for v in context_volumes(run.ctx.context_id) if v.volume_id in wanted and v.volume_id in run.snapshots]

        def revert(state: Any, step: joblog.StepHandle) -> None:
            snap_cs = self.cs(run.config, self.settings.failover_snapshot_timeout_seconds)
            for volume in revert_targets():
                if place.location(volume) == place.oma_vm_id:
                    place.detach(volume)  # CloudStack reverts only volumes of a stopped VM or detached ones
                snap_cs.revert_snapshot(run.snapshots[volume.volume_id])
                OsseaVolume.update(snapshot_status=SnapshotStatus.ROLLBACK_COMPLETE).where(
                    OsseaVolume.id == volume.id).execute()
                step.details[volume.volume_id] = run.snapshots[volume.volume_id]

        def reattach(state: Any, step: joblog.StepHandle) -> None:
            step.details["reattached"] = self._reattach_all(place, run.ctx.context_id)

        def delete_snapshots(state: Any, step: joblog.StepHandle) -> None:
            step.details["deleted"] = self._delete_snapshots(run.config, run.ctx.context_id, only=run.snapshots)

        def unlock(state: Any, step: joblog.StepHandle) -> None:
            step.details["unlocked"] = _unlock(run.ctx.context_id, run.config.oma_vm_id or "")

        steps = [
            joblog.Step("destination-vm-shutdown", find_destinations,
                        skip_if=lambda _: None if run.destination_vm_id or run.name_was_free else "no destination VM was created"),
            joblog.Step("volume-detachment", detach_from_destinations,
                        skip_if=lambda _: None if destinations else "no destination VM holds volumes"),
            joblog.Step("destination-vm-deletion", destroy, skip_if=lambda _: None if destinations else "no destination VM"),
            joblog.Step("cloudstack-snapshot-rollback", revert,
                        skip_if=lambda _: None if revert_targets() else "no volume was written by the destination"),
            joblog.Step("volume-reattachment-to-oma", reattach),
            joblog.Step("cloudstack-snapshot-deletion", delete_snapshots, skip_if=lambda _: (
                "compensation incomplete: snapshots kept for CleanupFailedExecution" if problems else
                (None if run.snapshots or _tracked_volumes(run.ctx.context_id) else "no snapshots were made"))),
            joblog.Step("volume-mode-switch-oma", unlock),
        ]
        try:
            self._steps(comp_id, steps, run, keep_going=True, failures=problems)
        except _Stopping:
            problems.append("interrupted: the OMA is stopping")
        with db.connection_context():
            joblog.end_job(comp_id, JobTrackingStatus.FAILED if problems else JobTrackingStatus.COMPLETED,
                           "; ".join(problems) or None)
        with self._lock:
            self._running.discard(comp_id)
        return not problems, problems

    # --- shared CloudStack actions --------------------------------------------------------------------------
    def _stop_vm(self, cs: CloudStack, vm_id: str) -> str:
        vm = cs.get_virtual_machine(vm_id)
        if vm is None:
            return "missing"
        state = vm.get("state")
        if state in ("Stopped", "Error", *_GONE_VM_STATES):
            return state
        cs.stop_virtual_machine(vm_id)
        deadline = time.monotonic() + self.settings.failover_vm_stop_wait_seconds
        while True:
            vm = cs.get_virtual_machine(vm_id) or {"state": "missing"}
            if vm["state"] in ("Stopped", "missing"):
                return vm["state"]
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"VM {vm_id} did not stop within {self.settings.failover_vm_stop_wait_seconds:.0f} s")
            time.sleep(max(0.05, self.settings.cloudstack_poll_interval_seconds))

    def _destroy_vm(self, cs: CloudStack, place: Placement, context_id: str, vm_id: str) -> str:
        vm = cs.get_virtual_machine(vm_id)
        if vm is None or vm.get("state") == "Expunging":
            return "already gone"
        holding = place.volumes_on(vm_id, context_volumes(context_id))
        if holding:
            # Expunging would delete a replica attached as its root disk.
            raise FailedPrecondition(f"VM {vm_id} still holds replica volumes "
                                     f"{', '.join(v.volume_id for v in holding)}; it is not destroyed")
        cs.destroy_virtual_machine(vm_id, expunge=True)
        log.info("destination VM %s destroyed", vm_id)
        return "destroyed"

    def _reattach_all(self, place: Placement, context_id: str) -> list[str]:
        """Every context volume back on the OMA with its export; mappings of OMA volumes in mode oma."""
        done = []
        for volume in context_volumes(context_id):
            where = place.location(volume)
            if where not in (None, place.oma_vm_id):
                raise FailedPrecondition(f"volume {volume.volume_id} is attached to VM {where}, not the OMA")
            place.to_oma(volume)
            done.append(volume.volume_id)
        return done

    def _delete_snapshots(self, config: OsseaConfig, context_id: str, only: dict[str, str] | None = None,
                          strict: bool = True) -> list[str]:
        """Delete tracked snapshots (those of ``only`` when given) and clear each volume's tracking only
        after its snapshot is gone. ``strict=False``: a snapshot that cannot be deleted stays tracked (a
        reverted one is deleted by the next failover) and is only logged."""
        cs = self.cs(config, self.settings.failover_snapshot_timeout_seconds)
        deleted, failures = [], []
        for volume in context_volumes(context_id):
            snapshot_id = _tracked_snapshot(volume)
            if only is not None and volume.volume_id not in only and snapshot_id not in only.values():
                if volume.snapshot_status in (SnapshotStatus.CREATING, SnapshotStatus.FAILED) and not snapshot_id:
                    _clear_tracking(volume)
                continue
            if snapshot_id:
                try:
                    if cs.get_snapshot(snapshot_id) is not None:
                        cs.delete_snapshot(snapshot_id)
                except DomainError as exc:
                    failures.append(f"snapshot {snapshot_id} of volume {volume.volume_id}: {exc.message}")
                    continue
                deleted.append(snapshot_id)
            _clear_tracking(volume)
        if failures and strict:
            raise FailedPrecondition("snapshots not deleted: " + "; ".join(failures))
        for failure in failures:
            log.warning("snapshot not deleted (it stays tracked): %s", failure)
        return deleted

    # === end test, cleanup, rollback (§2.7) ====================================================================
    def _cleanup_steps(self, run: CleanupRun) -> list[joblog.Step]:
        steps = [
            joblog.Step("failover-job-retrieval", self._retrieve),
            joblog.Step("test-vm-shutdown", self._shutdown_destination,
                        skip_if=lambda r: None if r.record and r.record.destination_vm_id else "no destination VM ID"),
            joblog.Step("volume-detachment", self._detach_destination,
                        skip_if=lambda r: None if r.record and r.record.destination_vm_id else "no destination VM ID"),
            joblog.Step("multi-volume-snapshot-cleanup", self._snapshot_cleanup),
            joblog.Step("volume-mode-switch-oma", lambda r, s: s.details.update(
                unlocked=_unlock(r.ctx.context_id, r.config.oma_vm_id or ""))),
            *([joblog.Step("legacy-cloudstack-snapshot-rollback", self._legacy_revert),
               joblog.Step("legacy-cloudstack-snapshot-deletion", self._legacy_delete)] if run.legacy_snapshot_id else []),
            joblog.Step("volume-reattachment-to-oma", lambda r, s: s.details.update(
                reattached=self._reattach_all(Placement(self, r.config), r.ctx.context_id))),
            joblog.Step("test-vm-deletion", self._delete_destination,
                        skip_if=lambda r: None if r.record and r.record.destination_vm_id else "no destination VM ID"),
            joblog.Step("failover-job-status-update", self._record_cleanup),
            joblog.Step("vm-context-status-update", self._context_ready),
        ]
        if run.rollback:
            steps.append(joblog.Step("source-vm-power-on", self._power_on,
                                     skip_if=lambda r: None if r.power_on else "power_on_source is false"))
        return steps

    def _run_cleanup(self, job: JobTracking) -> None:
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
                self._cleanup_failed(job.id, job.context_id, meta.get("failover_job_id"), exc.message)
            return
        try:
            self._steps(job.id, self._cleanup_steps(run), run, keep_going=run.force, failures=run.failures)
        except joblog.StepFailed as exc:
            run.failures.append(exc.message)
        except _Stopping as exc:
            self._stopped(job.id, exc)
            return
        with db.connection_context():
            if run.failures:
                self._cleanup_failed(job.id, run.ctx.context_id, record.job_id if record else None,
                                     "; ".join(run.failures))
            else:
                with db.atomic():
                    self._end(job.id, run.ctx.context_id)

    def _cleanup_failed(self, job_id: str, context_id: str | None, failover_job_id: str | None, error: str) -> None:
        with db.atomic():
            if failover_job_id:
                record = FailoverJob.get_or_none(FailoverJob.job_id == failover_job_id)
                if record is not None and record.status == FailoverJobStatus.REVERTING:
                    failover.move_failover_job(failover_job_id, FailoverJobStatus.FAILED, error_message=f"rollback: {error}")
            if context_id:
                _set_context_status(context_id, ContextStatus.CLEANUP_REQUIRED)
            self._end(job_id, context_id, error)

    def _retrieve(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        if run.record is None:
            raise NotFound("the failover record to clean up no longer exists")
        step.details.update(failover_job_id=run.record.job_id, failover_type=str(run.record.job_type),
                            destination_vm_id=run.record.destination_vm_id or None,
                            legacy_snapshot_id=run.record.ossea_snapshot_id or None, status=str(run.record.status))

    def _shutdown_destination(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        cs = self.cs(run.config, self.settings.failover_vm_timeout_seconds)
        step.details["state"] = self._stop_vm(cs, run.record.destination_vm_id)

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
            snapshot_id = _tracked_snapshot(volume)
            if not snapshot_id or volume.snapshot_status != SnapshotStatus.READY:
                continue
            try:
                if place.location(volume) == place.oma_vm_id:
                    place.detach(volume)
                cs.revert_snapshot(snapshot_id)
            except DomainError as exc:
                if not run.force:
                    raise FailedPrecondition(f"revert of volume {volume.volume_id} from snapshot {snapshot_id} failed: "
                                             f"{exc.message}; snapshots kept") from None
                not_reverted.append(f"{volume.volume_id}: {exc.message}")
                _force_full_resync(volume)
                continue
            OsseaVolume.update(snapshot_status=SnapshotStatus.ROLLBACK_COMPLETE).where(OsseaVolume.id == volume.id).execute()
            reverted.append(volume.volume_id)
        step.details.update(reverted=reverted)
        step.details["deleted"] = self._delete_snapshots(run.config, run.ctx.context_id, strict=False)
        if not_reverted:
            raise FailedPrecondition("not reverted (a full resync is forced for these disks): " + "; ".join(not_reverted))

    def _legacy_revert(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        cs = self.cs(run.config, self.settings.failover_snapshot_timeout_seconds)
        snapshot = cs.get_snapshot(run.legacy_snapshot_id)
        if snapshot is None:
            raise NotFound(f"legacy snapshot {run.legacy_snapshot_id} no longer exists in CloudStack")
        if snapshot.get("state") != "BackedUp":
            log.warning("legacy snapshot %s is %s, not BackedUp", run.legacy_snapshot_id, snapshot.get("state"))
        cs.revert_snapshot(run.legacy_snapshot_id)
        step.details.update(snapshot_id=run.legacy_snapshot_id, volume_id=snapshot.get("volumeid"))

    def _legacy_delete(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        cs = self.cs(run.config, self.settings.failover_snapshot_timeout_seconds)
        cs.delete_snapshot(run.legacy_snapshot_id)
        step.details["snapshot_id"] = run.legacy_snapshot_id

    def _delete_destination(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        cs = self.cs(run.config, self.settings.failover_vm_timeout_seconds)
        step.details["result"] = self._destroy_vm(cs, Placement(self, run.config), run.ctx.context_id,
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
        step.details["status"] = str(_set_context_status(run.ctx.context_id, wanted))

    def _power_on(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        login = self._login(run.ctx)
        before = self.vma.power_state(login, run.ctx.vmware_vm_id).power_state
        step.details["previous_state"] = before
        if before == "poweredOn":
            step.details["method"] = "already-on"
            return
        result = self.vma.power_on(login, run.ctx.vmware_vm_id, timeout_seconds=self.settings.failover_power_on_seconds)
        step.details["message"] = result.message
        state = self._wait_power(login, run.ctx.vmware_vm_id, "poweredOn",
                                 float(self.settings.failover_power_on_seconds), 2.0)
        step.details["new_state"] = state
        if state != "poweredOn":
            raise DeadlineExceeded(f"power-on timeout: {run.ctx.vm_name} is {state}")
        credentials.record_use(login.credential_id)

    # === failed-execution cleanup (§2.13) =====================================================================
    def _run_failed_execution(self, job: JobTracking) -> None:
        meta = job.metadata or {}
        try:
            with db.connection_context():
                ctx = contexts.get(job.context_id)
                record = FailoverJob.get_or_none(FailoverJob.job_id == meta.get("failover_job_id")) \
                    if meta.get("failover_job_id") else None
                run = CleanupRun(job.id, job.operation, ctx, cloudstack_config.require_active(), record)
        except DomainError as exc:
            with db.connection_context():
                self._cleanup_failed(job.id, job.context_id, None, exc.message)
            return
        steps = [
            joblog.Step("analyze-volume-state", self._analyze),
            joblog.Step("detach-attached-volumes", self._detach_everywhere),
            joblog.Step("destroy-destination-vm", self._destroy_destinations,
                        skip_if=lambda r: None if r.destinations else "no destination VM found"),
            joblog.Step("cleanup-snapshots", self._cleanup_snapshots),
            joblog.Step("reattach-all-volumes", lambda r, s: s.details.update(
                reattached=self._reattach_all(Placement(self, r.config), r.ctx.context_id))),
            joblog.Step("reset-vm-state", self._reset_state),
        ]
        try:
            self._steps(job.id, steps, run)
        except joblog.StepFailed as exc:
            with db.connection_context():
                self._cleanup_failed(job.id, run.ctx.context_id, None, exc.message)
            return
        except _Stopping as exc:
            self._stopped(job.id, exc)
            return
        with db.connection_context(), db.atomic():
            self._end(job.id, run.ctx.context_id)

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
                    created = _parse_cs_time(vm.get("created"))
                    if created is not None and created >= since:  # made by that failover, not someone else's VM
                        found.append(vm["id"])
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
            step.details[f"vm:{vm_id}"] = self._stop_vm(cs, vm_id)
        detached = []
        for volume in context_volumes(run.ctx.context_id):
            try:
                where = place.location(volume)
            except NotFound:
                continue
            needs_revert = bool(_tracked_snapshot(volume)) and volume.snapshot_status == SnapshotStatus.READY
            if where and (where != place.oma_vm_id or needs_revert):
                place.detach(volume)
                detached.append(volume.volume_id)
        step.details["detached"] = detached

    def _destroy_destinations(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        cs = self.cs(run.config, self.settings.failover_vm_timeout_seconds)
        place = Placement(self, run.config)
        for vm_id in run.destinations:
            step.details[vm_id] = self._destroy_vm(cs, place, run.ctx.context_id, vm_id)

    def _cleanup_snapshots(self, run: CleanupRun, step: joblog.StepHandle) -> None:
        cs = self.cs(run.config, self.settings.failover_snapshot_timeout_seconds)
        reverted, lost = [], []
        for volume in context_volumes(run.ctx.context_id):
            snapshot_id = _tracked_snapshot(volume)
            if not snapshot_id or volume.snapshot_status != SnapshotStatus.READY:
                continue
            if cs.get_snapshot(snapshot_id) is None:
                lost.append(snapshot_id)  # nothing to revert from: only a full copy makes the replica trustworthy
                _force_full_resync(volume)
                continue
            try:
                cs.revert_snapshot(snapshot_id)
            except DomainError as exc:
                raise FailedPrecondition(f"revert of volume {volume.volume_id} from snapshot {snapshot_id} failed: "
                                         f"{exc.message}") from None
            OsseaVolume.update(snapshot_status=SnapshotStatus.ROLLBACK_COMPLETE).where(OsseaVolume.id == volume.id).execute()
            reverted.append(volume.volume_id)
        step.details.update(reverted=reverted, missing_snapshots=lost,
                            deleted=self._delete_snapshots(run.config, run.ctx.context_id))

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
            _unlock(run.ctx.context_id, run.config.oma_vm_id or "")
            ctx = VmReplicationContext.get_by_id(run.ctx.context_id)
            values: dict[Any, Any] = {VmReplicationContext.current_status: ContextStatus.READY_FOR_FAILOVER,
                                      VmReplicationContext.last_status_change: utcnow()}
            if ctx.current_job_id and not ReplicationJob.select().where(
                    ReplicationJob.id == ctx.current_job_id,
                    ReplicationJob.status.in_(list(REPLICATION_ACTIVE_STATUSES))).exists():
                values[VmReplicationContext.current_job] = None
            VmReplicationContext.update(values).where(VmReplicationContext.context_id == ctx.context_id).execute()
        step.details.update(failover_jobs_failed=failed_records, jobs_ended=ended_jobs, context_status="ready_for_failover")


# --- small database helpers --------------------------------------------------------------------------------

def _set_context_status(context_id: str, status: ContextStatus) -> ContextStatus:
    """Move a context in a failover state (or ready) to ``status``; replication states are left alone."""
    allowed = [ContextStatus.FAILED_OVER_TEST, ContextStatus.FAILED_OVER_LIVE, ContextStatus.CLEANUP_REQUIRED,
               ContextStatus.READY_FOR_FAILOVER]
    VmReplicationContext.update(current_status=status, last_status_change=utcnow()).where(
        VmReplicationContext.context_id == context_id, VmReplicationContext.current_status.in_(allowed),
        VmReplicationContext.current_status != status).execute()
    ctx = VmReplicationContext.get_or_none(VmReplicationContext.context_id == context_id)
    return ctx.current_status if ctx else status


def _unlock(context_id: str, oma_vm_id: str) -> int:
    return DeviceMapping.update(operation_mode=DeviceOperationMode.OMA).where(
        DeviceMapping.vm_context == context_id, DeviceMapping.vm_id == oma_vm_id,
        DeviceMapping.operation_mode == DeviceOperationMode.FAILOVER).execute()


def _tracked_volumes(context_id: str) -> list[OsseaVolume]:
    return [v for v in context_volumes(context_id)
            if _tracked_snapshot(v) or v.snapshot_status not in (SnapshotStatus.NONE, None)]


def _force_full_resync(volume: OsseaVolume) -> None:
    """The replica can no longer be trusted block for block: forget the change id, the next copy is full."""
    VmDisk.update(disk_change_id=None).where(VmDisk.ossea_volume_id == volume.id).execute()
    log.warning("volume %s could not be reverted; its disk's change id is cleared (next sync is full)", volume.volume_id)


def _merge_job_metadata(job_id: str, values: dict[str, Any]) -> None:
    job = JobTracking.get_or_none(JobTracking.id == job_id)
    if job is not None:
        JobTracking.update(metadata={**(job.metadata or {}), **values}).where(JobTracking.id == job_id).execute()


_OPERATION_TYPES: dict[str, str] = {
    "unified-live-failover": "live_failover", "unified-test-failover": "test_failover",
    "test-failover-cleanup": "test_failover_cleanup", "enhanced-live-failover-rollback": "rollback",
    "enhanced-test-failover-rollback": "rollback", "failed-execution-cleanup": "failed_execution_cleanup",
}


def _write_summary(job_id: str, context_id: str) -> None:
    """§2.3.15: the outcome of the job, for the GUI, in vm_replication_contexts.last_operation_summary."""
    job = JobTracking.get_by_id(job_id)
    steps = joblog.steps_of([job_id])[job_id]
    prog = joblog.progress(job, steps)
    summary: dict[str, Any] = {
        "job_id": job.id, "external_job_id": job.external_job_id or "",
        "operation_type": _OPERATION_TYPES.get(job.operation, job.operation), "status": str(job.status),
        "progress": prog["step_completion_percentage"], "timestamp": utcnow().isoformat(),
        "steps_completed": prog["completed_steps"] + prog["skipped_steps"], "steps_total": prog["total_steps"],
        "duration_seconds": prog["runtime_seconds"],
    }
    if job.status == JobTrackingStatus.FAILED:
        failed = next((s for s in steps if s.status == StepStatus.FAILED), None)
        summary.update(failed_step=friendly_step_name(failed.name) if failed else "",
                       failed_step_internal=failed.name if failed else "")
        sanitised = classify_error(job.error_message or "")
        summary.update(error_message=sanitised.pop("user_message"), **sanitised)
    VmReplicationContext.update(last_operation_summary=summary).where(
        VmReplicationContext.context_id == context_id).execute()

