"""One replication, step by step (the worker behind CreateReplication).

    prepare-disks      refresh the VM's disks from vCenter (through the VMA)      → status provisioning
    provision-volumes  reuse or create a CloudStack replica volume per disk
    attach-volumes     attach them to the OMA VM and find each device by the volume id
    start-exports      serve each device over NBD (nbd_exports)
    start-transfer     hand the disks, NBD targets and usable change ids to the VMA → status replicating
    transfer           follow the VMA's progress stream: persist progress and each disk's checkpoint, store
                       each disk's new change id; resume the job from its checkpoints when the VMA lost it
    finalize           check every disk of the job has its change id                → completed

Each step is a job_steps row of the job's JobLog job, so a failure names its step. Every way out —
success, a failed step, the VMA reporting failure, a stalled or lost job, a cancel — ends in
:func:`job_lifecycle.finish`, which releases the VM in the same transaction.

The engine runs workflows on its :class:`~oma_server.workflows.runner.WorkflowRunner`, leased on the
replication_jobs row. On start it recovers: jobs whose setup was cut by a restart fail
("interrupted"), jobs that were replicating resume following the VMA's stream; every half lease it
takes over the jobs of a process that died.

When the VMA loses a job (the agent was killed or restarted, the stream ended early, the copy failed
with its snapshot kept), the follower resumes it: the same job id, the same snapshot and change-id
base, each disk from its last stored checkpoint (docs/design/resume.md has the contract).
"""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from peewee import Case
from vma.v1 import progress_pb2, replication_pb2, vcenter_pb2

from oma_server import errors, logs, metrics
from oma_server.config import Settings
from oma_server.db.database import database_proxy as db
from oma_server.db.models import (
    REPLICATION_ACTIVE_STATUSES,
    DiskSyncStatus,
    JobStatus,
    NbdExport,
    OsseaConfig,
    ReplicationJob,
    VmaErrorClassification,
    VmDisk,
    VmReplicationContext,
    utcnow,
)
from oma_server.domain import (
    cloudstack_config,
    contexts,
    credentials,
    discovery,
    joblog,
    nbd_access,
    replications,
    volumes,
)
from oma_server.domain.crypto import SecretBox
from oma_server.domain.job_lifecycle import finish, tracking_job_id
from oma_server.domain.text_rules import quote
from oma_server.integrations import vma_client
from oma_server.integrations.nbd_exports import ExportManager
from oma_server.workflows.lease import Lease
from oma_server.workflows.runner import WorkflowRunner
from oma_server.workflows.steps import JobLogRecorder, Step, Stopping, run_steps

log = logging.getLogger("oma_server.replication")

_DISK_STATUS = {
    progress_pb2.DISK_STATUS_QUEUED: DiskSyncStatus.PENDING,
    progress_pb2.DISK_STATUS_STREAMING: DiskSyncStatus.SYNCING,
    progress_pb2.DISK_STATUS_COMPLETED: DiskSyncStatus.SYNCING,  # completed only once its change id is stored
    progress_pb2.DISK_STATUS_FAILED: DiskSyncStatus.FAILED,
}
_MIB = 1024 * 1024


class Cancelled(Exception):
    """The operator cancelled the job."""


class _VmaCancelled(Cancelled):
    """The VMA reported the job cancelled (the operator's cancel, or the agent stopping)."""


class EndedElsewhere(Exception):
    """The job reached a terminal status outside this workflow (UpdateReplication, a cancel)."""


@dataclass
class ReplicationDeps:
    """What a replication needs: settings, the secret box, the VMA client and the NBD exports."""

    settings: Settings
    secrets: SecretBox
    vma: vma_client.VmaClient
    exports: ExportManager


@dataclass
class _Control:
    """How the engine talks to a running workflow: cancel it, or tell it the OMA is stopping."""

    requested: threading.Event = field(default_factory=threading.Event)
    reason: str = ""
    stopping: bool = False
    # The VMA progress stream being followed, so stopping can end it at once.
    watch: Any = None


@dataclass
class Target:
    disk: VmDisk
    volume: Any = None
    mapping: Any = None
    export: Any = None
    previous_change_id: str = ""


