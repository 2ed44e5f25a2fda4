"""What every vCenter operation of a :class:`~.session.Session` is built on.

:class:`SessionPlumbing` is the base of the operation mixins (:mod:`.inventory`, :mod:`.power`,
:mod:`.snapshots`): running a call with the current login (:meth:`~SessionPlumbing._run`, which
:class:`~.session.Session` implements with re-login and error translation), property-collector
retrievals parsed by :mod:`.properties`, container views and tasks. Keeping it apart lets each
group of operations live in its own module while callers keep one ``Session`` object.
"""
from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pyVmomi import vim, vmodl

from vma_agent import errors
from vma_agent.integrations.vsphere.faults import VSphereFault
from vma_agent.integrations.vsphere.properties import ObjectTuple, parse_objects
from vma_agent.integrations.vsphere.soap import Connection, invoke_raw

PC = vmodl.query.PropertyCollector  # the spec classes of every retrieval
T = TypeVar("T")


class SessionPlumbing(abc.ABC):
    """Base of :class:`~.session.Session` and of its operation mixins."""

    host: str  # the vCenter as named in messages
    fast_parse: bool  # False: parse every answer with ElementTree (reference path)

    @abc.abstractmethod
    def _run(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` with the current connection (errors translated, expired logins renewed)."""

    @abc.abstractmethod
    def _translate(self) -> contextlib.AbstractContextManager[None]:
        """Context that turns vCenter/network failures into :mod:`vma_agent.errors` exceptions."""

    def _mo(self, conn: Connection, cls: type, moref: str) -> Any:
        return cls(moref, conn.stub)

    def _retrieve(self, conn: Connection, specs: list[Any], max_objects: int | None = None) -> list[ObjectTuple]:
        """RetrievePropertiesEx and its continuations: [(type, moref, {path: value})]."""
        pc = conn.content.propertyCollector
        data = invoke_raw(conn.stub, pc, "RetrievePropertiesEx", [specs, PC.RetrieveOptions(maxObjects=max_objects)])
        objs, token = parse_objects(data, self.fast_parse)
        while token:
            data = invoke_raw(conn.stub, pc, "ContinueRetrievePropertiesEx", [token])
            more, token = parse_objects(data, self.fast_parse)
            objs.extend(more)
        return objs

    @contextlib.contextmanager
    def _view(self, conn: Connection, root: Any, types: list[type]) -> Iterator[Any]:
        view = conn.content.viewManager.CreateContainerView(root, types, True)
        try:
            yield view
        finally:
            with contextlib.suppress(Exception):
                view.DestroyView()

    # -- tasks

    def _task(self, start: Callable[[Connection], Any], timeout: float, what: str) -> Any:
        """Start a task and wait for it; returns the task result (pyVmomi object, internal use).

        ``timeout`` bounds a *stall*, not the task: it fails only after the task's state and
        progress stayed the same for that long (removing the snapshot of a multi-terabyte disk
        may consolidate for hours while reporting progress)."""
        task = self._run(start)
        last_seen: tuple[Any, Any] | None = None
        changed_at = time.monotonic()
        delay = 0.02
        while True:
            info = self._run(lambda c: self._mo(c, vim.Task, task._moId).info)
            if info.state == "success":
                return info.result
            if info.state == "error":
                fault = info.error
                with self._translate():
                    if isinstance(fault, BaseException):
                        raise fault
                    raise VSphereFault(f"{what} failed on vCenter {self.host}")
            seen = (info.state, getattr(info, "progress", None))
            if seen != last_seen:
                last_seen, changed_at = seen, time.monotonic()
            elif time.monotonic() - changed_at >= timeout:
                raise errors.DeadlineExceeded(
                    f"{what} on vCenter {self.host} made no progress for {timeout:.0f}s (task {task._moId})")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
