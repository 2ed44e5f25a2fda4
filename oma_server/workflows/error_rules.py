"""How a failed failover-family job is explained to an operator (docs/design/jobs.md#step-names-and-error-categories), decided by the error's type.

The failing step raises a typed error — the types below, CloudStack's own error (with its error
code), or a domain error (NOT_FOUND, DEADLINE_EXCEEDED …). :func:`classify` walks :data:`RULES` in
order and the first rule whose type (and, for CloudStack, code) matches gives the category, the
severity, a message without internals and what to do. No rule reads the message text: a reworded
message cannot change the classification. :func:`write_summary` stores the result with the job's
outcome in ``vm_replication_contexts.last_operation_summary``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from oma_server.db.models import JobTracking, JobTrackingStatus, StepStatus, VmReplicationContext, utcnow
from oma_server.domain import joblog
from oma_server.domain.step_names import friendly_step_name
from oma_server.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from oma_server.integrations.cloudstack import CloudStackError


class NotReady(FailedPrecondition):
    """The VM is not in a state a failover can start from (readiness, context status, missing replicas)."""


class InjectionFailed(FailedPrecondition):
    """Preparing the guest's drivers for the destination failed."""


class SnapshotFailed(FailedPrecondition):
    """A replica volume's snapshot could not be created, reverted or deleted."""


class VolumeMoveFailed(FailedPrecondition):
    """A replica volume could not be moved between the OMA and a destination VM."""


class NetworkUnusable(FailedPrecondition):
    """The destination networks of the VM are not mapped or not usable."""


class OfferingUnusable(FailedPrecondition):
    """The zone, template or service offering of the CloudStack configuration is not usable."""


class Interrupted(Exception):
    """The OMA process running the job stopped before it ended."""


# CloudStack's error codes (ApiErrorCode): 401 unauthorized, 431 parameter error, 530 internal error,
# 533 insufficient capacity, 534 resource allocation error, 535 resource unavailable.
_CS_CAPACITY = (533, 534, 535)
_CS_ACCESS = (401, 432)


@dataclass(frozen=True)
class Rule:
    types: tuple[type[BaseException], ...]
    category: str
    severity: str
    user_message: str
    actions: tuple[str, ...]
    when: Callable[[BaseException], bool] = lambda exc: True


RULES: tuple[Rule, ...] = (
    Rule((InjectionFailed,), "compatibility", "error", "Preparing drivers for the destination failed",
         ("Check the guest OS and retry with skip_virtio if drivers are already present",)),
    Rule((NotReady,), "configuration", "warning", "The VM is not ready for failover",
         ("Run GetFailoverReadiness and fix the failed checks",)),
    Rule((CloudStackError,), "platform", "error", "CloudStack has no capacity for the VM",
         ("Free capacity or choose another service offering",), lambda exc: exc.cs_code in _CS_CAPACITY),
    Rule((OfferingUnusable,), "configuration", "error", "The CloudStack template or offering is not usable",
         ("Check template_id and service_offering_id of the CloudStack configuration",)),
    Rule((SnapshotFailed,), "storage", "critical", "Volume snapshots could not be created, reverted or deleted",
         ("Run CleanupFailedExecution to restore the replica volumes",)),
    Rule((VolumeMoveFailed,), "storage", "error", "Moving the replica volumes failed",
         ("Run CleanupFailedExecution to put the volumes back on the OMA",)),
    Rule((NetworkUnusable,), "network", "error", "The destination networks are not usable",
         ("Check the VM's network mappings",)),
    Rule((DeadlineExceeded, Unavailable), "connectivity", "error", "A service did not answer in time",
         ("Check connectivity to CloudStack and the VMA, then retry",)),
    Rule((PermissionDenied, Unauthenticated), "configuration", "error", "Access was refused",
         ("Check the CloudStack keys and the vCenter credential",)),
    Rule((CloudStackError,), "configuration", "error", "Access was refused",
         ("Check the CloudStack keys and the vCenter credential",), lambda exc: exc.cs_code in _CS_ACCESS),
    Rule((NotFound,), "configuration", "error", "A resource no longer exists",
         ("Refresh the VM (replicate again) and retry",)),
    Rule((Interrupted,), "platform", "warning", "The OMA process running the operation stopped",
         ("Run CleanupFailedExecution if resources were moved, then retry",)),
    Rule((CloudStackError,), "platform", "error", "CloudStack refused the operation",
         ("Check the job's failed step and CloudStack's events, then retry",)),
)
_DEFAULT = Rule((BaseException,), "platform", "error", "The operation failed",
                ("Check the job's steps and logs (JobLogService.GetJob)",))


def classify(error: BaseException | None) -> dict[str, Any]:
    """Category, severity, operator message and actions for an error (a StepFailed is read as its cause)."""
    cause = getattr(error, "cause", error)
    rule = next((r for r in RULES if isinstance(cause, r.types) and r.when(cause)), _DEFAULT)
    return {"error_category": rule.category, "error_severity": rule.severity, "user_message": rule.user_message,
            "actionable_steps": list(rule.actions)}


_OPERATION_TYPES: dict[str, str] = {
    "unified-live-failover": "live_failover", "unified-test-failover": "test_failover",
    "test-failover-cleanup": "test_failover_cleanup", "enhanced-live-failover-rollback": "rollback",
    "enhanced-test-failover-rollback": "rollback", "failed-execution-cleanup": "failed_execution_cleanup",
}


def write_summary(job_id: str, context_id: str, error: BaseException | None = None) -> None:
    """The outcome (docs/design/failover.md#operation-summary) of the job, for the GUI, in vm_replication_contexts.last_operation_summary;
    ``error`` (what made a failed job fail) is classified by :func:`classify`."""
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
        sanitised = classify(error)
        summary.update(error_message=sanitised.pop("user_message"), **sanitised)
    VmReplicationContext.update(last_operation_summary=summary).where(
        VmReplicationContext.context_id == context_id).execute()
