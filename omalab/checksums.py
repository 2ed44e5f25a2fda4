"""Checksums the lab compares replicas with (the tests and the demo both use them)."""
from __future__ import annotations

import hashlib
from pathlib import Path

MIB = 1 << 20


def sha256_prefix(path: Path, length: int, chunk: int = 4 * MIB) -> str:
    """sha256 of the first ``length`` bytes: a replica volume may be larger than its source disk, and a
    sparse file shorter than ``length`` reads as zeroes to the end, like the disk it stands for."""
    digest, remaining = hashlib.sha256(), length
    with open(path, "rb") as f:
        while remaining:
            block = f.read(min(chunk, remaining)) or b"\0" * remaining
            digest.update(block)
            remaining -= len(block)
    return digest.hexdigest()
