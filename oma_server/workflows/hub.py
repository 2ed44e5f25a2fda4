"""Wakes watchers of a job when its recorded progress changes (within this process).

Every runner has one hub; the step loop notifies it after each step and workflows notify it when they
persist progress. Watch RPCs wait on it with a timeout and re-read the database, so a job run by
another OMA process is still seen, only a little later.
"""
from __future__ import annotations

import threading


class ProgressHub:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._versions: dict[str, int] = {}

    def notify(self, job_id: str) -> None:
        with self._changed:
            self._versions[job_id] = self._versions.get(job_id, 0) + 1
            self._changed.notify_all()

    def version(self, job_id: str) -> int:
        with self._changed:
            return self._versions.get(job_id, 0)

    def wait(self, job_id: str, seen: int, timeout: float) -> int:
        """Block until the job's version differs from ``seen`` or ``timeout`` passes; the version now."""
        with self._changed:
            self._changed.wait_for(lambda: self._versions.get(job_id, 0) != seen, timeout)
            return self._versions.get(job_id, 0)
