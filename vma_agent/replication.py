"""The data mover: one replication job on the agent, from snapshot to new change ids.

    enable CBT   (if asked and off: reconfigure, then a create+remove snapshot so it takes effect)
    snapshot     srep-<job_id> (quiesced if asked); stale srep-* of the same VM no running job owns go first
    transfer     per disk, several disks in parallel: ask CBT what to copy —
                   incremental: the areas changed since the stored change id;
                   full (no/foreign/refused change id): the allocated areas, everything else zeroed —
                 read them from the snapshot's disk over NBD (nbdkit vddk, or file in the lab) and write
                 them to the OMA's NBD export; flush; then report the disk COMPLETED with its new change id
    finalize     remove the snapshot — unless the run can be resumed (the agent is stopping, or a
                 copy lost its connections for longer than copy_stall_seconds): then the snapshot
                 and the job's journal entry stay for a resumed run (docs/design/resume.md)

Resume: a StartReplication naming the snapshot an interrupted run of the same job left
(``resume_snapshot``) and per disk the last checkpoint (``resume_offset``) copies only what lies
at/after each checkpoint, planned against the same snapshot and change-id base, so the bytes and
the next incremental are exactly those of an uninterrupted run. If that snapshot is gone, a new one
is taken and each disk starts again from 0 (the reason is the disk's full_copy_reason).

The job is SUCCEEDED only when every disk is COMPLETED; any error ends it FAILED with the step and
reason, and a cancel ends it CANCELLED. A change id vCenter refuses (CBT reset, new target) falls
back to a full copy of that disk only, and the job's progress says why. No grpc or pyVmomi here:
vCenter is reached through :mod:`vma_agent.integrations.vsphere`, NBD through the copier.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, urlsplit, urlunsplit

from vma_agent import errors, metrics, validation
from vma_agent.config import Settings
from vma_agent.datamover import copier
from vma_agent.datamover.extents import MiB, bytes_below
from vma_agent.datamover.failures import is_permanent
from vma_agent.integrations import vsphere
from vma_agent.integrations.nbdkit import NbdkitError, NbdkitServer, file_plugin_args, vddk_plugin_args
from vma_agent.job_journal import JobJournal, JournalDisk, JournalEntry
from vma_agent.progress_store import DiskStatus, JobStatus, ProgressStore, ProgressUpdate, Stage

log = logging.getLogger("vma_agent.replication")

SNAPSHOT_PREFIX = "srep-"
# Start of the description of every snapshot the agent takes for a job: marks it as ours.
SNAPSHOT_MARKER = "oma-vma replication job"


@dataclass(frozen=True)
class DiskRequest:
    disk_id: str
    key: int
    target_uri: str
    previous_change_id: str = ""
    # resume: the planned bytes below this offset are already on the target (a checkpoint)
    resume_offset: int = 0


@dataclass(frozen=True)
class TargetTls:
    """TLS-PSK for a job's NBD targets, from the OMA: identity and raw key (kept out of repr)."""

    identity: str
    psk: bytes = field(repr=False)


def tls_target_uri(uri: str, tls: TargetTls, psk_file: str) -> str:
    """``nbd://host:port/export`` → ``nbds://<identity>@host:port/export?tls-psk-file=<file>`` (libnbd's
    URI form of TLS with a pre-shared key)."""
    parts = urlsplit(uri)
    return urlunsplit(("nbds", f"{quote(tls.identity, safe='')}@{parts.netloc}", parts.path,
                       f"tls-psk-file={quote(psk_file, safe='/')}", ""))


@dataclass(frozen=True)
class JobRequest:
    job_id: str
    context_id: str
    connection: vsphere.VCenterParams
    datacenter: str
    vm: vsphere.VMRef
    disks: tuple[DiskRequest, ...]
    quiesce: bool = False
    enable_cbt: bool = True
    target_tls: TargetTls | None = None
    # resume an interrupted run of this job from the snapshot it left
    resume_snapshot_moref: str = ""
    resume_snapshot_name: str = ""


