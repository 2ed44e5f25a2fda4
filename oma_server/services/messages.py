"""Row → message conversions shared by several servicers (one place per resource type)."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from oma.v1 import (
    job_log_pb2,
    machine_groups_pb2,
    network_mappings_pb2,
    resources_pb2,
    vm_contexts_pb2,
    vmware_credentials_pb2,
)

from oma_server.convert import fill
from oma_server.domain import joblog, volumes


def vm_context(ctx: Any, groups: Iterable[dict[str, Any]] = ()) -> resources_pb2.VMContext:
    groups = list(groups)
    return fill(
        resources_pb2.VMContext(), ctx,
        groups=[resources_pb2.VMContextGroup(**g) for g in groups], group_count=len(groups),
    )


def vm_disks(disks: Sequence[Any]) -> list[resources_pb2.VMDisk]:
    """Disk rows with their replica volume (one lookup for all of them)."""
    replicas = volumes.replicas_of(disks)
    messages = []
    for disk in disks:
        replica = replicas.get(disk.ossea_volume_id)
        messages.append(fill(resources_pb2.VMDisk(), disk,
                             replica_volume_uuid=replica.volume_id if replica else None,
                             replica_device_path=replica.device_path if replica else None))
    return messages


def replication_job(job: Any, tracking_job_id: str = "") -> resources_pb2.ReplicationJob:
    return fill(resources_pb2.ReplicationJob(), job, job_id=job.id, tracking_job_id=tracking_job_id or None)


def cbt_entry(row: Any) -> resources_pb2.CBTHistoryEntry:
    return fill(resources_pb2.CBTHistoryEntry(), row)


def context_details(d: Any) -> vm_contexts_pb2.VMContextDetails:
    return vm_contexts_pb2.VMContextDetails(
        context=vm_context(d.context, d.groups),
        current_job=replication_job(d.current_job) if d.current_job else None,
        job_history=[replication_job(j) for j in d.job_history],
        disks=vm_disks(d.disks),
        cbt_history=[cbt_entry(c) for c in d.cbt_history],
        last_operation=joblog.metadata_json(d.last_operation),
    )


def job_step(step: Any) -> job_log_pb2.JobStep:
    return fill(job_log_pb2.JobStep(), step, job_id=step.job_id)


def job(row: Any, steps: Sequence[Any] | None) -> job_log_pb2.Job:
    message = fill(job_log_pb2.Job(), row, parent_job_id=row.parent_job_id,
                   metadata=joblog.metadata_json(row.metadata))
    if steps is not None:
        message.steps.extend(job_step(s) for s in steps)
        fill(message.progress, joblog.progress(row, steps))
    return message


def credential(cred: Any, context_count: int = 0) -> vmware_credentials_pb2.VMwareCredential:
    return fill(vmware_credentials_pb2.VMwareCredential(), cred, context_count=context_count)


def membership(m: Any) -> machine_groups_pb2.VMGroupMembership:
    ctx, group = getattr(m, "vm_context", None), getattr(m, "group", None)
    return fill(
        machine_groups_pb2.VMGroupMembership(), m,
        group_name=group.name if group is not None else None,
        vm_name=ctx.vm_name if ctx is not None else None,
        vmware_vm_id=ctx.vmware_vm_id if ctx is not None else None,
    )


def group(summary: Any) -> machine_groups_pb2.MachineGroup:
    g = summary.group
    message = fill(
        machine_groups_pb2.MachineGroup(), g,
        schedule_name=summary.schedule.name if summary.schedule else None,
        total_vms=summary.total_vms, enabled_vms=summary.enabled_vms, disabled_vms=summary.disabled_vms,
        active_jobs=summary.active_jobs, memberships=[membership(m) for m in summary.memberships],
    )
    if summary.schedule:
        fill(message.schedule, summary.schedule)
    if summary.last_execution:
        fill(message.last_execution, summary.last_execution, execution_id=summary.last_execution.id)
    return message


def network_mapping(row: Any) -> network_mappings_pb2.NetworkMapping:
    return fill(network_mappings_pb2.NetworkMapping(), row)
