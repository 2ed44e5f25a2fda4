"""The failover flow (live and test, docs/design/failover.md#workflow-steps): ten named steps, then the outcome.

    validation                      readiness checks, blocking                    [pending → validating]
    source-vm-power-off             live: graceful shutdown, then power-off, verified
    final-sync                      live: an in-process replication, followed to its end
    volume-mode-switch-failover     context → failed_over_*, mappings locked      [→ snapshotting]
    multi-volume-snapshot-creation  one CloudStack snapshot per volume, all or nothing
    virtio-driver-injection         Windows + a configured command only; otherwise skipped (never faked)
    vm-creation                     one NIC per source network, exact display name [→ creating_vm → switching_volume]
    volume-attachment               template root removed; exports stopped; OS → device 0, data disks in order
    vm-startup-and-validation       start, then check the running VM              [→ powering_on]
    status-update                   context status confirmed                      [→ completed]

``failover_jobs.status`` in brackets. A failure after the context changed runs the compensation saga
(:mod:`oma_server.workflows.compensation`).
"""
from __future__ import annotations

import contextlib
import logging
import shlex
import subprocess
import time
from datetime import timedelta
from typing import Any

from oma_server.db.database import database_proxy as db
from oma_server.db.models import (
    FAILOVER_ACTIVE_STATUSES,
    REPLICATION_ACTIVE_STATUSES,
    ContextStatus,
    DeviceMapping,
    DeviceOperationMode,
    FailoverJob,
    FailoverJobStatus,
    JobStatus,
    JobTracking,
    OsseaVolume,
    ReplicationJob,
    SnapshotStatus,
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
from oma_server.domain.text_rules import quote
from oma_server.errors import DeadlineExceeded, DomainError, FailedPrecondition
from oma_server.workflows.compensation import compensate
from oma_server.workflows.error_rules import (
    InjectionFailed,
    NetworkUnusable,
    NotReady,
    OfferingUnusable,
    SnapshotFailed,
    VolumeMoveFailed,
)
from oma_server.workflows.failover_common import FailoverRun, FlowBase
from oma_server.workflows.placement import (
    Placement,
    clear_tracking,
    merge_job_metadata,
    set_context_status,
    tracked_snapshot,
)
from oma_server.workflows.steps import Step, Stopping

log = logging.getLogger("oma_server.failover")

_NON_WINDOWS = ("linux", "ubuntu", "debian", "centos", "rhel", "redhat", "sles", "suse", "rocky", "alma", "oracle",
                "photon", "coreos", "freebsd", "solaris", "darwin", "other")


def _guest_family(os_type: str) -> str:
    text = (os_type or "").lower()
    if "win" in text:
        return "windows"
    if not text or text == "unknown":
        return "unknown"
    return "other" if any(w in text for w in _NON_WINDOWS) else "unknown"


class FailoverFlow(FlowBase):
    """Runs one failover job: :meth:`run` loads the record, runs :meth:`_failover_steps`, then ends
    the job (and, after a failure, compensates)."""

    def _load_failover(self, job: JobTracking) -> FailoverRun:
        record = FailoverJob.get(FailoverJob.job_id == job.id)
        ctx = contexts.get(record.vm_context_id)
        spec = failover.loads(record.source_vm_spec)
        conf = FailoverConfig(**spec["configuration"], context_id=ctx.context_id, vmware_vm_id=ctx.vmware_vm_id)
        conf.network_mappings = failover.loads(record.network_mappings).get("mappings") or conf.network_mappings
        return FailoverRun(job.id, ctx, record, cloudstack_config.require_active(), conf, spec, job.owner or "system")

    def _failover_steps(self) -> list[Step]:
        return [
            Step("validation", self._validate,
                 skip_if=lambda r: "skip_validation requested" if r.conf.skip_validation else None),
            Step("source-vm-power-off", self._power_off, skip_if=lambda r: None if r.kind == "live"
                 and r.conf.power_off_source else "test failover: the source VM keeps running"),
            Step("final-sync", self._final_sync, skip_if=lambda r: None if r.kind == "live"
                 and r.conf.perform_final_sync else "no final sync for this failover"),
            Step("volume-mode-switch-failover", self._lock_volumes),
            Step("multi-volume-snapshot-creation", self._snapshot),
            Step("virtio-driver-injection", self._inject, skip_if=self._injection_skip_reason),
            Step("vm-creation", self._create_vm),
            Step("volume-attachment", self._attach),
            Step("vm-startup-and-validation", self._start_vm),
            Step("status-update", self._status_update),
        ]

    def run(self, job: JobTracking) -> None:
        """Run a failover job to its end: completed, or failed (compensated when it changed anything)."""
        try:
            with db.connection_context():
                run = self._load_failover(job)
                failover.move_failover_job(job.id, FailoverJobStatus.VALIDATING)
        except DomainError as exc:
            with db.connection_context(), db.atomic():
                record = FailoverJob.get_or_none(FailoverJob.job_id == job.id)
                if record is not None and record.status in FAILOVER_ACTIVE_STATUSES:
                    failover.move_failover_job(job.id, FailoverJobStatus.FAILED, error_message=exc.message)
                self.finish(job.id, job.context_id, exc.message, exc)
            return
        try:
            self.run_job_steps(job.id, self._failover_steps(), run)
        except joblog.StepFailed as exc:
            self._failover_failed(run, exc)
            return
        except Stopping as exc:
            self.stopped(job.id, exc)
            return
        with db.connection_context(), db.atomic():
            self.finish(job.id, run.ctx.context_id)
        log.info("%s failover of %s completed: destination VM %s", run.kind, run.ctx.vm_name, run.destination_vm_id)

    # step 1
    def _validate(self, run: FailoverRun, step: joblog.StepHandle) -> None:
        ctx = contexts.get(run.ctx.context_id)
        result = readiness.failover_readiness(ctx, run.kind, vma=self.vma if run.kind == "live" else None,
                                              own_failover_job_id=run.job_id)
        step.details.update(readiness_score=result.score, is_valid=result.is_valid,
                            checks={c.check_name: c.status for c in result.checks})
        if not result.is_valid:
            raise NotReady("the VM is not ready for failover: " + "; ".join(result.errors))

    # step 2
    def _power_off(self, run: FailoverRun, step: joblog.StepHandle) -> None:
        login = self.login(run.ctx)
        before = self.vma.power_state(login, run.ctx.vmware_vm_id).power_state
        step.details["previous_state"] = before
        if before == "poweredOff":
            step.details["method"] = "already-off"
            return
        result = self.vma.power_off(login, run.ctx.vmware_vm_id, timeout_seconds=self.settings.failover_power_off_seconds,
                                    force_after_timeout=True)
        step.details.update(method=result.method, message=result.message)
        state = self.wait_power(login, run.ctx.vmware_vm_id, "poweredOff", 120.0, 1.0)
        step.details["new_state"] = state
        if state != "poweredOff":
            raise DeadlineExceeded(f"graceful shutdown timeout: {run.ctx.vm_name} is still {state}")
        credentials.record_use(login.credential_id)

    # step 3
    def _final_sync(self, run: FailoverRun, step: joblog.StepHandle) -> None:
        engine = self.deps.replication
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
            if self.runner.stopping.is_set() or time.monotonic() > deadline:
                with contextlib.suppress(DomainError):
                    engine.cancel(job.id, "the failover stopped waiting for its final sync")
                if self.runner.stopping.is_set():
                    raise Stopping("the OMA is stopping")
                raise DeadlineExceeded(
                    f"final sync {job.id} did not end within {self.settings.failover_final_sync_timeout_seconds:.0f} s "
                    f"(cancelled); the source VM {run.ctx.vm_name} is powered off")
            seen = engine.hub.wait(job.id, seen, 1.0)

    # step 4 (+ the context status change)
    def _lock_volumes(self, run: FailoverRun, step: joblog.StepHandle) -> None:
        failover.move_failover_job(run.job_id, FailoverJobStatus.SNAPSHOTTING)
        disks = list(VmDisk.select().where(VmDisk.vm_context == run.ctx.context_id))
        if not disks:
            raise NotReady(f"VM {quote(run.ctx.vm_name)} has no disks")
        run.disks = failover.os_disk_first(disks, readiness.os_disk(disks))
        replicas = volumes.replicas_of(run.disks)
        missing = [d.disk_id for d in run.disks if d.ossea_volume_id not in replicas]
        if missing:
            raise NotReady(f"no replica volume for {', '.join(missing)}; replicate the VM first")
        run.volumes = {d.disk_id: replicas[d.ossea_volume_id] for d in run.disks}
        mappings = {m.volume_uuid: m for m in DeviceMapping.select().where(
            DeviceMapping.volume_uuid.in_([v.volume_id for v in run.volumes.values()]))}
        off_oma = [v.volume_id for v in run.volumes.values()
                   if v.volume_id not in mappings or mappings[v.volume_id].vm_id != run.config.oma_vm_id]
        if off_oma:
            raise VolumeMoveFailed(f"replica volumes not attached to the OMA: {', '.join(off_oma)}")
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
                raise NotReady(f"VM {quote(ctx.vm_name)} is {ctx.current_status}{busy}, not ready_for_failover")
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
            leftover = tracked_snapshot(current)
            if not leftover:
                continue
            if current.snapshot_status == SnapshotStatus.ROLLBACK_COMPLETE:
                # An earlier cleanup reverted from it but could not delete it: delete it now.
                if cs.get_snapshot(leftover) is not None:
                    cs.delete_snapshot(leftover)
                clear_tracking(current)
            else:
                raise SnapshotFailed(
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
            OsseaVolume.update(snapshot_id=snap.id, snapshot_created_at=now,
                               snapshot_status=SnapshotStatus.READY).where(OsseaVolume.id == volume.id).execute()
            run.snapshots[volume.volume_id] = snap.id
            made.append({"volume_uuid": volume.volume_id, "volume_name": volume.volume_name, "snapshot_id": snap.id,
                         "snapshot_name": name, "disk_id": disk.disk_id, "created_at": now.isoformat()})
        summary = {"snapshots": made, "total_volumes": len(run.volumes), "success_count": len(made),
                   "failure_count": len(failures)}
        if made:  # shown as the record's snapshot id (the per-volume ids are on ossea_volumes)
            FailoverJob.update(ossea_snapshot_id=made[0]["snapshot_id"]).where(
                FailoverJob.job_id == run.job_id).execute()
        step.details["multi_volume_snapshots"] = summary
        merge_job_metadata(run.job_id, {"multi_volume_snapshots": summary})
        if failures:
            raise SnapshotFailed("snapshot creation failed (all volumes must be protected, the run's snapshots "
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
                raise InjectionFailed(f"driver injection exited with {done.returncode}: "
                                         f"{(done.stderr or done.stdout).strip()[-500:]}")
        except (OSError, subprocess.TimeoutExpired, FailedPrecondition) as exc:
            message = exc.message if isinstance(exc, DomainError) else f"driver injection could not run: {exc}"
            if run.kind == "live":
                step.details.update(virtio_status="failed_non_fatal", virtio_error=message)
                log.warning("driver injection failed (live failover continues): %s", message)
                return
            raise InjectionFailed(message) from None
        step.details["virtio_status"] = "drivers-injected-successfully"

    # step 7
    def _network_ids(self, run: FailoverRun) -> list[str]:
        nics = run.spec.get("networks") or (run.disks[0].network_config if run.disks else None) or []
        sources = list(dict.fromkeys(n.get("network_name") for n in nics if isinstance(n, dict) and n.get("network_name")))
        if not sources:
            if not run.config.network_id:
                raise NetworkUnusable("the VM has no recorded networks and the CloudStack configuration no network_id")
            return [run.config.network_id]
        unmapped = [n for n in sources if not run.conf.network_mappings.get(n)]
        if unmapped:
            raise NetworkUnusable(f"no destination network for source network(s) {', '.join(unmapped)}: "
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
                f"a CloudStack VM named {quote(name)} already exists ({existing[0].id}, {existing[0].state}); "
                "remove it or run CleanupFailedExecution")
        run.name_was_free = True
        networks = self._network_ids(run)
        zone = cs.find_zone(run.config.zone)
        if zone is None:
            raise OfferingUnusable(f"CloudStack zone {quote(run.config.zone)} of the configuration does not exist")
        offering = cs.find_service_offering(run.config.service_offering_id)
        if offering is None:
            raise OfferingUnusable(f"service offering {quote(run.config.service_offering_id)} of the CloudStack "
                                     "configuration does not exist")
        cpus = int(run.spec.get("cpus") or run.ctx.cpu_count or 1)
        memory = int(run.spec.get("memory_mb") or run.ctx.memory_mb or 1024)
        details: dict[str, Any] = {}
        if offering.is_customized:
            details = {"cpuNumber": cpus, "memory": memory}
            if not offering.cpu_speed_mhz:
                details["cpuSpeed"] = 1000
        elif (offering.cpu_number, offering.memory_mb) != (cpus, memory):
            step.details["sizing_warning"] = (f"offering {offering.name} gives {offering.cpu_number} vCPU / "
                                              f"{offering.memory_mb} MB; the source has {cpus} vCPU / {memory} MB")
        vm = cs.deploy_virtual_machine(name=name, display_name=run.conf.destination_name, zone_id=zone.id,
                                       service_offering_id=offering.id, template_id=run.config.template_id or "",
                                       network_ids=networks, details=details, start=False)
        run.destination_vm_id = vm.id
        failover.move_failover_job(run.job_id, FailoverJobStatus.SWITCHING_VOLUME, destination_vm_id=vm.id)
        step.details.update(destination_vm_id=vm.id, name=name, display_name=run.conf.destination_name,
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
        vm = cs.get_virtual_machine(run.destination_vm_id)
        state = vm.state if vm else None
        warnings = []
        if state != "Running":
            warnings.append(f"the VM is {state}, not Running")
        cpus, memory = int(run.spec.get("cpus") or 0), int(run.spec.get("memory_mb") or 0)
        if vm and cpus and vm.cpu_number and vm.cpu_number != cpus:
            warnings.append(f"{vm.cpu_number} vCPU instead of {cpus}")
        if vm and memory and vm.memory_mb and vm.memory_mb != memory:
            warnings.append(f"{vm.memory_mb} MB instead of {memory} MB")
        step.details.update(state=state, warnings=warnings,
                            nics=[{"network_id": n.network_id or None, "ip": n.ip_address or None,
                                   "mac": n.mac_address or None} for n in (vm.nics if vm else ())])
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
    def _failover_failed(self, run: FailoverRun, failed: joblog.StepFailed) -> None:
        """End a failed failover: compensate when it changed anything, say what state the VM is in."""
        failed_step, error = failed.step, failed.message
        context_status: ContextStatus | None = None
        if failed_step == "status-update":
            # The destination VM runs: never tear it down for a bookkeeping error (docs/design/failover.md#compensation).
            error += f"; the destination VM {run.destination_vm_id} is running with the volumes attached"
        elif failed_step == "final-sync":
            if run.final_sync_job:
                with contextlib.suppress(DomainError), db.connection_context():
                    job = ReplicationJob.get_by_id(run.final_sync_job)
                    if job.status in REPLICATION_ACTIVE_STATUSES:
                        self.deps.replication.cancel(job.id, "the failover failed")
            # docs/design/failover.md#compensation: the context stays ready for failover (job_lifecycle releases a failed final
            # sync that way); the replicas keep the last completed sync's change ids.
            error += "; the next live failover final-syncs again from the last completed sync"
        elif run.status_flipped or run.locked or run.snapshots or run.destination_vm_id or run.name_was_free:
            ok, problems = compensate(self, run)
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
                set_context_status(run.ctx.context_id, context_status)
            with contextlib.suppress(FailedPrecondition):
                failover.move_failover_job(run.job_id, FailoverJobStatus.FAILED, error_message=error)
            self.finish(run.job_id, run.ctx.context_id, error, failed.cause)
        log.warning("%s failover of %s failed: %s", run.kind, run.ctx.vm_name, error)

