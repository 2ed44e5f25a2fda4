"""Power operations of the failover engines (docs/design/replication.md#vma-agent-operations): no gRPC, no pyVmomi.

PowerOff: already off -> "already-off". Otherwise a guest shutdown when VMware Tools run and the
caller did not force it, then wait for poweredOff up to the timeout; still on -> hard power-off when
``force_after_timeout`` ("forced-after-timeout"), else an unsuccessful result that reports the true
state. Forced, or tools unusable, or the guest refused: hard power-off ("forced"). The result
always carries the state read from vCenter at the end.
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vma_agent import errors

if TYPE_CHECKING:
    from vma_agent.integrations.vsphere import PowerInfo, Session, VMHandle, VMRef

log = logging.getLogger(__name__)

GRACEFUL_TOOLS = ("toolsOk", "toolsOld")
POWER_STATES = ("poweredOn", "poweredOff", "suspended")


@dataclass
class PowerResult:
    success: bool
    vm_id: str
    previous_state: str
    new_state: str
    operation: str
    method: str
    duration_ms: int
    timestamp: dt.datetime
    message: str
    tools_status: str


@dataclass
class PowerState:
    vm_id: str
    power_state: str
    tools_status: str
    last_state_change: dt.datetime | None
    uptime_seconds: int
    timestamp: dt.datetime


def _state(info: PowerInfo) -> str:
    return info.power_state if info.power_state in POWER_STATES else "unknown"


def _tools(info: PowerInfo) -> str:
    return info.tools_status or "toolsNotInstalled"


def _vm_id(info: PowerInfo) -> str:
    return info.uuid or info.moref


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def power_off(session: Session, ref: VMRef, *, datacenter: str = "", force: bool = False,
              timeout_seconds: float = 300.0, force_after_timeout: bool = False,
              poll_seconds: float = 1.0) -> PowerResult:
    t0 = time.monotonic()
    vm = session.find_vm(ref, datacenter)
    before = session.power_state(vm)
    previous = _state(before)
    name = before.name or vm.name

    def result(success: bool, method: str, message: str, info: PowerInfo | None = None) -> PowerResult:
        info = info or session.power_state(vm)
        return PowerResult(success, _vm_id(before), previous, _state(info), "power-off", method,
                           int((time.monotonic() - t0) * 1000), _now(), message, _tools(info))

    if previous == "poweredOff":
        return result(True, "already-off", f"VM {name} is already powered off", before)

    graceful = (not force and previous == "poweredOn" and before.tools_status in GRACEFUL_TOOLS
                and before.tools_running_status in ("", "guestToolsRunning"))
    if graceful:
        try:
            session.shutdown_guest(vm)
        except errors.FailedPrecondition as exc:  # tools gone / wrong state: fall back to hard off
            log.info("guest shutdown of %s refused (%s); powering off", name, exc.message)
            graceful = False
        else:
            info = session.wait_power_state(vm, ("poweredOff",), timeout_seconds, poll_seconds)
            if info.power_state == "poweredOff":
                return result(True, "graceful", f"VM {name} shut down by its guest OS", info)
            if not force_after_timeout:
                return result(False, "graceful",
                              f"VM {name} is still {info.power_state} {timeout_seconds:.0f}s after the guest "
                              "shutdown request (force_after_timeout not set)", info)
            log.info("VM %s did not shut down within %.0fs; powering off", name, timeout_seconds)
            _hard_off(session, vm, timeout_seconds)
            return result(True, "forced-after-timeout",
                          f"VM {name} did not shut down within {timeout_seconds:.0f}s and was powered off")

    _hard_off(session, vm, timeout_seconds)
    reason = "forced by the caller" if force else f"tools status {_tools(before)}, state {previous}"
    return result(True, "forced", f"VM {name} powered off ({reason})")


def _hard_off(session: Session, vm: VMHandle, timeout: float) -> None:
    try:
        session.power_off(vm, timeout)
    except errors.FailedPrecondition:
        # already off by now (the guest finished shutting down meanwhile)?
        if session.power_state(vm).power_state != "poweredOff":
            raise


def power_on(session: Session, ref: VMRef, *, datacenter: str = "", timeout_seconds: float = 600.0,
             wait_for_tools: bool = False, tools_timeout_seconds: float = 60.0,
             poll_seconds: float = 5.0) -> PowerResult:
    t0 = time.monotonic()
    vm = session.find_vm(ref, datacenter)
    before = session.power_state(vm)
    previous = _state(before)
    name = before.name or vm.name
    if previous == "poweredOn":
        method, message = "already-on", f"VM {name} is already powered on"
    else:
        session.power_on(vm, timeout_seconds)
        method, message = "power-on", f"VM {name} powered on"
    info = session.power_state(vm)
    if wait_for_tools and info.power_state == "poweredOn" and info.tools_status != "toolsOk":
        deadline = time.monotonic() + tools_timeout_seconds
        while info.tools_status != "toolsOk" and time.monotonic() < deadline:
            time.sleep(min(poll_seconds, max(0.0, deadline - time.monotonic())))
            info = session.power_state(vm)
        if info.tools_status != "toolsOk":
            message += f"; VMware Tools not running after {tools_timeout_seconds:.0f}s ({_tools(info)})"
    return PowerResult(info.power_state == "poweredOn", _vm_id(before), previous, _state(info), "power-on",
                       method, int((time.monotonic() - t0) * 1000), _now(), message, _tools(info))


def power_state(session: Session, ref: VMRef, *, datacenter: str = "") -> PowerState:
    vm = session.find_vm(ref, datacenter)
    info = session.power_state(vm)
    now = _now()
    on = info.power_state == "poweredOn"
    boot = info.boot_time if on else None
    uptime = int((now - boot).total_seconds()) if boot else 0
    return PowerState(_vm_id(info), _state(info), _tools(info), boot, max(uptime, 0), now)