@dataclass
class RunningJob:
    request: JobRequest
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""
    thread: threading.Thread | None = None
    vm_moref: str = ""
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    finished_at: datetime | None = None
    status: JobStatus = JobStatus.QUEUED
    last_error: str = ""
    psk_file: str = ""  # the targets' TLS key while the job runs (0600 in a private 0700 directory)
    # the run stopped in a way a resumed run can continue from: keep the snapshot and journal
    keep_snapshot: bool = False
    journal: JournalEntry | None = None
    resumed_bytes: dict[str, tuple[int, int]] = field(default_factory=dict)  # disk -> (resumed, total)


class JobCancelled(Exception):
    pass


AGENT_STOPPING = "the agent is stopping"


def _same_vm(a: JobRequest, b: JobRequest) -> bool:
    """Two requests name the same VM (same vCenter and any identifier in common)."""
    if a.connection.address() != b.connection.address():
        return False
    return any(x and x == y for x, y in ((a.vm.uuid, b.vm.uuid), (a.vm.moref, b.vm.moref), (a.vm.path, b.vm.path)))


def change_tracking_identity(change_id: str) -> str:
    """The CBT identity part of ``<identity>/<sequence>`` ('' when malformed)."""
    identity, sep, sequence = change_id.rpartition("/")
    return identity.strip() if sep and identity.strip() and sequence.isdigit() else ""


def _sha1_thumbprint(params: vsphere.VCenterParams) -> str:
    """VDDK pins the server by SHA-1 thumbprint: the configured one, else read from the server."""
    pinned = params.thumbprint.replace(":", "")
    if len(pinned) == 40:
        return params.thumbprint.upper()
    return vsphere.probe_certificate(*params.address()).sha1


