"""Power operations of a :class:`~.session.Session`: state, on, off, guest shutdown, waiting."""
from __future__ import annotations

import time
from collections.abc import Sequence

from pyVmomi import vim

from vma_agent import errors
from vma_agent.integrations.vsphere.plumbing import PC, SessionPlumbing
from vma_agent.integrations.vsphere.properties import parse_time, prop_str
from vma_agent.integrations.vsphere.soap import Connection
from vma_agent.integrations.vsphere.types import PowerInfo, VMHandle

_POWER_PROPERTIES = (
    "name", "config.uuid", "runtime.powerState", "runtime.bootTime",
    "guest.toolsStatus", "guest.toolsRunningStatus",
)


class PowerControl(SessionPlumbing):
    """Power operations of :class:`~.session.Session` (which adds the login they run on)."""

    def power_state(self, vm: VMHandle) -> PowerInfo:
        def read(c: Connection) -> PowerInfo:
            objs = self._retrieve(c, [PC.FilterSpec(
                objectSet=[PC.ObjectSpec(obj=self._mo(c, vim.VirtualMachine, vm.moref))],
                propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=list(_POWER_PROPERTIES))])])
            if not objs:
                raise errors.NotFound(f"VM {vm.moref} does not exist (any more) on vCenter {self.host}")
            p = objs[0][2]
            return PowerInfo(vm.moref, prop_str(p, "name"), prop_str(p, "config.uuid"),
                             prop_str(p, "runtime.powerState") or "unknown", prop_str(p, "guest.toolsStatus"),
                             prop_str(p, "guest.toolsRunningStatus"), parse_time(prop_str(p, "runtime.bootTime")))

        return self._run(read)

    def power_on(self, vm: VMHandle, timeout: float) -> None:
        self._task(lambda c: self._mo(c, vim.VirtualMachine, vm.moref).PowerOnVM_Task(), timeout,
                   f"power-on of VM {vm.name or vm.moref}")

    def power_off(self, vm: VMHandle, timeout: float) -> None:
        self._task(lambda c: self._mo(c, vim.VirtualMachine, vm.moref).PowerOffVM_Task(), timeout,
                   f"power-off of VM {vm.name or vm.moref}")

    def shutdown_guest(self, vm: VMHandle) -> None:
        """Ask the guest OS to shut down (returns at once; GuestOperationUnavailable without tools)."""
        self._run(lambda c: self._mo(c, vim.VirtualMachine, vm.moref).ShutdownGuest())

    def wait_power_state(self, vm: VMHandle, states: Sequence[str], timeout: float,
                         poll: float = 1.0) -> PowerInfo:
        """Poll until the VM is in one of ``states`` or ``timeout`` passed; the last reading."""
        deadline = time.monotonic() + timeout
        delay = min(0.1, poll)
        while True:
            info = self.power_state(vm)
            left = deadline - time.monotonic()
            if info.power_state in states or left <= 0:
                return info
            time.sleep(min(delay, left))
            delay = min(delay * 2, poll)
