"""Volume files, device links and the local MAC address.

A CloudStack volume is a sparse file ``<state_dir>/volumes/<uuid>.img`` of the volume's size.
When a volume is attached to the OMA appliance VM, the KVM guest sees a virtio disk whose serial is
the first 20 hex digits of the volume uuid (dashes removed); udev links it as
``/dev/disk/by-id/virtio-<serial>``.  The emulator makes that link in a configurable folder,
pointing at the volume file.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = [
    "byid_name",
    "create_sparse",
    "local_mac",
    "local_macs",
    "restore_into",
    "sparse_copy",
]

_CHUNK = 1 << 20


def byid_name(volume_id: str) -> str:
    """``virtio-<first 20 hex chars of the uuid without dashes>`` (the KVM disk serial)."""
    return "virtio-" + volume_id.replace("-", "")[:20]


def create_sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def _data_extents(fd: int, size: int):
    """Yield (start, end) of the allocated ranges of a file; falls back to the whole file."""
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    return
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, min(end, size)
            pos = end
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        yield pos, size  # SEEK_DATA unsupported: copy the rest, skipping zero chunks


def _copy_extents(src: Path, fdst) -> None:
    size = src.stat().st_size
    with open(src, "rb") as fsrc:
        for start, end in list(_data_extents(fsrc.fileno(), size)):
            fsrc.seek(start)
            pos = start
            while pos < end:
                chunk = fsrc.read(min(_CHUNK, end - pos))
                if not chunk:
                    break
                if chunk.count(0) != len(chunk):
                    fdst.seek(pos)
                    fdst.write(chunk)
                pos += len(chunk)


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new sparse file ``dst`` (only the allocated, non-zero ranges)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "wb") as fdst:
        fdst.truncate(src.stat().st_size)
        _copy_extents(src, fdst)


def restore_into(src: Path, dst: Path) -> None:
    """Make ``dst`` byte-identical to ``src`` in place (same inode, so open handles and links stay valid)."""
    with open(dst, "r+b") as fdst:
        fdst.truncate(0)
        fdst.truncate(src.stat().st_size)
        _copy_extents(src, fdst)
        fdst.flush()
        os.fsync(fdst.fileno())


_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8


def local_macs(sys_class_net: str = "/sys/class/net") -> list[str]:
    """MACs of this machine's interfaces that are up, not loopback and have a real address.

    Interfaces whose ``operstate`` is ``up`` come first, then administratively-up ones.
    """
    found: list[tuple[int, str, str]] = []
    try:
        names = sorted(os.listdir(sys_class_net))
    except OSError:
        return []
    for name in names:
        base = os.path.join(sys_class_net, name)
        try:
            with open(os.path.join(base, "flags")) as f:
                flags = int(f.read().strip(), 16)
            with open(os.path.join(base, "address")) as f:
                mac = f.read().strip().lower()
            try:
                with open(os.path.join(base, "operstate")) as f:
                    oper = f.read().strip()
            except OSError:
                oper = "unknown"
        except (OSError, ValueError):
            continue
        if not flags & _IFF_UP or flags & _IFF_LOOPBACK:
            continue
        if len(mac) != 17 or mac == "00:00:00:00:00:00":
            continue
        found.append((0 if oper == "up" else 1, name, mac))
    return [mac for _, _, mac in sorted(found)]


FALLBACK_MAC = "1e:00:0a:0a:00:0a"


def local_mac() -> str:
    """The MAC the OMA appliance VM should have so "detect the OMA VM by local MAC" works here.

    Falls back to a fixed locally-administered address when the machine has no usable interface.
    """
    macs = local_macs()
    return macs[0] if macs else FALLBACK_MAC