class SourceDisks:
    """Serves a snapshot disk over NBD: nbdkit vddk in production, nbdkit file over datastore folders
    (``datastore_map``) in the lab."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._datastores = settings.datastores()

    def local_path(self, file_name: str) -> Path:
        """"[ds] dir/file.vmdk" → the file in the mapped datastore folder."""
        if not file_name.startswith("["):
            raise errors.FailedPrecondition(f"unexpected disk path {file_name!r}")
        datastore, _, rel = file_name[1:].partition("]")
        folder = self._datastores.get(datastore.strip())
        if folder is None:
            raise errors.FailedPrecondition(
                f"datastore {datastore!r} is not mapped to a folder (VMA_DATASTORE_MAP) for source_mode=file")
        return folder / rel.strip()

    @contextlib.contextmanager
    def serve(self, job: RunningJob, snapshot: vsphere.SnapshotInfo, disk: vsphere.Disk) -> Iterator[str]:
        rate = self._settings.source_rate_limit_mbps
        filters = ["rate"] if rate > 0 else []
        if self._settings.source_mode == "file":
            plugin = file_plugin_args(self.local_path(disk.file_name), readonly=True, filters=filters,
                                      filter_params={"rate": f"{int(rate * 1_000_000)}"} if rate > 0 else None)
        else:
            params = job.request.connection
            plugin = vddk_plugin_args(
                server=params.address()[0], user=params.username, password=params.password,
                thumbprint=_sha1_thumbprint(params), vm_moref=job.vm_moref,
                snapshot_moref=snapshot.moref, disk_file=disk.file_name, libdir=self._settings.vddk_libdir,
                port=params.address()[1], filters=filters)
            if rate > 0:
                plugin.filter_params.append(("rate", f"{int(rate * 1_000_000)}"))
        # A private short temp dir for the socket (unix socket paths are limited to 107 bytes).
        server = NbdkitServer(plugin, threads=16)
        try:
            server.start()
        except NbdkitError as exc:
            raise errors.FailedPrecondition(f"cannot serve the source disk {disk.file_name}: {exc}") from None
        stop = threading.Event()
        servers = [server]  # the first one owns the socket's folder: keep it until the end
        watchdog = threading.Thread(target=self._restart_when_dead, args=(servers, stop, disk.file_name),
                                    name=f"source-watch-{disk.key}", daemon=True)
        watchdog.start()
        try:
            yield server.uri
        finally:
            stop.set()
            watchdog.join()
            for s in reversed(servers):
                s.stop()

    @staticmethod
    def _restart_when_dead(servers: list[NbdkitServer], stop: threading.Event, file_name: str) -> None:
        """A source server that died (a vddk plugin crash, an OOM kill) is started again on the same
        socket, so the copy reconnects and goes on instead of waiting for its stall limit."""
        delay = 0.5
        while not stop.wait(0.25):
            current = servers[-1]
            if current.alive():
                delay = 0.5
                continue
            log.warning("the nbdkit serving %s exited (%s); starting it again", file_name,
                        current.stderr().strip()[-300:] or "no message")
            replacement = NbdkitServer(current.plugin, socket_path=servers[0].socket_path, threads=16)
            try:
                replacement.start()
                servers.append(replacement)
            except NbdkitError as exc:
                log.warning("cannot restart the nbdkit serving %s: %s; retrying in %.1fs", file_name, exc, delay)
                if stop.wait(delay):
                    return
                delay = min(delay * 2, 10.0)


class ReplicationJobs:
    """Runs and supervises the agent's replication jobs (one worker thread per job)."""

    def __init__(self, settings: Settings, progress: ProgressStore, sessions: vsphere.SessionCache,
                 sources: SourceDisks | None = None):
        self._settings, self._progress, self._sessions = settings, progress, sessions
        self._sources = sources or SourceDisks(settings)
        self._jobs: dict[str, RunningJob] = {}
        self._lock = threading.Lock()
        self.journal = JobJournal(settings.journal_dir())

    # --- public ---------------------------------------------------------------------------------
    def start(self, request: JobRequest) -> RunningJob:
        self._validate(request)
        with self._lock:
            existing = self._jobs.get(request.job_id)
            if existing is not None:
                if existing.request == request:
                    return existing  # a retried start of the same job
                running = existing.thread is not None and existing.thread.is_alive()
                if running or not request.resume_snapshot_moref:
                    raise errors.AlreadyExists(f"job {request.job_id} already exists on this agent")
                self._progress.discard(request.job_id)  # a resume of a run that ended here
            busy = [j for j in self._jobs.values() if j.thread and j.thread.is_alive()
                    and _same_vm(j.request, request)]
            if busy:
                raise errors.FailedPrecondition(
                    f"job {busy[0].request.job_id} is already replicating this VM; wait for it or cancel it")
            self._forget_finished_locked()
            # Refused (RESOURCE_EXHAUSTED) before the job exists when the progress store is full.
            self._progress.apply(ProgressUpdate(job_id=request.job_id, stage=Stage.DISCOVER,
                                                status=JobStatus.QUEUED, snapshot_name=SNAPSHOT_PREFIX + request.job_id))
            job = self._jobs[request.job_id] = RunningJob(request)
        for disk in request.disks:
            self._progress.apply(ProgressUpdate(job_id=request.job_id, disk_id=disk.disk_id,
                                                disk_status=DiskStatus.QUEUED))
        job.thread = threading.Thread(target=self._run, args=(job,), name=f"job-{request.job_id}", daemon=True)
        job.thread.start()
        return job

    def _forget_finished_locked(self) -> None:
        """Keep at most ``progress_max_jobs`` jobs: the ones that finished longest ago go first."""
        excess = len(self._jobs) - self._settings.progress_max_jobs + 1
        if excess <= 0:
            return
        finished = sorted((j for j in self._jobs.values() if j.thread is not None and not j.thread.is_alive()),
                          key=lambda j: j.finished_at or j.started_at)
        for job in finished[:excess]:
            del self._jobs[job.request.job_id]

    def runs(self, job_id: str) -> bool:
        """Whether a worker of this agent is running ``job_id`` now."""
        with self._lock:
            job = self._jobs.get(job_id)
        return job is not None and (job.thread is None or job.thread.is_alive())

    def get(self, job_id: str) -> RunningJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise errors.NotFound(f"job {job_id} is not known to this agent")
        return job

    def cancel(self, job_id: str, reason: str) -> bool:
        job = self.get(job_id)
        if job.thread is None or not job.thread.is_alive():
            return False
        job.cancel_reason = reason or "cancelled"
        job.cancel.set()
        return True

    def stop(self) -> None:
        for job in list(self._jobs.values()):
            job.cancel_reason = AGENT_STOPPING
            job.cancel.set()
        for job in list(self._jobs.values()):
            if job.thread:
                job.thread.join(timeout=30)

    def cleanup_snapshots(self, params: vsphere.VCenterParams, datacenter: str, vm_ref: vsphere.VMRef,
                          job_id: str = "", older_than_seconds: float = 0) -> list[str]:
        """Remove this system's snapshots of a VM that no running job owns (only those older than
        ``older_than_seconds`` when given); their jobs can no longer be resumed."""
        with self._sessions.session(params) as session:
            vm = session.find_vm(vm_ref, datacenter)
            return self._remove_stale_snapshots(session, vm, only=SNAPSHOT_PREFIX + job_id if job_id else "",
                                                older_than_seconds=older_than_seconds)

    def interrupted_jobs(self) -> list[tuple[JournalEntry, bool]]:
        """Journal entries of jobs not running here (left by a crash, a restart or a resumable
        failure), each with whether it is older than leftover_snapshot_max_age_seconds."""
        with self._lock:
            running = {j.request.job_id for j in self._jobs.values() if j.thread is not None and j.thread.is_alive()}
        max_age = self._settings.leftover_snapshot_max_age_seconds
        return [(e, e.age_seconds() > max_age) for e in self.journal.entries() if e.job_id not in running]

    # --- the job --------------------------------------------------------------------------------
    @staticmethod
    def _validate(request: JobRequest) -> None:
        # The job id names the vCenter snapshot (srep-<job_id>) and the worker thread; disk ids are log fields.
        validation.identifier("job_id", request.job_id)
        if not request.disks:
            raise errors.InvalidArgument("at least one disk is required")
        for disk in request.disks:
            if disk.disk_id:
                validation.identifier("disk_id", disk.disk_id)
            if disk.key <= 0 or not disk.disk_id:
                raise errors.InvalidArgument(f"disk {disk.disk_id!r} needs its VMware device key (vmware_disk_key)")
            if not disk.target_uri.startswith(("nbd://", "nbd+unix://", "nbds://")):
                raise errors.InvalidArgument(f"disk {disk.disk_id}: target_nbd_uri must be an NBD URI")
            if "tls-" in urlsplit(disk.target_uri).query:
                raise errors.InvalidArgument(f"disk {disk.disk_id}: target_nbd_uri must not name TLS files; "
                                             "send the key in target_tls")
            if request.target_tls is not None and not disk.target_uri.startswith("nbd://"):
                raise errors.InvalidArgument(f"disk {disk.disk_id}: with target_tls the target must be nbd://")
        tls = request.target_tls
        if tls is not None and (not tls.identity or any(c in tls.identity for c in ":@/\n") or len(tls.psk) < 16):
            raise errors.InvalidArgument("target_tls needs an identity without ':', '@', '/' or newlines and a key "
                                         "of at least 16 bytes")
        if len({d.key for d in request.disks}) != len(request.disks):
            raise errors.InvalidArgument("each disk may appear only once")
        for disk in request.disks:
            if disk.resume_offset < 0:
                raise errors.InvalidArgument(f"disk {disk.disk_id}: resume_offset cannot be negative")
            if disk.resume_offset and not request.resume_snapshot_moref:
                raise errors.InvalidArgument(
                    f"disk {disk.disk_id}: resume_offset needs resume_snapshot (the snapshot the checkpoint is of)")
        if request.resume_snapshot_name and request.resume_snapshot_name != SNAPSHOT_PREFIX + request.job_id:
            raise errors.InvalidArgument(
                f"resume_snapshot.name must be {SNAPSHOT_PREFIX + request.job_id} (this job's snapshot)")

    def _update(self, job: RunningJob, **values) -> None:
        self._progress.apply(ProgressUpdate(job_id=job.request.job_id, **values))

    def _run(self, job: RunningJob) -> None:
        request = job.request
        job.status = JobStatus.RUNNING
        self._update(job, status=JobStatus.RUNNING)
        psk_dir = None
        try:
            if request.target_tls is not None:
                psk_dir = tempfile.mkdtemp(prefix="vma-nbd-tls-")  # 0700
                job.psk_file = os.path.join(psk_dir, "target.psk")
                fd = os.open(job.psk_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(f"{request.target_tls.identity}:{request.target_tls.psk.hex()}\n")
            with self._sessions.session(request.connection) as session:
                # a copy may take hours: keep the login alive (and _run logs in again if it expired)
                session.start_keepalive(self._settings.vcenter_keepalive_seconds)
                self._replicate(session, job)
        except JobCancelled:
            job.status, job.last_error = JobStatus.CANCELLED, job.cancel_reason or "cancelled"
        except errors.AgentError as exc:
            job.status, job.last_error = JobStatus.FAILED, exc.message
        except Exception as exc:  # noqa: BLE001 - the job must end FAILED, never hang
            log.exception("replication job %s crashed", request.job_id)
            job.status, job.last_error = JobStatus.FAILED, f"{type(exc).__name__}: {exc}"
        else:
            job.status = JobStatus.SUCCEEDED
        finally:
            if psk_dir is not None:
                shutil.rmtree(psk_dir, ignore_errors=True)
            job.finished_at = datetime.now(timezone.utc)
            if not job.keep_snapshot:
                self.journal.remove(request.job_id)
            metrics.JOBS.labels(status=job.status.name.lower()).inc()
            with contextlib.suppress(KeyError):
                metrics.COPY_RATE.remove(request.job_id)
            self._update(job, status=job.status, error_message=job.last_error or None)
            log.info("job %s %s%s", request.job_id, job.status.name, f": {job.last_error}" if job.last_error else "")

    def _replicate(self, session: vsphere.Session, job: RunningJob) -> None:
        request = job.request
        vm = session.find_vm(request.vm, request.datacenter)
        with self._lock:
            other = next((j for j in self._jobs.values() if j is not job and j.vm_moref == vm.moref
                          and j.thread and j.thread.is_alive()), None)
            if other is not None:
                raise errors.FailedPrecondition(f"job {other.request.job_id} is already replicating this VM")
            job.vm_moref = vm.moref
        record = session.vm_record(vm, ("name", "config.changeTrackingEnabled", "snapshot"))
        self._update(job, vm_name=record.name or vm.name, vm_path=request.vm.path, cbt_enabled=record.cbt_enabled)
        if not record.cbt_enabled and request.enable_cbt:
            self._update(job, stage=Stage.ENABLE_CBT)
            self._enable_cbt(session, vm, job)
        self._check_cancel(job)
        self._update(job, stage=Stage.SNAPSHOT)
        snapshot, gone = self._resume_snapshot(session, vm, request)
        # Leftovers of crashed jobs (and of this one, unless resumed from) go first.
        self._remove_stale_snapshots(session, vm, own_job=request.job_id, keep_moref=snapshot.moref if snapshot else "")
        if snapshot is None:
            snapshot = session.create_snapshot(
                vm, SNAPSHOT_PREFIX + request.job_id,
                f"{SNAPSHOT_MARKER} {request.job_id} (kept for a resume until the job ends)", quiesce=request.quiesce)
        resumed = not gone and bool(request.resume_snapshot_moref)
        self._update(job, snapshot_moref=snapshot.moref)
        job.journal = JournalEntry(
            job_id=request.job_id, context_id=request.context_id, vcenter=request.connection.label,
            vm_moref=vm.moref, snapshot_moref=snapshot.moref, snapshot_name=snapshot.name,
            disks={d.disk_id: JournalDisk(d.disk_id, d.key, d.previous_change_id,
                                          d.resume_offset if resumed else 0) for d in request.disks})
        self.journal.save(job.journal)
        try:
            disks = {d.key: d for d in session.snapshot_disks(snapshot)}
            self._check_cancel(job)
            self._update(job, stage=Stage.TRANSFER)
            self._transfer(session, vm, snapshot, disks, job, resumed=resumed, gone=gone)
            self._update(job, stage=Stage.FINALIZE)
        except JobCancelled:
            # a stopping agent (appliance restart) leaves the job resumable; an operator's cancel does not
            job.keep_snapshot = job.cancel_reason == AGENT_STOPPING
            raise
        finally:
            self._finish_snapshot(session, job, snapshot)

    @staticmethod
    def _finish_snapshot(session: vsphere.Session, job: RunningJob, snapshot: vsphere.SnapshotInfo) -> None:
        job_id = job.request.job_id
        if job.keep_snapshot:
            log.warning("job %s: keeping snapshot %s (%s) for a resumed run", job_id, snapshot.name, snapshot.moref)
            return
        # Also on failure: a leftover snapshot grows on the datastore and blocks the next run.
        try:
            session.remove_snapshot(snapshot)
        except errors.AgentError as exc:
            log.warning("could not remove snapshot %s of job %s: %s", snapshot.name, job_id, exc.message)
            if sys.exc_info()[0] is None:
                raise errors.FailedPrecondition(f"snapshot {snapshot.name} could not be removed: {exc.message}") \
                    from None

    @staticmethod
    def _resume_snapshot(session: vsphere.Session, vm: vsphere.VMHandle,
                         request: JobRequest) -> tuple[vsphere.SnapshotInfo | None, str]:
        """(the snapshot an interrupted run of this job left, '') — or (None, why it cannot be used)."""
        if not request.resume_snapshot_moref:
            return None, ""
        name = SNAPSHOT_PREFIX + request.job_id
        found = next((s for s in session.list_snapshots(vm) if s.moref == request.resume_snapshot_moref), None)
        if found is None:
            reason = f"the snapshot {name} ({request.resume_snapshot_moref}) of the interrupted run is gone"
        elif found.name != name:
            reason = f"snapshot {request.resume_snapshot_moref} is {found.name!r}, not this job's {name}"
        else:
            log.info("job %s: resuming from snapshot %s (%s)", request.job_id, found.name, found.moref)
            return found, ""
        log.warning("job %s: %s; taking a new snapshot, every disk starts again from 0", request.job_id, reason)
        return None, reason

    @staticmethod
    def _check_cancel(job: RunningJob) -> None:
        if job.cancel.is_set():
            raise JobCancelled()

    def _enable_cbt(self, session: vsphere.Session, vm: vsphere.VMHandle, job: RunningJob) -> None:
        foreign = [s.name for s in session.list_snapshots(vm) if not s.name.startswith(SNAPSHOT_PREFIX)]
        if foreign:
            raise errors.FailedPrecondition(
                f"CBT is off and cannot be enabled reliably while the VM has snapshots ({', '.join(foreign)})")
        session.set_change_tracking(vm, True)
        activation = session.create_snapshot(vm, f"cbt-init-{int(time.time())}", "activates CBT on the disks")
        session.remove_snapshot(activation)
        self._update(job, cbt_enabled=True)

    def _remove_stale_snapshots(self, session: vsphere.Session, vm: vsphere.VMHandle, only: str = "",
                                older_than_seconds: float = 0, own_job: str = "", keep_moref: str = "") -> list[str]:
        """Remove srep-* snapshots of the VM that no other running job owns (except ``keep_moref``)."""
        with self._lock:
            owned = {SNAPSHOT_PREFIX + j.request.job_id for j in self._jobs.values()
                     if j.thread is not None and j.thread.is_alive() and j.request.job_id != own_job}
        removed = []
        now = datetime.now(timezone.utc)
        for snap in session.list_snapshots(vm):
            if not snap.name.startswith(SNAPSHOT_PREFIX) or snap.name in owned or (only and snap.name != only) \
                    or snap.moref == keep_moref:
                continue
            if older_than_seconds and snap.created is not None and \
                    (now - snap.created).total_seconds() <= older_than_seconds:
                continue
            session.remove_snapshot(snap)
            if snap.name != SNAPSHOT_PREFIX + own_job:
                self.journal.remove(snap.name.removeprefix(SNAPSHOT_PREFIX))
            removed.append(snap.name)
            log.info("removed stale snapshot %s of VM %s", snap.name, vm.name or vm.moref)
        return removed

    def _transfer(self, session: vsphere.Session, vm: vsphere.VMHandle, snapshot: vsphere.SnapshotInfo,
                  disks: dict[int, vsphere.Disk], job: RunningJob, *, resumed: bool = False, gone: str = "") -> None:
        missing = [d.disk_id for d in job.request.disks if d.key not in disks]
        if missing:
            raise errors.NotFound(f"the VM has no disk {', '.join(missing)} (device keys: {sorted(disks)})")
        failures: list[str] = []
        transient: list[bool] = []
        with ThreadPoolExecutor(max_workers=max(1, self._settings.parallel_disks),
                                thread_name_prefix=f"copy-{job.request.job_id}") as pool:
            futures = {pool.submit(self._copy_disk, session, vm, snapshot, disks[d.key], d, job,
                                   d.resume_offset if resumed else 0, gone): d
                       for d in job.request.disks}
            for future, disk in futures.items():
                try:
                    future.result()
                except JobCancelled:
                    raise
                except errors.AgentError as exc:
                    failures.append(f"{disk.disk_id}: {exc.message}")
                    job.cancel.set()  # stop the other disks: the job has failed anyway
                except copier.CopyCancelled:
                    if not failures:
                        raise JobCancelled() from None
                except copier.CopyError as exc:
                    failures.append(f"{disk.disk_id}: {exc}")
                    transient.append(not is_permanent(exc.errno))
                    job.cancel.set()
        if failures:
            job.cancel.clear()
            # Connections lost for longer than copy_stall_seconds: the next run can resume from the
            # checkpoints; a permanent error (full or read-only target, ...) cannot be resumed past.
            job.keep_snapshot = len(transient) == len(failures) and all(transient)
            raise errors.FailedPrecondition("; ".join(failures))
        self._check_cancel(job)

    def _plan(self, session: vsphere.Session, vm: vsphere.VMHandle, snapshot: vsphere.SnapshotInfo,
              disk: vsphere.Disk, request: DiskRequest) -> tuple[str, str, list, list]:
        """(sync_type, full-copy reason, data extents, zero extents) for one disk."""
        capacity = disk.capacity_bytes
        if not disk.change_id:
            return "full", "CBT is not active on this disk", [], []  # planned from block status later
        previous = request.previous_change_id
        reason = "no previous change id"
        if previous:
            if change_tracking_identity(previous) != change_tracking_identity(disk.change_id):
                reason = "CBT was reset since the previous change id (new CBT identity)"
            else:
                try:
                    changed = session.query_changed_areas(vm, snapshot, disk.key, previous, capacity)
                    data, zero = copier.plan_incremental_copy(
                        changed, capacity, merge_gap=self._settings.extent_merge_gap_bytes)
                    return "incremental", "", data, zero
                except vsphere.ChangeTrackingUnusable as exc:
                    reason = f"vCenter refused the previous change id ({exc.message})"
        try:
            allocated = session.query_changed_areas(vm, snapshot, disk.key, "*", capacity)
        except vsphere.ChangeTrackingUnusable as exc:
            return "full", f"{reason}; allocation unknown ({exc.message})", [], []
        data, zero = copier.plan_full_copy(allocated, capacity)
        return "full", reason, data, zero

    def _copy_disk(self, session: vsphere.Session, vm: vsphere.VMHandle, snapshot: vsphere.SnapshotInfo,
                   disk: vsphere.Disk, request: DiskRequest, job: RunningJob, start_offset: int = 0,
                   snapshot_gone: str = "") -> None:
        job_id = job.request.job_id
        sync_type, reason, data, zero = self._plan(session, vm, snapshot, disk, request)
        if snapshot_gone:
            reason = f"{snapshot_gone}: copying the disk again from the start" + (f" ({reason})" if reason else "")
        if reason:
            log.info("job %s: %s copy of %s: %s", job_id, sync_type, request.disk_id, reason)
        with self._sources.serve(job, snapshot, disk) as source_uri:
            if sync_type == "full" and not data and not zero:  # no CBT answer: ask the source what is allocated
                data, zero = copier.plan_full_copy_from_block_status(source_uri)
            data, zero = copier.normalize_extents(data), copier.normalize_extents(zero)
            total = copier.extents_total(data) + copier.extents_total(zero)
            resumed = bytes_below(data, start_offset) + bytes_below(zero, start_offset)
            resumed_pct = 100.0 * resumed / total if total else 100.0
            self._update(job, disk_id=request.disk_id, disk_status=DiskStatus.STREAMING, disk_label=disk.label,
                         sync_type=sync_type, full_copy_reason=reason, total_bytes=total or None,
                         capacity_bytes=disk.capacity_bytes, previous_change_id=request.previous_change_id,
                         bytes_transferred=resumed or None, checkpoint_offset=start_offset,
                         resumed_from_offset=start_offset, resumed_at_percent=resumed_pct if start_offset else 0.0)
            if job.request.resume_snapshot_moref and not snapshot_gone:
                self._note_resume(job, request.disk_id, resumed, total)
                log.info("job %s: %s resumed at offset %d (%.0f %%)", job_id, request.disk_id, start_offset,
                         resumed_pct)
            checkpoint = [start_offset]

            def on_progress(p: copier.CopyProgress) -> None:
                metrics.COPY_RATE.labels(job_id=job_id).set(p.throughput_bps)
                advanced = p.durable_offset > checkpoint[0]
                checkpoint[0] = max(checkpoint[0], p.durable_offset)
                if advanced and job.journal is not None:  # journal first: never report what it lacks
                    job.journal.disks[request.disk_id].checkpoint_offset = checkpoint[0]
                    self.journal.save(job.journal)
                self._update(job, disk_id=request.disk_id, bytes_transferred=p.bytes_done or None,
                             bytes_zeroed=p.bytes_zeroed or None, throughput_bps=p.throughput_bps,
                             checkpoint_offset=checkpoint[0] if advanced else None)

            settings = self._settings
            try:
                target_uri = request.target_uri if job.request.target_tls is None else tls_target_uri(
                    request.target_uri, job.request.target_tls, job.psk_file)
                result = copier.copy_disk(
                    source_uri, target_uri, data, zero, on_progress=on_progress, cancel_event=job.cancel,
                    connections=settings.connections_per_disk or None,
                    retry=copier.RetryPolicy(tries=settings.copy_retry_tries, initial_delay=0.5, max_delay=10.0),
                    progress_interval=settings.progress_interval_seconds, start_offset=start_offset,
                    checkpoint_bytes=settings.checkpoint_interval_mib * MiB,
                    checkpoint_seconds=settings.checkpoint_interval_seconds,
                    stall_seconds=settings.copy_stall_seconds)
            except copier.CopyError as exc:
                self._update(job, disk_id=request.disk_id, disk_status=DiskStatus.FAILED, error_message=str(exc))
                raise
        metrics.BYTES_COPIED.inc(result.bytes_copied)
        metrics.BYTES_ZEROED.inc(result.bytes_zeroed)
        # The new change id is reported only now, with the disk complete and flushed.
        self._update(job, disk_id=request.disk_id, disk_status=DiskStatus.COMPLETED, stage=Stage.PERSIST_CHANGE_IDS,
                     bytes_transferred=total or None, bytes_zeroed=result.bytes_zeroed or None,
                     throughput_bps=0.0, change_id=disk.change_id, checkpoint_offset=disk.capacity_bytes)
        if job.journal is not None:
            entry = job.journal.disks[request.disk_id]
            entry.completed, entry.change_id, entry.checkpoint_offset = True, disk.change_id, disk.capacity_bytes
            self.journal.save(job.journal)
        log.info("job %s: %s copied (%s: %d data + %d zero bytes written%s)", job_id, request.disk_id, sync_type,
                 result.bytes_copied, result.bytes_zeroed,
                 f", resumed at offset {start_offset}" if start_offset else "")

    def _note_resume(self, job: RunningJob, disk_id: str, resumed: int, total: int) -> None:
        """The operator's line: how far the job was when this run resumed it."""
        with self._lock:
            job.resumed_bytes[disk_id] = (resumed, total)
            done = sum(r for r, _ in job.resumed_bytes.values())
            planned = sum(t for _, t in job.resumed_bytes.values())
        self._update(job, resume_summary=f"resumed at {100.0 * done / planned if planned else 100.0:.0f} %")
