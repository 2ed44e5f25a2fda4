"""Async jobs: a job is pending for a configurable time, then its work runs under the state lock.

Like CloudStack's async job manager, work runs whether or not anyone polls
``queryAsyncJobResult``; a job's outcome (and every side effect such as a device link appearing)
becomes visible only when it completes.  One worker thread runs due jobs in due-time order, which
also serialises them the way CloudStack's per-VM work queues do.
"""
from __future__ import annotations

import heapq
import itertools
import sys
import threading
import time
import traceback
from collections.abc import Callable

from .errors import ApiError
from .state import Job, State, now_str

__all__ = ["JobRunner"]


class JobRunner:
    def __init__(self, state: State) -> None:
        self._state = state
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Job, Callable[[], dict], Callable[[], None] | None]] = []
        self._seq = itertools.count()
        self._running = 0
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="cloudstack-emulator-jobs",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def clear(self) -> None:
        """Forget queued jobs (used by reset)."""
        with self._cond:
            self._heap.clear()
            self._cond.notify_all()

    def submit(self, job: Job, work: Callable[[], dict], on_fail: Callable[[], None] | None,
               delay: float) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), job, work, on_fail))
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._heap) + self._running

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no job is queued or running (jobs delayed for longer make this time out)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._heap or self._running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop:
                    if self._heap and self._heap[0][0] <= time.monotonic():
                        break
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(wait)
                if self._stop:
                    return
                _, _, job, work, on_fail = heapq.heappop(self._heap)
                self._running += 1
            try:
                self._run(job, work, on_fail)
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()

    def _run(self, job: Job, work: Callable[[], dict], on_fail: Callable[[], None] | None) -> None:
        with self._state.lock:
            if self._state.jobs.get(job.id) is not job:
                return  # state was reset meanwhile
            try:
                result = work()
            except Exception as exc:  # noqa: BLE001 - every failure must end the job
                if isinstance(exc, ApiError):
                    code, text = exc.job_errorcode, exc.errortext
                else:  # an emulator bug: report it the way CloudStack reports unexpected exceptions
                    traceback.print_exc(file=sys.stderr)
                    code, text = 530, f"{type(exc).__name__}: {exc}"
                self._finish(job, 2, code, {"errorcode": code, "errortext": text})
                if on_fail is not None:
                    try:
                        on_fail()
                    except Exception:  # noqa: BLE001 - keep the job thread alive
                        traceback.print_exc(file=sys.stderr)
            else:
                self._finish(job, 1, 0, result)
            try:
                self._state.sync_links()
            except OSError:
                traceback.print_exc(file=sys.stderr)

    @staticmethod
    def _finish(job: Job, status: int, code: int, result: dict) -> None:
        job.status = status
        job.resultcode = code
        job.result = result
        job.completed = now_str()
