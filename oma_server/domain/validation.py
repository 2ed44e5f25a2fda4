"""Per-VM validation views (docs/design/operations.md#validation-views): what the GUI shows before a failover.

The original's six endpoints were mocks or looked rows up with the wrong key (a VM id used as a
replication job id). Here the VM is named by its context id (preferred) or its VMware id and
resolved to exactly one context; every view reads real rows of that context and writes nothing.
Failover readiness is :mod:`oma_server.domain.readiness`, the same checks the failover workflow runs.
"""
from __future__ import annotations

from typing import Any

from peewee import fn

from oma_server.db.models import (
    JOB_TRACKING_ACTIVE_STATUSES,
    REPLICATION_ACTIVE_STATUSES,
    FailoverJobStatus,
    JobStatus,
    JobTracking,
    ReplicationJob,
    VmDisk,
    VmReplicationContext,
    utcnow,
)
from oma_server.domain import cloudstack_config, joblog, readiness
from oma_server.domain.readiness import FAIL, PASS, WARN
from oma_server.domain.text_rules import quote
from oma_server.errors import FailedPrecondition, NotFound, require

#: Progress shown for a failover record without a JobLog job (docs/design/failover.md#failover-job-status; anything else 50).
FAILOVER_STATUS_PROGRESS = {
    FailoverJobStatus.PENDING: 0, FailoverJobStatus.VALIDATING: 10, FailoverJobStatus.SNAPSHOTTING: 25,
    FailoverJobStatus.CREATING_VM: 50, FailoverJobStatus.SWITCHING_VOLUME: 75, FailoverJobStatus.POWERING_ON: 90,
    FailoverJobStatus.COMPLETED: 100, FailoverJobStatus.FAILED: 0, FailoverJobStatus.CLEANUP: 100,
}


def resolve(vm_id: str) -> VmReplicationContext:
    """The one context named by a context id, else by a VMware VM id."""
    require(vm_id, "vm_id (a context id or a VMware VM id) is required")
    ctx = VmReplicationContext.get_or_none(VmReplicationContext.context_id == vm_id)
    if ctx is not None:
        return ctx
    found = list(VmReplicationContext.select().where(VmReplicationContext.vmware_vm_id == vm_id)
                 .order_by(VmReplicationContext.vcenter_host))
    if not found:
        raise NotFound(f"no managed VM with context id or VMware id {quote(vm_id)}")
    if len(found) > 1:
        raise FailedPrecondition(
            f"VMware id {quote(vm_id)} names VMs in several vCenters ({', '.join(c.vcenter_host for c in found)}); "
            "give the context id")
    return found[0]


def failover_readiness(vm_id: str, failover_type: str, vma: Any) -> tuple[VmReplicationContext,
                                                                           readiness.ReadinessResult]:
    failover_type = readiness.failover_type_or_default(failover_type)
    ctx = resolve(vm_id)
    return ctx, readiness.failover_readiness(ctx, failover_type, vma=vma)


def sync_status(vm_id: str) -> tuple[VmReplicationContext, dict[str, Any]]:
    """Change id and sync state from cbt_history, replication_jobs and vm_disks. Up to date = the
    newest job completed, none is active and every disk holds a change id for the next increment."""
    ctx = resolve(vm_id)
    change = readiness.last_valid_change(ctx)
    jobs = ReplicationJob.select().where(ReplicationJob.vm_context == ctx.context_id)
    total = jobs.count()
    completed = jobs.where(ReplicationJob.status == JobStatus.COMPLETED).count()
    active = jobs.where(ReplicationJob.status.in_(REPLICATION_ACTIVE_STATUSES)).count()
    newest = jobs.order_by(ReplicationJob.created_at.desc(), ReplicationJob.id.desc()).first()
    disks = VmDisk.select().where(VmDisk.vm_context == ctx.context_id)
    every_disk_has_change_id = disks.exists() and not disks.where(
        VmDisk.disk_change_id.is_null() | (VmDisk.disk_change_id == "")).exists()
    synced = jobs.select(fn.SUM(ReplicationJob.bytes_transferred)).scalar() or 0
    return ctx, {
        "has_valid_change_id": change is not None,
        "last_change_id": change.change_id if change else None,
        "last_sync_time": change.created_at if change else None,
        "sync_jobs_active": active,
        "sync_completion_rate": round(100.0 * completed / total, 2) if total else 0.0,
        "is_sync_up_to_date": bool(newest is not None and newest.status == JobStatus.COMPLETED and not active
                                   and every_disk_has_change_id),
        "total_synced_bytes": int(synced),
    }


