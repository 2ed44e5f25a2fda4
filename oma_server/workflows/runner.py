"""The workflow runner: a bounded thread pool, the jobs running in this process, and one keeper thread.

Each engine (replication, failover) owns one runner. The runner knows nothing of what a workflow
does: it runs a callable per job on its pool, remembers which jobs run here (with an optional control
object the engine uses to talk to a running workflow), wakes progress watchers through its
:class:`~oma_server.workflows.hub.ProgressHub`, and runs the keeper thread that renews the leases of
those jobs (:mod:`oma_server.workflows.lease`) and the engine's periodic sweeps (recovery of orphaned
jobs, auto-cleanup). ``stop`` sets :attr:`stopping`, which step loops and waits check, then waits for
the running workflows to return.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from oma_server.db.database import database_proxy as db
from oma_server.workflows.hub import ProgressHub
from oma_server.workflows.lease import Lease

log = logging.getLogger("oma_server.workflows")


class WorkflowRunner:
    def __init__(self, name: str, workers: int, lease: Lease):
        self.name, self.lease = name, lease
        self.hub = ProgressHub()
        self.stopping = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=name)
        self._running: dict[str, Any] = {}  # job id → the engine's control object for it (or None)
        self._lock = threading.Lock()
        self._periodic: list[list[Any]] = []  # [period seconds, callable, last run (monotonic)]
        self._keeper = threading.Thread(target=self._keep, name=f"{name}-keeper", daemon=True)

    @property
    def instance(self) -> str:
        return self.lease.instance

    # --- the jobs running here --------------------------------------------------------------------
    def submit(self, job_id: str, work: Callable[[], None], control: Any = None) -> bool:
        """Run ``work`` for the job on the pool; False when it already runs here or the runner stops."""
        if not self.track(job_id, control):
            return False
        try:
            self._pool.submit(self._run, job_id, work)
        except RuntimeError:  # the pool is shut down: the next start recovers the job
            self.untrack(job_id)
            log.warning("%s job %s not started: the OMA is stopping", self.name, job_id)
            return False
        return True

    def _run(self, job_id: str, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:  # noqa: BLE001 - the engine's work ends its job itself; this is a last resort
            log.exception("%s job %s crashed", self.name, job_id)
        finally:
            self.untrack(job_id)

    def track(self, job_id: str, control: Any = None) -> bool:
        """Count a job as running here (its lease is renewed) — also one run inline, e.g. a child job."""
        with self._lock:
            if job_id in self._running:
                return False
            self._running[job_id] = control
            return True

    def untrack(self, job_id: str) -> None:
        with self._lock:
            self._running.pop(job_id, None)
        self.hub.notify(job_id)

    def is_running(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._running

    def control(self, job_id: str) -> Any:
        with self._lock:
            return self._running.get(job_id)

    def running(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._running)

    # --- the keeper -------------------------------------------------------------------------------
    def every(self, seconds: float, task: Callable[[], None]) -> None:
        """Run ``task`` on the keeper thread every ``seconds`` (within a database connection)."""
        if seconds > 0:
            self._periodic.append([seconds, task, time.monotonic()])

    @property
    def renew_seconds(self) -> float:
        return max(0.2, min(10.0, self.lease.seconds / 3))

    def start(self) -> None:
        self._keeper.start()

    def _keep(self) -> None:
        tick = min([self.renew_seconds, *(p[0] for p in self._periodic)])
        last_renew = time.monotonic()
        while not self.stopping.wait(tick):
            now = time.monotonic()
            try:
                with db.connection_context():
                    if now - last_renew >= self.renew_seconds:
                        last_renew = now
                        self.lease.renew(list(self.running()))
                    for periodic in self._periodic:
                        if now - periodic[2] >= periodic[0]:
                            periodic[2] = now
                            periodic[1]()
            except Exception:  # noqa: BLE001 - a database hiccup must not end lease keeping
                log.exception("%s: renewing leases or a sweep failed; trying again", self.name)

    def stop(self) -> None:
        """Tell running workflows to stop, wait for them, end the keeper."""
        self.stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._keeper.is_alive():
            self._keeper.join(timeout=5)
