"""Facts about the machine the OMA runs on (read from /sys): the MAC addresses of its network
interfaces, used to find the OMA's own VM in CloudStack."""
from __future__ import annotations

from pathlib import Path

SYS_NET = Path("/sys/class/net")


def local_mac_addresses(sys_net: Path = SYS_NET) -> list[str]:
    """Lower-case MACs of interfaces that are up (or of unknown state) and not loopback."""
    macs = []
    for iface in sorted(sys_net.iterdir()) if sys_net.exists() else []:
        try:
            mac = (iface / "address").read_text().strip().lower()
            state = (iface / "operstate").read_text().strip()
        except OSError:
            continue
        if iface.name == "lo" or not mac or mac == "00:00:00:00:00:00" or state not in ("up", "unknown"):
            continue
        macs.append(mac)
    return macs
