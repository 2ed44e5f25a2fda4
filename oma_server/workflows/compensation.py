"""The compensation saga of a failed failover (docs/design/failover.md#compensation), run as a child job ``failover-compensation``.

Stop and strip the destination VM, destroy it, revert moved volumes from their snapshots (test:
always; live: when driver injection ran), put every volume back on the OMA with its NBD export,
delete the run's snapshots, unlock the mappings. Every step runs even when one fails; the failures
are returned, and the caller leaves the context cleanup_required when there are any.
"""
from __future__ import annotations

import logging
from typing import Any

from oma_server.db.database import database_proxy as db
from oma_server.db.models import (
    JobCategory,
    JobTrackingStatus,
    JobType,
    OsseaVolume,
    SnapshotStatus,
)
from oma_server.domain import (
    failover,
    joblog,
)
from oma_server.workflows.failover_common import FailoverRun, FlowBase
from oma_server.workflows.placement import (
    Placement,
    context_volumes,
    merge_job_metadata,
    tracked_volumes,
    unlock_mappings,
)
from oma_server.workflows.steps import Step, Stopping

log = logging.getLogger("oma_server.failover")


def compensate(flow: FlowBase, run: FailoverRun) -> tuple[bool, list[str]]:
    """The compensation saga as a child job; returns (everything restored, problems)."""
    with db.connection_context(), db.atomic():  # created and leased at once: never an orphan to others
        comp_id = joblog.start_job(JobType.CLEANUP, failover.COMPENSATION_OPERATION, owner="system",
                                   context_id=run.ctx.context_id, parent_job_id=run.job_id,
                                   category=JobCategory.SYSTEM,
                                   metadata={"failover_job_id": run.job_id})
        flow.runner.lease.take(comp_id)
        merge_job_metadata(run.job_id, {"compensation_job_id": comp_id})
    flow.runner.track(comp_id)
    problems: list[str] = []
    place = Placement(flow, run.config)
    vm_cs = flow.cs(run.config, flow.settings.failover_vm_timeout_seconds)
    destinations: list[str] = []

    def find_destinations(state: Any, step: joblog.StepHandle) -> None:
        found = [run.destination_vm_id] if run.destination_vm_id else []
        if run.name_was_free:  # only a VM this run created may be found by its name
            found += [vm.id for vm in vm_cs.find_virtual_machines(run.conf.destination_hostname)]
        destinations.extend(dict.fromkeys(found))
        step.details["destination_vms"] = list(destinations)
        for vm_id in destinations:
            step.details[vm_id] = flow.stop_vm(vm_cs, vm_id)

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
            step.details[vm_id] = flow.destroy_vm(vm_cs, place, run.ctx.context_id, vm_id)

    def revert_targets() -> list[OsseaVolume]:
        wanted = set(run.moved) if run.kind == "test" else set()
        if run.injection_ran and run.volumes:
            wanted.add(run.ordered_volumes()[0][1].volume_id)
        return [v for v in context_volumes(run.ctx.context_id) if v.volume_id in wanted and v.volume_id in run.snapshots]

    def revert(state: Any, step: joblog.StepHandle) -> None:
        snap_cs = flow.cs(run.config, flow.settings.failover_snapshot_timeout_seconds)
        for volume in revert_targets():
            if place.location(volume) == place.oma_vm_id:
                place.detach(volume)  # CloudStack reverts only volumes of a stopped VM or detached ones
            snap_cs.revert_snapshot(run.snapshots[volume.volume_id])
            OsseaVolume.update(snapshot_status=SnapshotStatus.ROLLBACK_COMPLETE).where(
                OsseaVolume.id == volume.id).execute()
            step.details[volume.volume_id] = run.snapshots[volume.volume_id]

    def reattach(state: Any, step: joblog.StepHandle) -> None:
        step.details["reattached"] = flow.reattach_all(place, run.ctx.context_id)

    def delete_snapshots(state: Any, step: joblog.StepHandle) -> None:
        step.details["deleted"] = flow.delete_snapshots(run.config, run.ctx.context_id, only=run.snapshots)

    def unlock(state: Any, step: joblog.StepHandle) -> None:
        step.details["unlocked"] = unlock_mappings(run.ctx.context_id, run.config.oma_vm_id or "")

    steps = [
        Step("destination-vm-shutdown", find_destinations,
             skip_if=lambda _: None if run.destination_vm_id or run.name_was_free else "no destination VM was created"),
        Step("volume-detachment", detach_from_destinations,
             skip_if=lambda _: None if destinations else "no destination VM holds volumes"),
        Step("destination-vm-deletion", destroy, skip_if=lambda _: None if destinations else "no destination VM"),
        Step("cloudstack-snapshot-rollback", revert,
             skip_if=lambda _: None if revert_targets() else "no volume was written by the destination"),
        Step("volume-reattachment-to-oma", reattach),
        Step("cloudstack-snapshot-deletion", delete_snapshots, skip_if=lambda _: (
            "compensation incomplete: snapshots kept for CleanupFailedExecution" if problems else
            (None if run.snapshots or tracked_volumes(run.ctx.context_id) else "no snapshots were made"))),
        Step("volume-mode-switch-oma", unlock),
    ]
    try:
        flow.run_job_steps(comp_id, steps, run, keep_going=True, failures=problems)
    except Stopping:
        problems.append("interrupted: the OMA is stopping")
    with db.connection_context():
        joblog.end_job(comp_id, JobTrackingStatus.FAILED if problems else JobTrackingStatus.COMPLETED,
                       "; ".join(problems) or None)
    flow.runner.untrack(comp_id)
    return not problems, problems