@dataclass
class JobState:
    job_id: str
    tracking_id: str
    job: ReplicationJob
    ctx: VmReplicationContext
    config: OsseaConfig
    login: credentials.VCenterLogin
    targets: list[Target] = field(default_factory=list)
    stored_change_ids: set[str] = field(default_factory=set)


def replication_lease(instance: str, seconds: float) -> Lease:
    """Replications are leased on their replication_jobs row (docs/design/workflows.md)."""
    return Lease(ReplicationJob, ReplicationJob.worker, ReplicationJob.worker_heartbeat_at,
                 lambda: ReplicationJob.status.in_(REPLICATION_ACTIVE_STATUSES), instance, seconds)


class ReplicationEngine:
    def __init__(self, deps: ReplicationDeps):
        s = deps.settings
        self._deps, self._settings, self._box = deps, s, deps.secrets
        self._vma, self.exports = deps.vma, deps.exports
        self.runner = WorkflowRunner("replication", s.replication_workers,
                                     replication_lease(s.instance_name or socket.gethostname(),
                                                       s.worker_lease_seconds))
        self.hub = self.runner.hub
        self.instance = self.runner.instance
        self._lease = self.runner.lease

    # --- public ---------------------------------------------------------------------------------
    def submit(self, job_id: str, *, resume: bool = False) -> None:
        """Run a job's workflow here. A new job is leased to this process first (a resumed job was
        claimed by :meth:`_take_over`)."""
        if not resume:
            with db.connection_context():
                self._lease.take(job_id)
        control = _Control()
        self.runner.submit(job_id, lambda: self._run(job_id, resume, control), control)

    def cancel(self, job_id: str, reason: str) -> None:
        """Ask a running workflow to stop; the VMA stops copying; the job ends cancelled."""
        job = replications.get(job_id)
        if job.status not in REPLICATION_ACTIVE_STATUSES:
            raise errors.FailedPrecondition(f"job {job_id} already ended ({job.status})")
        control = self.runner.control(job_id)
        if control is None:  # no workflow in this process drives it: stop the copy and end it here
            if job.status == JobStatus.REPLICATING:
                with contextlib.suppress(errors.DomainError):
                    self._vma.cancel_replication(job_id, reason)
            finish(job_id, JobStatus.CANCELLED, reason or "cancelled by the operator")
            return
        control.reason = reason or "cancelled by the operator"
        control.requested.set()
        if job.status == JobStatus.REPLICATING:
            try:
                self._vma.cancel_replication(job_id, reason)
            except errors.DomainError as exc:
                log.warning("VMA could not cancel %s: %s", job_id, exc.message)

    def start(self) -> None:
        """Take over the active jobs this process owned before a restart or nobody owns (setups cut
        short fail "interrupted", copies are followed again), then keep the leases and, every half
        lease, take over jobs whose process died."""
        self._take_over(startup=True)
        self.runner.every(self._lease.seconds / 2, self._take_over)
        self.runner.start()

    def _take_over(self, startup: bool = False) -> None:
        with db.connection_context():
            candidates = [job for job in self._lease.orphans(startup=startup) if not self.runner.is_running(job.id)]
        for job in candidates:
            with db.connection_context():
                # The conditional update is the claim: of several processes only one gets the row.
                if not self._lease.claim(job.id, startup=startup):
                    continue
                if job.status != JobStatus.REPLICATING:
                    finish(job.id, JobStatus.FAILED,
                           "interrupted: the OMA process running its setup stopped; start it again")
                    continue
            log.info("following replication job %s again (worker %s)", job.id, self.instance)
            self.submit(job.id, resume=True)

    def stop(self) -> None:
        """Stop following (jobs keep running on the VMA) and hand the leases back, so another
        process, or this one after a restart, takes the jobs over at once."""
        for control in self.runner.running().values():
            control.stopping = True
            control.requested.set()
            if control.watch is not None:
                control.watch.cancel()
        self.runner.stop()
        # Exports go before the leases: whoever takes the jobs over serves them on the same ports.
        self.exports.stop()
        with db.connection_context():
            self._lease.release_all()

    # --- the workflow ---------------------------------------------------------------------------
    def _steps(self, resume: bool) -> list[Step]:
        setup = [
            Step("prepare-disks", self._prepare_disks),
            Step("provision-volumes", self._provision_volumes),
            Step("attach-volumes", self._attach_volumes),
            Step("start-exports", self._start_exports),
            Step("start-transfer", self._start_transfer),
        ]
        follow = [Step("transfer", self._transfer), Step("finalize", self._finalize)]
        if resume:
            return [Step("restore-exports", self._restore_exports), *follow]
        return setup + follow

    def _run(self, job_id: str, resume: bool, control: _Control) -> None:
        try:
            with db.connection_context():
                state = self._load(job_id)
            with logs.bind(job_id=job_id, context_id=state.ctx.context_id, external_job_id=job_id):
                run_steps(self._steps(resume), state, JobLogRecorder(state.tracking_id),
                          stop_reason=lambda: (control.reason or "the OMA is stopping")
                          if control.requested.is_set() else None)
            with db.connection_context():
                finish(job_id, JobStatus.COMPLETED)
        except (Stopping, joblog.StepFailed) as exc:
            cause = exc.cause if isinstance(exc, joblog.StepFailed) else Cancelled(str(exc))
            if isinstance(cause, EndedElsewhere):
                log.info("job %s ended outside its workflow; the workflow stops", job_id)
            elif control.stopping and not isinstance(cause, _VmaReportedFailure):
                log.info("job %s left running: the OMA is stopping", job_id)
            elif isinstance(cause, Cancelled):
                with db.connection_context():
                    finish(job_id, JobStatus.CANCELLED, str(cause) or "cancelled by the operator")
            else:
                with db.connection_context():
                    finish(job_id, JobStatus.FAILED, exc.message if isinstance(exc, joblog.StepFailed) else str(exc),
                           classification=getattr(cause, "classification", None),
                           details=getattr(cause, "details", None))
        except errors.DomainError as exc:  # the workflow could not even start (e.g. credentials unusable)
            with db.connection_context():
                finish(job_id, JobStatus.FAILED, exc.message)
        except Exception as exc:  # noqa: BLE001 - a bug must still end the job and release the VM
            log.exception("replication job %s crashed", job_id)
            with db.connection_context():
                finish(job_id, JobStatus.FAILED, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(KeyError):
                metrics.REPLICATION_RATE.remove(job_id)

    def _load(self, job_id: str) -> JobState:
        job = replications.get(job_id)
        ctx = contexts.get(job.vm_context_id)
        config = cloudstack_config.get(job.ossea_config_id) if job.ossea_config_id else cloudstack_config.require_active()
        credential_id = ctx.credential_id or credentials.get_default().id
        login = credentials.login_for(self._box, credential_id)
        tracking = tracking_job_id(job_id) or joblog.start_job(
            "migration", "replication", context_id=ctx.context_id, external_job_id=job_id, category="replication")
        return JobState(job_id, tracking, job, ctx, config, login)

    def _set(self, state: JobState, **values: Any) -> None:
        """Write the job's progress — only while it is active, so a status never regresses."""
        updated = ReplicationJob.update(values).where(
            ReplicationJob.id == state.job_id, ReplicationJob.status.in_(REPLICATION_ACTIVE_STATUSES)).execute()
        self.hub.notify(state.job_id)
        if not updated:
            raise EndedElsewhere(state.job_id)

    def _cs(self, state: JobState):
        s = self._settings
        return cloudstack_config.client(state.config, self._box, poll_interval=s.cloudstack_poll_interval_seconds,
                                        job_timeout=s.cloudstack_job_timeout_seconds)

    # step 1
    def _prepare_disks(self, state: JobState, step: joblog.StepHandle) -> None:
        self._set(state, status=JobStatus.PROVISIONING, current_operation="Preparing disks",
                  setup_progress_percent=10)
        inventory = discovery.fetch_inventory(self._vma, state.login, names=(state.ctx.vm_name,))
        vm = next((v for v in inventory.vms if v.id == state.ctx.vmware_vm_id), None) or next(
            (v for v in inventory.vms if v.name == state.ctx.vm_name), None)
        if vm is None:
            raise errors.NotFound(f"VM {quote(state.ctx.vm_name)} is no longer in vCenter {state.ctx.vcenter_host}")
        if not vm.disks:
            raise errors.FailedPrecondition(f"VM {quote(vm.name)} has no disks to replicate")
        rows = discovery.disk_rows(state.ctx.context_id, vm)
        with db.atomic():
            for row in rows:
                row["job"] = state.job_id
                existing = VmDisk.get_or_none(VmDisk.vm_context == state.ctx.context_id, VmDisk.disk_id == row["disk_id"])
                if existing is None:
                    VmDisk.create(**row)
                else:
                    row.pop("vm_context")
                    # A checkpoint belongs to the job that took it: this job starts without one.
                    VmDisk.update(**row, sync_status=DiskSyncStatus.PENDING, checkpoint_offset=None).where(VmDisk.id == existing.id).execute()
            VmReplicationContext.update(
                cpu_count=vm.num_cpu, memory_mb=vm.memory_mb, power_state=vm.power_state, vm_path=vm.path,
                os_type=vm.guest_os or "unknown", vm_tools_version=vm.tools_version, vm_name=vm.name,
            ).where(VmReplicationContext.context_id == state.ctx.context_id).execute()
        # CBT switched off since the last copy makes every stored change id meaningless: forget them,
        # so this copy is full and the next one can be incremental again.
        cbt = self._vma.cbt_status(state.login, state.ctx.vmware_vm_id)
        step.details["cbt_enabled"] = cbt.enabled
        if not cbt.enabled:
            cleared = VmDisk.update(disk_change_id=None).where(
                VmDisk.vm_context == state.ctx.context_id, VmDisk.disk_change_id.is_null(False)).execute()
            if cleared:
                log.info("CBT is off on %s: %d stored change ids cleared; this copy is full", vm.name, cleared)
                self._set(state, replication_type="initial")
                step.details["change_ids_cleared"] = cleared
        current = {row["disk_id"] for row in rows}
        state.targets = [Target(d) for d in contexts.disks(state.ctx.context_id) if d.disk_id in current]
        total = sum(t.disk.capacity_bytes or 0 for t in state.targets)
        self._set(state, total_bytes=total, setup_progress_percent=20)
        step.details.update(disks=[t.disk.disk_id for t in state.targets], capacity_bytes=total)

    # step 2
    def _provision_volumes(self, state: JobState, step: joblog.StepHandle) -> None:
        self._set(state, current_operation="Provisioning replica volumes")
        cs = self._cs(state)
        for target in state.targets:
            had_change_id = bool(target.disk.disk_change_id)
            result = volumes.provision(cs, state.config, state.ctx, target.disk, self._settings.replica_extra_gib)
            target.volume = result.volume
            if result.created and had_change_id:
                log.info("disk %s has a new replica volume %s: its stored change id no longer applies, "
                         "this copy of the disk is full", target.disk.disk_id, result.volume.volume_id)
            target.disk = VmDisk.get_by_id(target.disk.id)
            step.details[target.disk.disk_id] = {"volume_id": result.volume.volume_id, "created": result.created,
                                                 "resized": result.resized}
        self._set(state, setup_progress_percent=60)

    # step 3
    def _attach_volumes(self, state: JobState, step: joblog.StepHandle) -> None:
        self._set(state, current_operation="Attaching replica volumes")
        cs = self._cs(state)
        for target in state.targets:
            target.mapping = volumes.attach(cs, state.config, target.volume, device_dir=self._settings.device_dir,
                                            wait_seconds=self._settings.device_wait_seconds)
            step.details[target.disk.disk_id] = target.mapping.device_path
        self._set(state, setup_progress_percent=70)

    # step 4
    def _start_exports(self, state: JobState, step: joblog.StepHandle) -> None:
        self._set(state, current_operation="Starting NBD exports")
        for target in state.targets:
            target.export = volumes.export(self.exports, target.mapping, target.disk, state.job_id)
            step.details[target.disk.disk_id] = target.export.uri
        nbd_access.job_started(state.job_id)
        first = state.targets[0].export
        self._set(state, nbd_export_name=first.name, nbd_port=first.port, target_device=state.targets[0].mapping.device_path,
                  setup_progress_percent=80)

    # step 5
    def _start_transfer(self, state: JobState, step: joblog.StepHandle) -> None:
        disks = []
        for target in state.targets:
            target.previous_change_id = replications.usable_change_id(target.disk)
            key = int(target.disk.disk_id.rsplit("-", 1)[-1])
            disks.append(replication_pb2.ReplicationDisk(
                disk_id=target.disk.disk_id, vmware_disk_key=key, target_nbd_uri=target.export.uri,
                previous_change_id=target.previous_change_id))
        request = replication_pb2.StartReplicationRequest(
            job_id=state.job_id, context_id=state.ctx.context_id, connection=vma_client.connection(state.login),
            vm=vcenter_pb2.VMReference(uuid=state.ctx.vmware_vm_id, path=state.ctx.vm_path), disks=disks,
            enable_cbt=True, target_tls=vma_client.target_tls(self.exports.tls_for(state.job_id)),
        )
        started = self._vma.start_replication(request)
        self._set(state, status=JobStatus.REPLICATING, started_at=utcnow(), progress_percent=0,
                  current_operation="Replicating", setup_progress_percent=100, snapshot_id=started.snapshot_name,
                  vma_snapshot_moref=started.snapshot_moref or None)
        step.details.update(snapshot=started.snapshot_name,
                            incremental_disks=[d.disk_id for d in disks if d.previous_change_id])

    # after a restart, before following again
    def _restore_exports(self, state: JobState, step: joblog.StepHandle) -> None:
        restored = volumes.restore_exports(self.exports, state.job_id)
        nbd_access.job_started(state.job_id)
        step.details["exports"] = [e.uri for e in restored]

    def _resume_request(self, state: JobState, interrupted: replication_pb2.InterruptedJob,
                        ) -> tuple[replication_pb2.StartReplicationRequest, float]:
        """The StartReplication that resumes ``state``'s job on the snapshot the VMA kept: every disk of
        the job on its NBD export (served again if this process does not serve it yet), the change-id base
        the interrupted run used, and per disk the later of the two checkpoints — the OMA's (stored with
        the progress) and the agent's journal's (it may be one checkpoint ahead); both are true. A disk
        whose change id is stored is sent with its capacity as offset: nothing is copied again. Also
        returns the percentage the resumed run starts at."""
        journal = {d.disk_id: d for d in interrupted.disks}
        exports = {e.name: e for e in volumes.restore_exports(self.exports, state.job_id)}
        disks, done, total = [], 0, 0
        for row in NbdExport.select(NbdExport, VmDisk).join(VmDisk).where(NbdExport.job == state.job_id):
            disk, entry = row.vm_disk, journal.get(row.vm_disk.disk_id)
            capacity = disk.capacity_bytes or 0
            stored = disk.checkpoint_offset if disk.job_id == state.job_id else None
            offset = max(stored or 0, entry.checkpoint_offset if entry else 0)
            if disk.sync_status == DiskSyncStatus.COMPLETED and disk.disk_change_id:
                offset = capacity
            disks.append(replication_pb2.ReplicationDisk(
                disk_id=disk.disk_id, vmware_disk_key=int(disk.disk_id.rsplit("-", 1)[-1]),
                target_nbd_uri=exports[row.export_name].uri,
                previous_change_id=entry.previous_change_id if entry else "", resume_offset=min(offset, capacity)))
            done, total = done + min(offset, capacity), total + capacity
        if not disks:
            raise errors.FailedPrecondition(f"job {state.job_id} has no NBD export left to resume into")
        request = replication_pb2.StartReplicationRequest(
            job_id=state.job_id, context_id=state.ctx.context_id, connection=vma_client.connection(state.login),
            vm=vcenter_pb2.VMReference(uuid=state.ctx.vmware_vm_id, path=state.ctx.vm_path), disks=disks,
            enable_cbt=True, target_tls=vma_client.target_tls(self.exports.tls_for(state.job_id)),
            resume_snapshot=replication_pb2.ResumeSnapshot(
                moref=interrupted.snapshot_moref or state.job.vma_snapshot_moref or "",
                name=interrupted.snapshot_name or f"srep-{state.job_id}"),
        )
        return request, (100.0 * done / total if total else 0.0)

    # step 6
    def _transfer(self, state: JobState, step: joblog.StepHandle) -> None:
        follower = _Follower(self, state)
        follower.run()
        step.details.update(bytes_transferred=follower.bytes_transferred, sync_type=follower.sync_type)

    # step 7
    def _finalize(self, state: JobState, step: joblog.StepHandle) -> None:
        missing = [d.disk_id for d in VmDisk.select().where(VmDisk.job == state.job_id)
                   if d.sync_status != DiskSyncStatus.COMPLETED or not d.disk_change_id]
        if missing:
            # A disk copied without a change id cannot be followed by an incremental sync: the job must
            # not pass for complete (the usual cause: change tracking is off for that disk alone).
            VmDisk.update(sync_status=DiskSyncStatus.FAILED).where(
                VmDisk.job == state.job_id, VmDisk.disk_id.in_(missing)).execute()
            raise errors.FailedPrecondition(
                f"no change id for {', '.join(missing)}: vCenter reported none for the snapshot of "
                f"{'that disk' if len(missing) == 1 else 'those disks'} (is change tracking off for it, "
                f"e.g. scsiX:Y.ctkEnabled = false?); turn change tracking on and replicate again")
        step.details["disks"] = len(state.targets) or VmDisk.select().where(VmDisk.job == state.job_id).count()


class _VmaReportedFailure(errors.DomainError):
    code = "FAILED_PRECONDITION"

    def __init__(self, message: str, classification: str, details: str = ""):
        super().__init__(message)
        self.classification, self.details = classification, details


class _Follower:
    """Follows the VMA's progress stream for one job and persists what it says."""

    def __init__(self, engine: ReplicationEngine, state: JobState):
        self.engine, self.state = engine, state
        self.settings = engine._settings
        self.bytes_transferred = 0
        self.sync_type = ""
        self._last_write = 0.0
        self._last_update = time.monotonic()
        self._disk_status: dict[str, int] = {}
        self.resumes = 0
        self._resume_summary_seen = ""
        self._exports_checked = time.monotonic()

    def run(self) -> None:
        backoff = 0.5
        not_found_since: float | None = None
        control = self.engine.runner.control(self.state.job_id)
        while True:
            lost, failure = "", None
            try:
                watch = self.engine._vma.watch_progress(self.state.job_id)
                if control is not None:
                    control.watch = watch
                    if control.stopping:
                        watch.cancel()
                for progress in watch:
                    backoff, not_found_since = 0.5, None
                    if self._apply(progress):
                        return
                    self._keep_exports_served()
                if control is not None and control.stopping:
                    raise Cancelled("the OMA is stopping")
                # The stream ended without a terminal record (the agent restarted or evicted it).
                lost = "the VMA ended the progress stream early"
            except errors.NotFound:
                lost = "the VMA no longer knows this job"
            except (_VmaReportedFailure, _VmaCancelled) as exc:
                # A copy that failed (or was stopped with the agent) but whose snapshot the agent kept is
                # resumed; an operator's cancel, or a failure for good (snapshot removed), ends the job.
                if control is not None and control.requested.is_set():
                    raise
                failure = exc
            except errors.Unavailable as exc:
                self._fail_if_stale(exc.message)
            if failure is not None:
                try:
                    if not self._resume(str(failure)):
                        raise failure
                    backoff, not_found_since = 0.5, None
                    continue
                except errors.Unavailable as exc:  # the agent went away while we asked it: wait, look again
                    self._fail_if_stale(exc.message)
            elif lost:
                try:
                    if self._resume(lost):
                        backoff, not_found_since = 0.5, None
                        continue
                    now = time.monotonic()
                    not_found_since = not_found_since or now
                    if now - not_found_since > self.settings.progress_not_found_grace_seconds:
                        raise _VmaReportedFailure(f"{lost} (lost) and has no checkpoint of it to resume from",
                                                  VmaErrorClassification.JOB_LOST)
                except errors.Unavailable as exc:  # the agent went away again while we asked it: wait
                    self._fail_if_stale(exc.message)
            if control is not None and control.stopping:
                raise Cancelled("the OMA is stopping")
            time.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    def _keep_exports_served(self) -> None:
        """Serve again, on its recorded port, an export of the job whose nbdkit died mid-copy (crashed,
        killed): the agent rewinds that disk to its last checkpoint and reconnects to the same URI. Looked
        at every ``export_watch_seconds`` while progress comes in (the agent keeps reporting while it
        retries)."""
        now = time.monotonic()
        if now - self._exports_checked < self.settings.export_watch_seconds:
            return
        self._exports_checked = now
        with db.connection_context():
            names = [e.export_name for e in NbdExport.select(NbdExport.export_name)
                     .where(NbdExport.job == self.state.job_id)]
            dead = [n for n in names if not self.engine.exports.alive(n)]
            if dead:
                log.warning("NBD export %s of job %s stopped; serving it again", ", ".join(dead), self.state.job_id)
                volumes.restore_exports(self.engine.exports, self.state.job_id)

    def _fail_if_stale(self, message: str) -> None:
        """An unreachable VMA makes the job wait (and resume when the agent is back), up to a limit."""
        if time.monotonic() - self._last_update > self.settings.progress_stale_after_seconds:
            raise _VmaReportedFailure(
                f"no progress from the VMA for {self.settings.progress_stale_after_seconds:.0f} s: {message}",
                VmaErrorClassification.VMA_UNREACHABLE_TIMEOUT) from None

    def _resume(self, reason: str) -> bool:
        """Resume the job on the VMA from its checkpoints if the agent kept its snapshot; False when the
        agent has nothing of the job to resume (ListInterruptedJobs does not list it). Raises the failure
        that ends the job when the resumes are used up or the kept snapshot expired."""
        state, vma = self.state, self.engine._vma
        interrupted = next((j for j in vma.list_interrupted_jobs() if j.job_id == state.job_id), None)
        if interrupted is None:
            return False
        vm = vcenter_pb2.VMReference(uuid=state.ctx.vmware_vm_id, path=state.ctx.vm_path)
        if interrupted.expired:
            with contextlib.suppress(errors.DomainError):
                vma.cleanup_snapshots(state.login, vm, state.job_id)
            raise _VmaReportedFailure(f"{reason}; its snapshot on the VMA is too old to resume from (removed): "
                                      "replicate again", VmaErrorClassification.JOB_LOST)
        limit = self.settings.replication_max_resumes
        if self.resumes >= limit:
            with contextlib.suppress(errors.DomainError):
                vma.cleanup_snapshots(state.login, vm, state.job_id)
            raise _VmaReportedFailure(f"{reason}; resumed {self.resumes} times already (replication_max_resumes"
                                      f" = {limit}): replicate again", VmaErrorClassification.JOB_LOST)
        with db.connection_context():
            request, percent = self.engine._resume_request(state, interrupted)
        try:
            vma.start_replication(request)
        except errors.AlreadyExists:  # a resume sent before (its answer lost) already runs: follow it
            pass
        self.resumes += 1
        self._last_update = time.monotonic()
        offsets = ", ".join(f"{d.disk_id} at {d.resume_offset // _MIB} MiB" for d in request.disks)
        log.info("job %s resumed at %.0f %% after: %s (resume %d of at most %d; snapshot %s; %s)", state.job_id,
                 percent, reason, self.resumes, limit, request.resume_snapshot.name, offsets)
        with db.connection_context():
            self.engine._set(state, current_operation=f"Resuming at {percent:.0f} % ({reason})")
        return True

    def _apply(self, p: progress_pb2.JobProgress) -> bool:
        """Persist one update; True once the job is terminal on the VMA."""
        self._last_update = time.monotonic()
        terminal = p.status in (progress_pb2.JOB_STATUS_SUCCEEDED, progress_pb2.JOB_STATUS_FAILED,
                                progress_pb2.JOB_STATUS_CANCELLED)
        disks_changed = any(self._disk_status.get(d.disk_id) != d.status for d in p.disks)
        now = time.monotonic()
        if not (terminal or disks_changed or now - self._last_write >= 0.5):
            return False
        self._last_write = now
        delta = max(0, p.bytes_transferred - self.bytes_transferred)
        self.bytes_transferred = max(self.bytes_transferred, p.bytes_transferred)
        self.sync_type = p.sync_type or self.sync_type
        metrics.REPLICATION_BYTES.inc(delta)
        metrics.REPLICATION_RATE.labels(job_id=self.state.job_id).set(p.throughput.current_mbps * _MIB)
        with db.connection_context():
            self._persist(p)
        self.engine.hub.notify(self.state.job_id)
        if p.status == progress_pb2.JOB_STATUS_SUCCEEDED:
            return True
        if p.status == progress_pb2.JOB_STATUS_CANCELLED:
            raise _VmaCancelled(p.last_error or "cancelled on the VMA")
        if p.status == progress_pb2.JOB_STATUS_FAILED:
            raise _VmaReportedFailure(p.last_error or "the VMA reported the job failed",
                                      VmaErrorClassification.VMA_REPORTED_FAILURE, "; ".join(p.errors))
        return False

    def _persist(self, p: progress_pb2.JobProgress) -> None:
        with db.atomic():
            values: dict[Any, Any] = {
                ReplicationJob.progress_percent: round(p.percentage, 2),
                ReplicationJob.bytes_transferred: p.bytes_transferred,
                ReplicationJob.transfer_speed_bps: int(p.throughput.current_mbps * _MIB),
                ReplicationJob.vma_sync_type: p.sync_type or None,
                ReplicationJob.vma_current_phase: progress_pb2.Stage.Name(p.stage).removeprefix("STAGE_").lower(),
                ReplicationJob.vma_throughput_mbps: round(p.throughput.current_mbps, 2),
                ReplicationJob.vma_eta_seconds: p.eta_seconds,
                ReplicationJob.vma_last_poll_at: utcnow(),
                ReplicationJob.current_operation: (f"{p.current_operation} ({p.resume_summary})"
                                                   if p.resume_summary else p.current_operation),
            }
            if p.snapshot_moref:  # a resume needs the snapshot the VMA reads (it may take a new one)
                values[ReplicationJob.vma_snapshot_moref] = p.snapshot_moref
                values[ReplicationJob.snapshot_id] = p.snapshot_name or f"srep-{self.state.job_id}"
            if p.total_bytes:
                values[ReplicationJob.total_bytes] = p.total_bytes
            if p.last_error:
                values[ReplicationJob.vma_error_details] = p.last_error
            ReplicationJob.update(values).where(
                ReplicationJob.id == self.state.job_id, ReplicationJob.status == JobStatus.REPLICATING).execute()
            for d in p.disks:
                self._disk_status[d.disk_id] = d.status
                disk_values: dict[Any, Any] = {
                    VmDisk.sync_status: _DISK_STATUS.get(d.status, DiskSyncStatus.SYNCING),
                    VmDisk.sync_progress_percent: round(d.percent, 2), VmDisk.bytes_synced: d.bytes_transferred}
                if d.checkpoint_offset:  # monotonic: a late or repeated update never moves it back
                    disk_values[VmDisk.checkpoint_offset] = Case(None, [(
                        VmDisk.checkpoint_offset.is_null() | (VmDisk.checkpoint_offset < d.checkpoint_offset),
                        d.checkpoint_offset)], VmDisk.checkpoint_offset)
                VmDisk.update(disk_values).where(VmDisk.vm_context == self.state.ctx.context_id, VmDisk.disk_id == d.disk_id,
                        VmDisk.sync_status != DiskSyncStatus.COMPLETED).execute()
                if d.status == progress_pb2.DISK_STATUS_COMPLETED and d.change_id \
                        and d.disk_id not in self.state.stored_change_ids:
                    duration = 0
                    if d.HasField("started_at") and d.HasField("completed_at"):
                        duration = int(d.completed_at.ToSeconds() - d.started_at.ToSeconds())
                    replications.store_change_id(
                        self.state.job_id, d.disk_id, d.change_id, previous=d.previous_change_id,
                        sync_type=d.sync_type or "full", bytes_transferred=d.bytes_transferred,
                        duration_seconds=duration)
                    self.state.stored_change_ids.add(d.disk_id)
                    log.info("disk %s copied (%s, %d bytes); change id stored", d.disk_id, d.sync_type,
                             d.bytes_transferred)
                    if d.full_copy_reason:  # lands in the job's log_events (this thread is bound to the job)
                        log.info("disk %s was copied in full: %s", d.disk_id, d.full_copy_reason)
            if p.resume_summary and p.resume_summary != self._resume_summary_seen:
                self._resume_summary_seen = p.resume_summary  # once per resume, into the job's log
                log.info("job %s: the VMA %s", self.state.job_id, p.resume_summary)
                for d in p.disks:
                    if d.full_copy_reason and d.resumed_from_offset == 0:
                        log.info("disk %s starts again from 0: %s", d.disk_id, d.full_copy_reason)
            joblog.set_percent(self.state.tracking_id, p.percentage)
            if p.sync_type == "incremental":
                ReplicationJob.update(replication_type="incremental").where(
                    ReplicationJob.id == self.state.job_id).execute()
