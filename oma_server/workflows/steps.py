"""The step loop every workflow runs: ordered named steps, each recorded, skips recorded with their reason.

A workflow is a list of :class:`Step` and a state object the steps share. :func:`run_steps` runs them
in order through a :class:`StepRecorder` (the real one, :class:`JobLogRecorder`, writes job_steps rows
through :mod:`oma_server.domain.joblog`); the loop itself holds no database code, so its rules — stop
before the next step when asked, record a skip instead of running, stop at the first failure or keep
going and collect failures — are tested without a database (tests/unit/test_workflow_runner.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Protocol, Sequence

from oma_server.db.database import database_proxy as db
from oma_server.domain import joblog
from oma_server.domain.joblog import StepFailed, StepHandle


class Stopping(Exception):
    """The process is stopping (or the job was asked to stop) before the next step could start."""


@dataclass(frozen=True)
class Step:
    """One named step; ``run`` gets the workflow's state and a StepHandle whose details are recorded."""

    name: str
    run: Callable[[Any, StepHandle], None]
    # A reason to skip the step (recorded as skipped with that reason), or None to run it.
    skip_if: Callable[[Any], str | None] | None = None


class StepRecorder(Protocol):
    def scope(self) -> ContextManager[Any]:
        """Held while a step's skip rule and body run (the real recorder: one database connection)."""

    def skip(self, name: str, reason: str) -> None: ...

    def step(self, name: str) -> ContextManager[StepHandle]:
        """Records the step around its body; a failure is re-raised as StepFailed naming the step."""


class JobLogRecorder:
    """Records steps as job_steps rows of one JobLog job, one database connection per step."""

    def __init__(self, job_id: str):
        self.job_id = job_id

    def scope(self) -> ContextManager[Any]:
        return db.connection_context()

    def skip(self, name: str, reason: str) -> None:
        joblog.skip_step(self.job_id, name, reason)

    def step(self, name: str) -> ContextManager[StepHandle]:
        return joblog.step(self.job_id, name)


def run_steps(steps: Sequence[Step], state: Any, recorder: StepRecorder, *,
              stop_reason: Callable[[], str | None] = lambda: None, keep_going: bool = False,
              after_step: Callable[[str], None] = lambda name: None,
              on_failure: Callable[[StepFailed], None] = lambda failed: None) -> list[StepFailed]:
    """Run ``steps`` in order. Before each step ``stop_reason()`` is asked: a reason raises
    :class:`Stopping`. A failed step raises its StepFailed, or with ``keep_going`` is collected — and
    passed to ``on_failure`` at once, so later skip rules can see it — and the next step runs; the
    collected failures are returned. ``after_step`` runs after every step, whatever happened (the
    runner wakes progress watchers there)."""
    failures: list[StepFailed] = []
    for s in steps:
        reason = stop_reason()
        if reason:
            raise Stopping(reason)
        with recorder.scope():
            try:
                skip = s.skip_if(state) if s.skip_if else None
                if skip:
                    recorder.skip(s.name, skip)
                else:
                    with recorder.step(s.name) as handle:
                        s.run(state, handle)
            except StepFailed as exc:
                if not keep_going:
                    raise
                failures.append(exc)
                on_failure(exc)
            finally:
                after_step(s.name)
    return failures
