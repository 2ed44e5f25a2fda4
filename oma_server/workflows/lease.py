"""The worker lease: which OMA process drives a job, so several processes can share one database.

A leased row carries the name of the process driving it (``worker``) and when that process last said
it is alive (``worker_heartbeat_at``). The runner renews the heartbeat of every job it runs about
three times per lease period. A job is *orphaned* when it is active and has no worker or a heartbeat
older than the lease (and, at start, when the worker is this very process: it was cut by a restart).
Taking an orphaned job is one conditional UPDATE that repeats the orphaned condition, so of several
processes racing for it exactly one changes the row (the database serialises the updates).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable

from oma_server.db.models import utcnow


@dataclass
class Lease:
    model: Any
    worker: Any  # the CharField naming the process
    heartbeat: Any  # the datetime field renewed while it runs
    active: Callable[[], Any]  # the condition of rows that still need a worker
    instance: str
    seconds: float

    def cutoff(self) -> datetime:
        return utcnow() - timedelta(seconds=self.seconds)

    def orphaned(self, *, startup: bool = False) -> Any:
        condition = self.worker.is_null() | (self.heartbeat < self.cutoff())
        if startup:
            condition |= self.worker == self.instance
        return condition

    def _pk(self) -> Any:
        return self.model._meta.primary_key

    def orphans(self, *, startup: bool = False) -> list[Any]:
        """Active rows nobody (alive) drives; ``startup``: also the rows this process drove before."""
        return list(self.model.select().where(self.active(), self.orphaned(startup=startup)))

    def claim(self, job_id: str, *, startup: bool = False) -> bool:
        """Take an orphaned row; False when another process took it first or it is no longer orphaned."""
        return bool(self.model.update({self.worker: self.instance, self.heartbeat: utcnow()}).where(
            self._pk() == job_id, self.active(), self.orphaned(startup=startup)).execute())

    def take(self, job_id: str) -> None:
        """Lease a new job to this process (it was just created here)."""
        self.model.update({self.worker: self.instance, self.heartbeat: utcnow()}).where(
            self._pk() == job_id).execute()

    def renew(self, job_ids: list[str]) -> None:
        if job_ids:
            self.model.update({self.heartbeat: utcnow()}).where(
                self._pk().in_(job_ids), self.worker == self.instance).execute()

    def release_all(self) -> None:
        """Hand back every active lease of this process, so a successor takes the jobs at once."""
        self.model.update({self.worker: None}).where(self.worker == self.instance, self.active()).execute()

    def alive(self, row: Any) -> bool:
        """Driven by a process whose heartbeat is within the lease."""
        beat = getattr(row, self.heartbeat.name)
        return bool(getattr(row, self.worker.name) and beat and beat >= self.cutoff())
