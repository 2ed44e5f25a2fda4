"""Disk images for the data-mover tests and benchmarks: sparse files with known data, garbage-filled
targets, what a file has allocated (SEEK_DATA / SEEK_HOLE), and reads at an offset."""
from __future__ import annotations

import os
import random

KiB, MiB = 1024, 1024 * 1024


def allocated(path) -> list[tuple[int, int]]:
    out, pos = [], 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end - start))
            pos = end
    finally:
        os.close(fd)
    return out


def make_sparse(path, size: int, extents: list[tuple[int, int]], seed: int = 1) -> None:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in extents:
            f.seek(off)
            f.write(rnd.randbytes(n))


def make_garbage(path, size: int) -> None:
    block = bytes(range(256)) * (MiB // 256)
    with open(path, "wb") as f:
        f.writelines(block for _ in range(size // MiB))


def read_at(path, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)
