"""What a disk copy left on its target: file checksums and the writes an nbdkit ``--filter=log`` recorded.

Used by the tests and by the benchmarks (``bench/``), so it lives in the lab package, not in the test tree.
"""
from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike, length: int | None = None) -> str:
    """sha256 of a file's first ``length`` bytes (all of it by default)."""
    h = hashlib.sha256()
    remaining = length if length is not None else -1
    with open(path, "rb") as f:
        while remaining != 0:
            block = f.read(8 * 1024 * 1024 if remaining < 0 else min(remaining, 8 * 1024 * 1024))
            if not block:
                break
            h.update(block)
            if remaining > 0:
                remaining -= len(block)
    return h.hexdigest()


def logged_writes(logfile: str | os.PathLike) -> list[tuple[str, int, int]]:
    """``(kind, offset, length)`` of every Write and Zero request an nbdkit ``--filter=log``
    recorded (``logfile=``): what the target was asked to store, measured on the target side."""
    out: list[tuple[str, int, int]] = []
    try:
        text = open(logfile, encoding="utf-8", errors="replace").read()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        for kind in ("Write", "Zero"):
            marker = f" {kind} id="
            if marker not in line:
                continue
            fields = dict(f.split("=", 1) for f in line.split(marker, 1)[1].split() if "=" in f)
            out.append((kind.lower(), int(fields["offset"], 16), int(fields["count"], 16)))
    return out


def logged_flushes(logfile: str | os.PathLike) -> int:
    """How many Flush requests an nbdkit ``--filter=log`` recorded."""
    try:
        return sum(1 for line in open(logfile, encoding="utf-8", errors="replace") if " Flush id=" in line)
    except FileNotFoundError:
        return 0
