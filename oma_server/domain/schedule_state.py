"""The state of one schedule execution, as the scheduler works on it, and its JSON form in
``schedule_executions.execution_details`` (docs/design/scheduler.md#execution-details).

The scheduler thread reads the JSON column into an :class:`ExecutionState`, changes attempts, retries
and chain firings through attributes, and writes :meth:`ExecutionState.to_json` back. The stored shape
is the one the API and the user's mapping describe, so (de)serialisation keeps it exactly: keys that
are absent stay absent (``settled_at``, a chain entry's ``execution_id``, an attempt's ``job_id``,
``error`` …), keys the scheduler does not interpret (``trigger_reason``, ``execution_time`` …) are
carried through unchanged in ``recorded``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from oma_server.db.models import VmMachineGroup, VmReplicationContext
from oma_server.domain.schedule_rules import Attempt, Conflict

FAILED_ATTEMPTS = (Attempt.FAILED, Attempt.CANCELLED, Attempt.DISPATCH_FAILED)


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


@dataclass
class AttemptRecord:
    """``vms[].attempts[]``: one try at replicating a VM in this execution."""

    attempt: int
    at: str
    result: Attempt
    job_id: str | None = None
    error: str | None = None
    conflict_type: Conflict | None = None
    reason: str | None = None
    ended_at: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "AttemptRecord":
        return cls(attempt=int(data["attempt"]), at=data["at"], result=Attempt(data["result"]), job_id=data.get("job_id"),
                   error=data.get("error"), conflict_type=Conflict(data["conflict_type"]) if data.get("conflict_type")
                   else None, reason=data.get("reason"), ended_at=data.get("ended_at"))

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["result"] = self.result.value
        values["conflict_type"] = self.conflict_type.value if self.conflict_type else None
        return _without_none(values)


@dataclass
class VmState:
    """``vms[]``: a VM of the execution, its conflict (if any) and its attempts."""

    vm_context_id: str
    vm_name: str
    group_id: str | None
    group_name: str | None
    conflict_type: Conflict | None = None
    conflict_reason: str | None = None
    current_job_id: str | None = None
    current_job_status: str | None = None
    attempts: list[AttemptRecord] = field(default_factory=list)
    retry_at: str | None = None  # a retry is due then (absent when none is planned)

    @property
    def can_schedule(self) -> bool:
        return self.conflict_type is None

    @property
    def last_result(self) -> Attempt | None:
        return self.attempts[-1].result if self.attempts else None

    def skip(self, conflict: Conflict, reason: str) -> None:
        self.conflict_type, self.conflict_reason = conflict, reason

    @classmethod
    def new(cls, group: VmMachineGroup | None, ctx: VmReplicationContext, job: dict[str, Any] | None,
            conflict: tuple[Conflict, str] | None) -> "VmState":
        """A VM as conflict detection found it (``job``: its active replication job, if any)."""
        return cls(vm_context_id=ctx.context_id, vm_name=ctx.vm_name, group_id=group.id if group else None,
                   group_name=group.name if group else None, conflict_type=conflict[0] if conflict else None,
                   conflict_reason=conflict[1] if conflict else None, current_job_id=job["id"] if job else None,
                   current_job_status=job["status"] if job else None)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "VmState":
        return cls(vm_context_id=data["vm_context_id"], vm_name=data["vm_name"], group_id=data.get("group_id"),
                   group_name=data.get("group_name"),
                   conflict_type=Conflict(data["conflict_type"]) if data.get("conflict_type") else None,
                   conflict_reason=data.get("conflict_reason"), current_job_id=data.get("current_job_id"),
                   current_job_status=data.get("current_job_status"),
                   attempts=[AttemptRecord.from_json(a) for a in data.get("attempts", [])],
                   retry_at=data.get("retry_at"))

    def to_json(self) -> dict[str, Any]:
        values = {
            "vm_context_id": self.vm_context_id, "vm_name": self.vm_name, "group_id": self.group_id,
            "group_name": self.group_name, "has_conflict": not self.can_schedule, "can_schedule": self.can_schedule,
            "conflict_type": self.conflict_type.value if self.conflict_type else None,
            "conflict_reason": self.conflict_reason, "skipped_reason": self.conflict_reason,
            "current_job_id": self.current_job_id, "current_job_status": self.current_job_status,
            "attempts": [a.to_json() for a in self.attempts],
        }
        if self.retry_at is not None:
            values["retry_at"] = self.retry_at
        return values


@dataclass(frozen=True)
class Counters:
    vms_eligible: int = 0
    vms_processed: int = 0
    jobs_created: int = 0
    jobs_completed: int = 0
    jobs_failed: int = 0
    jobs_skipped: int = 0

    @classmethod
    def of(cls, vms: list[VmState]) -> "Counters":
        attempts = [a for vm in vms for a in vm.attempts]
        return cls(
            vms_eligible=len(vms), vms_processed=len(vms), jobs_created=sum(1 for a in attempts if a.job_id),
            jobs_completed=sum(1 for a in attempts if a.result == Attempt.COMPLETED),
            jobs_failed=sum(1 for a in attempts if a.result in FAILED_ATTEMPTS),
            jobs_skipped=sum(1 for vm in vms if not vm.can_schedule) + sum(1 for a in attempts if a.result == Attempt.SKIPPED),
        )

    def columns(self) -> dict[str, int]:
        """The counters that are schedule_executions columns (vms_processed lives in the details)."""
        return {k: v for k, v in asdict(self).items() if k != "vms_processed"}

    def summary(self) -> str:
        return (f"{self.vms_processed} VMs: {self.jobs_created} jobs created, {self.jobs_completed} completed, "
                f"{self.jobs_failed} failed, {self.jobs_skipped} skipped")


@dataclass(frozen=True)
class GroupSummary:
    """``groups[]``: what one group of the schedule gave at dispatch."""

    group_id: str
    group_name: str
    counters: Counters

    def to_json(self) -> dict[str, Any]:
        return {"group_id": self.group_id, "group_name": self.group_name, **asdict(self.counters)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "GroupSummary":
        names = Counters.__dataclass_fields__
        return cls(data["group_id"], data["group_name"], Counters(**{k: v for k, v in data.items() if k in names}))


@dataclass
class ChainFiring:
    """``chain[]``: a chain child due after this execution settled (``execution_id`` once fired; ''
    when it no longer was a chain child)."""

    schedule_id: str
    due_at: str
    execution_id: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ChainFiring":
        return cls(data["schedule_id"], data["due_at"], data.get("execution_id"))

    def to_json(self) -> dict[str, Any]:
        return _without_none(asdict(self))


#: keys ExecutionState reads and writes itself; every other key is kept in ``recorded`` as it was
_OWN_KEYS = {"instance", "job_id", "schedule_name", "vms", "groups", "settled_at", "chain", "summary"}


@dataclass
class ExecutionState:
    """``execution_details`` of a schedule execution."""

    instance: str | None = None  # the OMA process that follows the execution
    job_id: str | None = None  # its ``scheduler/schedule-execution`` JobLog job (none when skipped)
    schedule_name: str | None = None
    vms: list[VmState] | None = None  # None until dispatched
    groups: list[GroupSummary] | None = None
    settled_at: str | None = None  # nothing left to wait for since then
    chain: list[ChainFiring] | None = None
    summary: str | None = None
    recorded: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> "ExecutionState":
        data = dict(data or {})
        return cls(
            instance=data.get("instance"), job_id=data.get("job_id"), schedule_name=data.get("schedule_name"),
            vms=[VmState.from_json(vm) for vm in data["vms"]] if "vms" in data else None,
            groups=[GroupSummary.from_json(g) for g in data["groups"]] if "groups" in data else None,
            settled_at=data.get("settled_at"),
            chain=[ChainFiring.from_json(c) for c in data["chain"]] if "chain" in data else None,
            summary=data.get("summary"),
            recorded={k: v for k, v in data.items() if k not in _OWN_KEYS},
        )

    def to_json(self) -> dict[str, Any]:
        values = dict(self.recorded)
        values.update(_without_none({"instance": self.instance, "job_id": self.job_id,
                                     "schedule_name": self.schedule_name, "settled_at": self.settled_at,
                                     "summary": self.summary}))
        if self.vms is not None:
            values["vms"] = [vm.to_json() for vm in self.vms]
        if self.groups is not None:
            values["groups"] = [g.to_json() for g in self.groups]
        if self.chain is not None:
            values["chain"] = [c.to_json() for c in self.chain]
        return values

    def record(self, **values: Any) -> None:
        """Values kept for readers of the details (status, times, ids) that the scheduler does not read back."""
        self.recorded.update(values)

    def refresh_counters(self) -> Counters:
        """Recompute the counters, summary and created job ids (kept in the details); the counters."""
        vms = self.vms or []
        c = Counters.of(vms)
        self.summary = c.summary()
        self.record(vm_contexts_processed=[vm.vm_context_id for vm in vms],
                    created_job_ids=[a.job_id for vm in vms for a in vm.attempts if a.job_id], **asdict(c))
        return c

    def running_attempts(self) -> list[tuple[VmState, AttemptRecord]]:
        return [(vm, a) for vm in self.vms or [] for a in vm.attempts if a.result == Attempt.RUNNING]

    def waiting(self) -> bool:
        """Replications still running or retries still due."""
        return any(vm.retry_at or any(a.result == Attempt.RUNNING for a in vm.attempts) for vm in self.vms or [])

    def has_open_work(self) -> bool:
        return self.settled_at is None or any(c.execution_id is None for c in self.chain or [])

    def every_vm_completed(self) -> bool:
        return all(vm.last_result == Attempt.COMPLETED for vm in self.vms or [] if vm.attempts)
