"""Failover readiness: can this VM be failed over (live or test) right now?

:func:`failover_readiness` runs every check of docs/design/failover.md#readiness-checks — the original three (a completed
replication, a usable change id, mapped source networks) and the Required ones (context status, no
concurrent replication or failover, every replica volume attached to the OMA, an identifiable OS
disk, a complete CloudStack configuration and, for a live failover, a vCenter credential and a
reachable VMA). It reads, never writes, and reports every check instead of stopping at the first
failure, so an operator sees everything to fix at once. The failover workflow runs it as its
``validation`` step and fails when ``is_valid`` is false; the validation views show the same facts
through the smaller public readers below (network coverage, volume placement, the OS disk …).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from oma_server.db.models import (
    FAILOVER_ACTIVE_STATUSES,
    REPLICATION_ACTIVE_STATUSES,
    CbtHistory,
    ContextStatus,
    DeviceMapping,
    DeviceOperationMode,
    FailoverJob,
    JobStatus,
    NbdExport,
    NetworkMapping,
    NetworkMappingType,
    NetworkValidationStatus,
    OsseaConfig,
    ReplicationJob,
    VmDisk,
    VmReplicationContext,
    VmwareCredential,
    utcnow,
)
from oma_server.domain import cloudstack_config, contexts, debug, network_mappings, volumes
from oma_server.domain.text_rules import quote
from oma_server.errors import InvalidArgument

FAILOVER_TYPES = ("live", "test")
#: A replication this far along counts as "the VM exists on the OMA side" (original validator).
HIGH_PROGRESS_PERCENT = 95.0
#: What a failover needs from the active CloudStack configuration.
FAILOVER_CONFIG_FIELDS = ("zone", "template_id", "service_offering_id", "oma_vm_id")
#: The first device on the first controller: the disk the failover boots from (docs/design/failover.md#workflow-steps).
OS_DISK_ID = "disk-2000"

# check_type is critical | warning | info: every check here is critical (a failed one blocks the failover).
CRITICAL = "critical"
PASS, FAIL, WARN, SKIP = "pass", "fail", "warning", "skip"

# Placement of a replica volume (docs/design/failover.md#volume-placement), as VMVolumeState.placement names it.
ON_OMA, ON_OMA_LOCKED, DETACHED, ON_DESTINATION, MISSING = (
    "on_oma", "on_oma_locked", "detached", "on_destination", "missing")


@dataclass
class Check:
    check_name: str
    check_type: str
    status: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    # What the operator should do when the check does not pass.
    required_action: str = ""
    execution_time_ms: int = 0


@dataclass
class ReadinessResult:
    context_id: str
    vm_name: str
    failover_type: str
    checks: list[Check]
    validated_at: datetime
    execution_time_ms: int

    @property
    def is_valid(self) -> bool:
        return not any(c.check_type == CRITICAL and c.status == FAIL for c in self.checks)

    @property
    def score(self) -> int:
        """Passed checks / all checks × 100."""
        passed = sum(1 for c in self.checks if c.status == PASS)
        return round(100 * passed / len(self.checks)) if self.checks else 0

    @property
    def errors(self) -> list[str]:
        return [c.message for c in self.checks if c.status == FAIL and c.check_type == CRITICAL]

    @property
    def warnings(self) -> list[str]:
        return [c.message for c in self.checks
                if c.status == WARN or (c.status == FAIL and c.check_type != CRITICAL)]

    @property
    def required_actions(self) -> list[str]:
        return [c.required_action for c in self.checks if c.required_action and c.status in (FAIL, WARN)]


def failover_type_or_default(value: str) -> str:
    """``live`` when empty; anything but live/test is rejected."""
    value = value or "live"
    if value not in FAILOVER_TYPES:
        raise InvalidArgument(f"failover_type must be live or test, not {quote(value)}")
    return value


# --- readers shared with the validation views --------------------------------------------------

def completed_or_nearly(ctx: VmReplicationContext) -> tuple[ReplicationJob | None, bool]:
    """The newest completed replication job of the context, else a replicating one past
    HIGH_PROGRESS_PERCENT; the flag says whether the job is completed."""
    jobs = ReplicationJob.select().where(ReplicationJob.vm_context == ctx.context_id)
    done = jobs.where(ReplicationJob.status == JobStatus.COMPLETED).order_by(
        ReplicationJob.completed_at.desc(), ReplicationJob.id).first()
    if done is not None:
        return done, True
    nearly = jobs.where(ReplicationJob.status == JobStatus.REPLICATING,
                        ReplicationJob.progress_percent >= HIGH_PROGRESS_PERCENT).order_by(
        ReplicationJob.progress_percent.desc(), ReplicationJob.id).first()
    return nearly, False


def last_valid_change(ctx: VmReplicationContext) -> CbtHistory | None:
    """The newest successful cbt_history row of the context with a non-empty change id."""
    job_ids = ReplicationJob.select(ReplicationJob.id).where(ReplicationJob.vm_context == ctx.context_id)
    return (CbtHistory.select()
            .where((CbtHistory.vm_context == ctx.context_id) | CbtHistory.job.in_(job_ids),
                   CbtHistory.sync_success == True,  # noqa: E712 - peewee expression
                   CbtHistory.change_id.is_null(False), CbtHistory.change_id != "")
            .order_by(CbtHistory.created_at.desc(), CbtHistory.id.desc()).first())


def _serves(mapping: NetworkMapping, failover_type: str) -> bool:
    return mapping.mapping_type == NetworkMappingType.BOTH or bool(mapping.is_test_network) == (failover_type == "test")


def network_coverage(ctx: VmReplicationContext, failover_type: str) -> dict[str, Any]:
    """The VM's discovered source networks against its mappings for one failover type. A mapping
    whose destination was found invalid does not map its network."""
    sources = network_mappings.source_networks(ctx.context_id)
    rows = list(NetworkMapping.select().where(NetworkMapping.vm_context == ctx.context_id)
                .order_by(NetworkMapping.source_network_name, NetworkMapping.is_test_network))
    usable = [m for m in rows if _serves(m, failover_type)]
    invalid = [m for m in usable if m.validation_status == NetworkValidationStatus.INVALID]
    destinations = {m.source_network_name: m.destination_network_name or m.destination_network_id
                    for m in usable if m not in invalid}
    return {
        "source_networks": sources,
        "mapped": [n for n in sources if n in destinations],
        "unmapped": [n for n in sources if n not in destinations],
        "invalid_mappings": [f"{m.source_network_name} → {m.destination_network_name or m.destination_network_id}"
                             for m in invalid],
        "destinations": {n: destinations[n] for n in sources if n in destinations},
        "test_network_configured": any(
            m.is_test_network or m.mapping_type in (NetworkMappingType.TEST, NetworkMappingType.BOTH) for m in rows),
    }


def volume_states(ctx: VmReplicationContext, config: OsseaConfig | None) -> list[dict[str, Any]]:
    """Per disk (in disk order): its replica volume and where that volume is (docs/design/failover.md#volume-placement). Ready =
    attached to the active configuration's OMA VM in operation mode ``oma``."""
    disks = sorted(VmDisk.select().where(VmDisk.vm_context == ctx.context_id), key=contexts.disk_sort_key)
    replicas = volumes.replicas_of(disks)
    uuids = [v.volume_id for v in replicas.values()]
    mappings = {m.volume_uuid: m for m in DeviceMapping.select().where(DeviceMapping.volume_uuid.in_(uuids))} \
        if uuids else {}
    exports = {e.volume_id: e for e in NbdExport.select().where(NbdExport.volume_id.in_(uuids))} if uuids else {}
    oma_vm_id = (config.oma_vm_id or "") if config else ""
    states = []
    for disk in disks:
        state: dict[str, Any] = {"disk_id": disk.disk_id, "ossea_volume_id": disk.ossea_volume_id or 0,
                                 "volume_id": "", "placement": MISSING, "attached_vm_id": "", "ready": False,
                                 "issue": "", "nbd_export": None}
        volume = replicas.get(disk.ossea_volume_id)
        if not disk.ossea_volume_id:
            state["issue"] = f"{disk.disk_id} has no replica volume (it was never replicated)"
        elif volume is None:
            state["issue"] = f"{disk.disk_id}: its replica volume (ossea_volumes id {disk.ossea_volume_id}) is gone"
        else:
            state["volume_id"] = volume.volume_id
            mapping = mappings.get(volume.volume_id)
            export = exports.get(volume.volume_id)
            if export is not None:
                state["nbd_export"] = {"export_name": export.export_name, "status": str(export.status)}
            if mapping is None:
                state["placement"] = DETACHED
                state["issue"] = f"{disk.disk_id}: volume {volume.volume_id} is not attached to any VM"
            else:
                state["attached_vm_id"] = mapping.vm_id
                if oma_vm_id and mapping.vm_id != oma_vm_id:
                    state["placement"] = ON_DESTINATION
                    state["issue"] = (f"{disk.disk_id}: volume {volume.volume_id} is attached to VM {mapping.vm_id}, "
                                      f"not to the OMA ({oma_vm_id})")
                elif mapping.operation_mode == DeviceOperationMode.FAILOVER:
                    state["placement"] = ON_OMA_LOCKED
                    state["issue"] = f"{disk.disk_id}: volume {volume.volume_id} is locked by a failover"
                else:
                    state["placement"] = ON_OMA
                    if oma_vm_id:
                        state["ready"] = True
                    else:
                        state["issue"] = (f"{disk.disk_id}: the active CloudStack configuration names no OMA VM, "
                                          "so the volume's attachment cannot be verified")
        states.append(state)
    return states


def os_disk(disks: list[VmDisk]) -> VmDisk | None:
    """The disk a failover boots from: ``disk-2000``, else the only disk at unit 0; None if ambiguous."""
    for disk in disks:
        if disk.disk_id == OS_DISK_ID:
            return disk
    first_units = [d for d in disks if d.unit_number == 0]
    return first_units[0] if len(first_units) == 1 else None


def config_gaps(config: OsseaConfig) -> list[str]:
    """FAILOVER_CONFIG_FIELDS the configuration leaves empty."""
    return [name for name in FAILOVER_CONFIG_FIELDS if not (getattr(config, name) or "").strip()]


def vcenter_credential(ctx: VmReplicationContext) -> tuple[VmwareCredential | None, str]:
    """The credential power and sync calls use (the VM's own, else the default) or None, with why."""
    if ctx.credential_id:
        cred = VmwareCredential.get_or_none(VmwareCredential.id == ctx.credential_id)
        if cred is not None and cred.is_active:
            return cred, f"the VM's credential {quote(cred.credential_name)}"
        return None, f"the VM's credential {quote(cred.credential_name)} is inactive" if cred else "the VM's credential is gone"
    cred = VmwareCredential.get_or_none(VmwareCredential.is_default == True,  # noqa: E712
                                        VmwareCredential.is_active == True)  # noqa: E712
    if cred is None:
        return None, "the VM has no credential of its own and no active default credential is set"
    return cred, f"the default credential {quote(cred.credential_name)}"


def active_work(ctx: VmReplicationContext, own_failover_job_id: str | None = None
                ) -> tuple[list[ReplicationJob], list[FailoverJob]]:
    """Non-terminal replication jobs and failover records (incl. rollbacks: ``reverting``) of the context."""
    replications = list(ReplicationJob.select().where(
        ReplicationJob.vm_context == ctx.context_id, ReplicationJob.status.in_(REPLICATION_ACTIVE_STATUSES))
        .order_by(ReplicationJob.created_at, ReplicationJob.id))
    failovers = FailoverJob.select().where(
        FailoverJob.vm_context == ctx.context_id, FailoverJob.status.in_(FAILOVER_ACTIVE_STATUSES))
    if own_failover_job_id:
        failovers = failovers.where(FailoverJob.job_id != own_failover_job_id)
    return replications, list(failovers.order_by(FailoverJob.created_at, FailoverJob.id))


# --- the checks ---------------------------------------------------------------------------------

def _replication_check(ctx: VmReplicationContext) -> Check:
    job, completed = completed_or_nearly(ctx)
    if job is None:
        return Check("VM Existence", CRITICAL, FAIL, f"{ctx.vm_name} has no completed replication",
                     required_action="Replicate the VM (ReplicationService.CreateReplication) and let it complete")
    details = {"replication_job_id": job.id, "status": str(job.status), "progress_percent": job.progress_percent}
    if completed:
        return Check("VM Existence", CRITICAL, PASS, f"replication job {job.id} completed", details)
    return Check("VM Existence", CRITICAL, PASS,
                 f"replication job {job.id} is at {job.progress_percent:.0f}% (at least {HIGH_PROGRESS_PERCENT:.0f}%)",
                 details)


def _sync_check(ctx: VmReplicationContext) -> Check:
    row = last_valid_change(ctx)
    if row is None:
        return Check("Sync Status", CRITICAL, FAIL, f"{ctx.vm_name} has no successful sync with a change id",
                     required_action="Run a replication that completes, so every disk stores a change id")
    shown = row.change_id if len(row.change_id) <= 20 else row.change_id[:20] + "…"
    return Check("Sync Status", CRITICAL, PASS, f"last successful sync of {row.disk_id} stored change id {shown}",
                 {"change_id": row.change_id, "disk_id": row.disk_id, "job_id": row.job_id,
                  "synced_at": row.created_at.isoformat() if row.created_at else None})


def _network_check(ctx: VmReplicationContext, failover_type: str) -> Check:
    coverage = network_coverage(ctx, failover_type)
    details = {k: coverage[k] for k in ("source_networks", "unmapped", "invalid_mappings", "destinations")}
    flag = "true" if failover_type == "test" else "false"
    if not coverage["source_networks"]:
        return Check("Network Mappings", CRITICAL, WARN,
                     f"no source networks are recorded for {ctx.vm_name}; its mappings cannot be verified", details,
                     "Check the VM's network adapters in vCenter and replicate again to refresh its inventory")
    if coverage["unmapped"]:
        return Check("Network Mappings", CRITICAL, FAIL,
                     f"source networks without a {failover_type} mapping: {', '.join(coverage['unmapped'])}", details,
                     f"Map each source network (NetworkMappingService.CreateNetworkMapping, is_test_network={flag})")
    return Check("Network Mappings", CRITICAL, PASS,
                 f"all {len(coverage['source_networks'])} source networks are mapped for a {failover_type} failover",
                 details)


_STATUS_ACTIONS = {
    ContextStatus.DISCOVERED: "Replicate the VM first",
    ContextStatus.REPLICATING: "Wait for the running replication to finish",
    ContextStatus.FAILED: "Run a replication that completes",
    ContextStatus.FAILED_OVER_TEST: "End the test failover first",
    ContextStatus.FAILED_OVER_LIVE: "The VM is already failed over; roll back before another failover",
    ContextStatus.CLEANUP_REQUIRED: "Clean up the failed failover (FailoverService.CleanupFailedExecution)",
    ContextStatus.COMPLETED: "The migration of this VM is completed",
}


def _status_check(ctx: VmReplicationContext) -> Check:
    details = {"current_status": str(ctx.current_status)}
    if ctx.current_status == ContextStatus.READY_FOR_FAILOVER:
        return Check("VM Status", CRITICAL, PASS, f"{ctx.vm_name} is ready_for_failover", details)
    return Check("VM Status", CRITICAL, FAIL, f"{ctx.vm_name} is {ctx.current_status}, not ready_for_failover",
                 details, _STATUS_ACTIONS.get(ctx.current_status, ""))


def _active_work_check(ctx: VmReplicationContext, own_failover_job_id: str | None) -> Check:
    replications, failovers = active_work(ctx, own_failover_job_id)
    busy = [f"replication job {j.id} is {j.status}" for j in replications] + \
        [f"{f.job_type} failover {f.job_id} is {f.status}" for f in failovers]
    details = {"replication_jobs": [j.id for j in replications], "failover_jobs": [f.job_id for f in failovers]}
    if busy:
        return Check("Active Jobs", CRITICAL, FAIL, "; ".join(busy), details,
                     "Wait for the running work to end (or cancel it) before failing over")
    return Check("Active Jobs", CRITICAL, PASS, "no replication or failover is running", details)


def _volume_check(ctx: VmReplicationContext, config: OsseaConfig | None) -> Check:
    states = volume_states(ctx, config)
    details = {"volumes": [{k: s[k] for k in ("disk_id", "volume_id", "placement", "attached_vm_id", "nbd_export")}
                           for s in states]}
    if not states:
        return Check("Volume State", CRITICAL, FAIL, f"no disks are recorded for {ctx.vm_name}", details,
                     "Replicate the VM so its disks get replica volumes")
    issues = [s["issue"] for s in states if not s["ready"]]
    if issues:
        return Check("Volume State", CRITICAL, FAIL, "; ".join(issues), details,
                     "Every replica volume must be attached to the OMA: replicate again, or clean up a failover "
                     "that holds the volumes")
    return Check("Volume State", CRITICAL, PASS, f"all {len(states)} replica volumes are attached to the OMA", details)


def _os_disk_check(ctx: VmReplicationContext) -> Check:
    disks = sorted(VmDisk.select().where(VmDisk.vm_context == ctx.context_id), key=contexts.disk_sort_key)
    disk = os_disk(disks)
    if disk is None:
        return Check("OS Disk", CRITICAL, FAIL,
                     f"the OS disk of {ctx.vm_name} cannot be identified (no {OS_DISK_ID} and "
                     f"{sum(1 for d in disks if d.unit_number == 0)} disks at unit 0)",
                     {"disks": [d.disk_id for d in disks]}, "Check the VM's disk layout in vCenter")
    return Check("OS Disk", CRITICAL, PASS, f"the OS disk is {disk.disk_id} ({disk.label or disk.vmdk_path})",
                 {"disk_id": disk.disk_id, "os_type": disk.os_type or ctx.os_type or "", "size_gb": disk.size_gb})


def _config_check(config: OsseaConfig | None) -> Check:
    if config is None:
        return Check("OSSEA Config", CRITICAL, FAIL, "no CloudStack configuration is active",
                     required_action="Save and activate one (OSSEAConfigService.CreateConfig)")
    gaps = config_gaps(config)
    details = {"config_id": config.id, "config_name": config.name, "missing": gaps}
    if gaps:
        return Check("OSSEA Config", CRITICAL, FAIL,
                     f"CloudStack configuration {quote(config.name)} lacks {', '.join(gaps)}", details,
                     "Set them with OSSEAConfigService.UpdateConfig")
    return Check("OSSEA Config", CRITICAL, PASS, f"CloudStack configuration {quote(config.name)} is complete", details)


def _credential_check(ctx: VmReplicationContext) -> Check:
    cred, why = vcenter_credential(ctx)
    if cred is None:
        return Check("vCenter Credentials", CRITICAL, FAIL, why,
                     required_action="Link an active credential to the VM or set a default one")
    return Check("vCenter Credentials", CRITICAL, PASS, f"power and sync calls use {why}",
                 {"credential_id": cred.id, "vcenter_host": cred.vcenter_host})


def _vma_check(vma: Any) -> Check:
    if vma is None:
        return Check("VMA Connectivity", CRITICAL, SKIP, "the VMA was not probed")
    probe = debug.vma_health(vma)
    details = {"address": vma.address, "latency_ms": probe.latency_ms}
    if probe.status == debug.HEALTHY:
        return Check("VMA Connectivity", CRITICAL, PASS, f"the VMA at {vma.address} answers", details)
    return Check("VMA Connectivity", CRITICAL, FAIL, probe.message, details,
                 "Restore the connection to the VMA agent: a live failover powers off and syncs the source through it")


def _timed(run: Callable[[], Check]) -> Check:
    started = time.monotonic()
    check = run()
    check.execution_time_ms = int((time.monotonic() - started) * 1000)
    return check


def failover_readiness(context: VmReplicationContext, failover_type: str = "live", *, vma: Any = None,
                       own_failover_job_id: str | None = None) -> ReadinessResult:
    """Every readiness check for a ``live`` or ``test`` failover of ``context``.

    ``vma``: the VmaClient; for a live failover its reachability is a check (skipped when None).
    ``own_failover_job_id``: the calling failover's own ``failover_jobs.job_id``, not counted as
    concurrent work.
    """
    failover_type = failover_type_or_default(failover_type)
    started = time.monotonic()
    config = cloudstack_config.active_config()
    runs: list[Callable[[], Check]] = [
        lambda: _status_check(context),
        lambda: _active_work_check(context, own_failover_job_id),
        lambda: _replication_check(context),
        lambda: _sync_check(context),
        lambda: _volume_check(context, config),
        lambda: _os_disk_check(context),
        lambda: _network_check(context, failover_type),
        lambda: _config_check(config),
    ]
    if failover_type == "live":
        runs += [lambda: _credential_check(context), lambda: _vma_check(vma)]
    checks = [_timed(run) for run in runs]
    return ReadinessResult(context.context_id, context.vm_name, failover_type, checks, utcnow(),
                           int((time.monotonic() - started) * 1000))