def network_status(vm_id: str, failover_type: str) -> tuple[VmReplicationContext, str, dict[str, Any]]:
    failover_type = readiness.failover_type_or_default(failover_type)
    ctx = resolve(vm_id)
    coverage = readiness.network_coverage(ctx, failover_type)
    return ctx, failover_type, {
        "total_source_networks": len(coverage["source_networks"]),
        "mapped_networks": len(coverage["mapped"]),
        "unmapped_networks": coverage["unmapped"],
        "invalid_mappings": coverage["invalid_mappings"],
        "test_network_configured": coverage["test_network_configured"],
        "all_networks_mapped": bool(coverage["source_networks"]) and not coverage["unmapped"],
    }


def volume_status(vm_id: str) -> tuple[VmReplicationContext, dict[str, Any]]:
    """Every disk's replica volume and its placement; integrity is checked when the active
    configuration names the OMA VM the volumes must be attached to."""
    ctx = resolve(vm_id)
    config = cloudstack_config.active_config()
    states = readiness.volume_states(ctx, config)
    ready = sum(1 for s in states if s["ready"])
    return ctx, {
        "total_volumes": len(states),
        "ready_volumes": ready,
        "volume_issues": [s["issue"] for s in states if s["issue"]],
        "has_ossea_volumes": any(s["volume_id"] for s in states),
        "volume_integrity_checked": bool(config is not None and config.oma_vm_id),
        "all_volumes_ready": bool(states) and ready == len(states),
        "volumes": states,
    }


def active_jobs(vm_id: str) -> tuple[VmReplicationContext, list[dict[str, Any]]]:
    """Active replication jobs, non-terminal failover records and pending/running JobLog jobs of the
    context, oldest first. Each piece of work is listed once: the JobLog job of a listed replication
    (external id = job id) or failover (id = failover job id) is not repeated, it gives the failover
    its step progress."""
    ctx = resolve(vm_id)
    replications, failovers = readiness.active_work(ctx)
    tracked = {j.id: j for j in JobTracking.select().where(
        JobTracking.context_id == ctx.context_id, JobTracking.status.in_(JOB_TRACKING_ACTIVE_STATUSES))}
    failover_jobs = {j.id: j for j in JobTracking.select().where(
        JobTracking.id.in_([f.job_id for f in failovers]))} if failovers else {}
    steps = joblog.steps_of([*tracked, *failover_jobs])
    items = [{"kind": "replication", "id": j.id, "status": str(j.status), "progress": j.progress_percent,
              "started_at": j.started_at or j.created_at, "operation": str(j.replication_type)}
             for j in replications]
    for f in failovers:
        job = failover_jobs.get(f.job_id)
        progress = joblog.progress(job, steps[job.id])["step_completion_percentage"] if job \
            else FAILOVER_STATUS_PROGRESS.get(f.status, 50)
        items.append({"kind": "failover", "id": f.job_id, "status": str(f.status), "progress": progress,
                      "started_at": f.started_at or f.created_at, "operation": str(f.job_type)})
    listed = {j.id for j in replications} | set(failover_jobs)
    for j in tracked.values():
        if j.id in listed or j.external_job_id in listed:
            continue
        items.append({"kind": "job", "id": j.id, "status": str(j.status),
                      "progress": joblog.progress(j, steps[j.id])["step_completion_percentage"],
                      "started_at": j.started_at, "operation": j.operation})
    items.sort(key=lambda i: (i["started_at"] or utcnow(), i["kind"], i["id"]))
    return ctx, items


# --- configuration check -----------------------------------------------------------------------

def _check(name: str, status: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"check_name": name, "status": status, "message": message, "details": details or {}}


def _mappings_check(ctx: VmReplicationContext) -> dict[str, Any]:
    coverage = readiness.network_coverage(ctx, "live")
    details = {k: coverage[k] for k in ("source_networks", "unmapped", "invalid_mappings")}
    if not coverage["source_networks"]:
        return _check("Network Mappings", WARN, "no source networks are recorded; mappings cannot be verified", details)
    if coverage["unmapped"]:
        return _check("Network Mappings", WARN, f"source networks without a live mapping: "
                      f"{', '.join(coverage['unmapped'])}", details)
    return _check("Network Mappings", PASS, f"all {len(coverage['source_networks'])} source networks are mapped",
                  details)


def _volumes_check(ctx: VmReplicationContext) -> dict[str, Any]:
    states = readiness.volume_states(ctx, cloudstack_config.active_config())
    details = {"volumes": [{k: s[k] for k in ("disk_id", "volume_id", "placement")} for s in states]}
    if not states:
        return _check("Volume State", FAIL, "no disks are recorded", details)
    issues = [s["issue"] for s in states if not s["ready"]]
    if issues:
        return _check("Volume State", FAIL, "; ".join(issues), details)
    return _check("Volume State", PASS, f"all {len(states)} replica volumes are attached to the OMA", details)


def _existence_check(ctx: VmReplicationContext) -> dict[str, Any]:
    job, completed = readiness.completed_or_nearly(ctx)
    if job is None:
        return _check("VM Existence", FAIL, "the VM has no completed replication")
    details = {"replication_job_id": job.id, "progress_percent": job.progress_percent}
    if completed:
        return _check("VM Existence", PASS, f"replication job {job.id} completed", details)
    return _check("VM Existence", WARN, f"replication job {job.id} is at {job.progress_percent:.0f}%", details)


def _config_check() -> dict[str, Any]:
    config = cloudstack_config.active_config()
    if config is None:
        return _check("OSSEA Config", FAIL, "no CloudStack configuration is active")
    gaps = readiness.config_gaps(config)
    details = {"config_id": config.id, "config_name": config.name, "missing": gaps}
    # Replication needs the zone and the OMA VM; template and offering only matter for a failover.
    if {"zone", "oma_vm_id"} & set(gaps):
        return _check("OSSEA Config", FAIL, f"configuration {quote(config.name)} lacks {', '.join(gaps)}", details)
    if gaps:
        return _check("OSSEA Config", WARN, f"configuration {quote(config.name)} lacks {', '.join(gaps)} "
                      "(needed for a failover)", details)
    return _check("OSSEA Config", PASS, f"configuration {quote(config.name)} is complete", details)


def _credentials_check(ctx: VmReplicationContext) -> dict[str, Any]:
    cred, why = readiness.vcenter_credential(ctx)
    if cred is None:
        return _check("Credentials", FAIL, why)
    details = {"credential_id": cred.id, "vcenter_host": cred.vcenter_host}
    if cred.vcenter_host != ctx.vcenter_host and not ctx.credential_id:
        return _check("Credentials", WARN, f"{why} is for vCenter {quote(cred.vcenter_host)}, the VM is in "
                      f"{quote(ctx.vcenter_host)}", details)
    return _check("Credentials", PASS, f"vCenter calls use {why}", details)


def configuration_check(vm_id: str) -> tuple[VmReplicationContext, dict[str, Any]]:
    """Mappings, volumes, a completed replication, the CloudStack configuration and the vCenter
    credential; overall fail if any check fails, else warning if any warns."""
    ctx = resolve(vm_id)
    checks = [_mappings_check(ctx), _volumes_check(ctx), _existence_check(ctx), _config_check(),
              _credentials_check(ctx)]
    statuses = [c["status"] for c in checks]
    return ctx, {
        "overall_status": FAIL if FAIL in statuses else WARN if WARN in statuses else PASS,
        "checks": checks,
        "total_checks": len(checks),
        "passed_checks": statuses.count(PASS),
        "warning_checks": statuses.count(WARN),
        "failed_checks": statuses.count(FAIL),
        "validated_at": utcnow(),
    }

