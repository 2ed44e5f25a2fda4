#!/usr/bin/env python3
"""Benchmark the data mover's copy engine against ``nbdcopy``.

    .venv/bin/python bench/datamover.py [--size 4G] [--runs 5] [--dir DIR]

1. Builds a sparse source image (default 4 GiB) with ~50 % pseudo-random data spread
   over many extents (64 KiB .. 4 MiB), serves it read-only with ``nbdkit file`` on a
   unix socket.
2. Full copy, ``--runs`` times with each tool (order alternating), each into a fresh
   sparse target served by ``nbdkit file`` on a unix socket: ``nbdcopy SRC DST``
   (default options) and ``copy_disk`` (data extents = SEEK_DATA/SEEK_HOLE of the
   source, zero extents = the rest, flush at the end). Every target must have the
   source's sha256.
3. ``--runs`` times: changes another ~1 % of the source in scattered 64 KiB blocks,
   copies only those extents into our target (incremental), checks the sha256 again.

Prints MB/s (disk bytes per second), CPU seconds (the client's, and with both nbdkit
servers': on a shared machine that is the steadier measure), ``ratio vs nbdcopy: X`` (our
throughput / nbdcopy's, median run of each: a single lucky quiet moment on a shared
machine decides a best-of comparison) and ``incremental/full time: Y`` (median
incremental / median full copy of ours); the best-of values are printed too. Exits 1 if
a checksum differs (never because of speed). Temporary files are removed.

The images go to /dev/shm when it has room (else the system temp dir): on tmpfs the
flush our engine sends at the end is as cheap as nbdcopy's lack of one (nbdcopy does not
flush by default), and disk writeback from other processes does not decide the result.
A throw-away write of the target's size first pre-faults memory, so the first timed
copy does not pay the VM's first-touch cost alone.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omalab.disk_images import allocated as allocated_extents  # noqa: E402
from vma_agent.datamover import copy_disk, plan_full_copy, plan_incremental_copy
from vma_agent.integrations.nbdkit import NbdkitServer, file_plugin_args

MiB = 1024 * 1024
GiB = 1024 * MiB
POOL = 64 * MiB
ALIGN = 64 * 1024


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1024, "M": MiB, "G": GiB, "T": 1024 * GiB}.get(text[-1:], 1)
    return int(float(text.rstrip("KMGT")) * mult)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 * MiB)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def make_source(path: str, size: int, fraction: float, seed: int) -> int:
    """Sparse file, ``fraction`` of it pseudo-random data in extents of 64 KiB..4 MiB."""
    rnd = random.Random(seed)
    pool = rnd.randbytes(POOL)
    pool2 = pool + pool
    written = 0
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            seg = min(size - pos, rnd.randrange(1, 65) * ALIGN)  # 64 KiB .. 4 MiB
            if rnd.random() < fraction:
                f.seek(pos)
                left = seg
                while left:
                    n = min(left, 8 * MiB)
                    start = rnd.randrange(POOL)
                    f.write(memoryview(pool2)[start:start + n])
                    left -= n
                written += seg
            pos += seg
    return written


def modify_source(path: str, size: int, fraction: float, seed: int) -> list[tuple[int, int]]:
    """Overwrite ``fraction`` of the file in scattered 64 KiB blocks; returns the changed extents."""
    rnd = random.Random(seed)
    nblocks = size // ALIGN
    count = max(1, int(nblocks * fraction))
    blocks = sorted(rnd.sample(range(nblocks), count))
    with open(path, "r+b") as f:
        for b in blocks:
            f.seek(b * ALIGN)
            f.write(rnd.randbytes(ALIGN))
    return [(b * ALIGN, ALIGN) for b in blocks]


def fresh_target(path: str, size: int) -> None:
    Path(path).unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def serve(path: str, readonly: bool) -> NbdkitServer:
    srv = NbdkitServer(file_plugin_args(path, readonly=readonly))
    srv.start()
    return srv


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def run_nbdcopy(src_uri: str, dst_uri: str) -> tuple[float, float]:
    """Wall seconds and nbdcopy's CPU seconds."""
    c = _cpu(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(["nbdcopy", src_uri, dst_uri], check=True)
    return time.perf_counter() - t, _cpu(resource.RUSAGE_CHILDREN) - c


def run_ours(src_uri: str, dst_uri: str, data, zero, opts) -> tuple[float, float, object]:
    """Wall seconds, our process's CPU seconds (the nbdkit servers are not counted for
    either tool), and the CopyResult."""
    c = _cpu(resource.RUSAGE_SELF)
    t = time.perf_counter()
    res = copy_disk(src_uri, dst_uri, data, zero, cancel_event=threading.Event(), **opts)
    return time.perf_counter() - t, _cpu(resource.RUSAGE_SELF) - c, res


def proc_cpu(pid: int | None) -> float:
    """CPU seconds used so far by a running process (Linux /proc), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, TypeError):
        return 0.0


def pick_dir(size: int, fraction: float) -> str | None:
    need = int(size * fraction * 2.5) + GiB  # source + one target + slack
    shm = "/dev/shm"
    try:
        st = os.statvfs(shm)
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    return shm if st.f_bavail * st.f_frsize > need and avail > need + 2 * GiB else None


def prefault(directory: str, nbytes: int) -> None:
    path = os.path.join(directory, "prefault.tmp")
    block = b"\xa5" * (8 * MiB)
    with open(path, "wb") as f:
        f.writelines(block for _ in range(max(1, nbytes // len(block))))
    os.unlink(path)


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4G", help="source disk size (default 4G)")
    ap.add_argument("--runs", type=int, default=5,
                    help="full and incremental runs per tool (best is reported, median too; default 5)")
    ap.add_argument("--dir", default=None, help="where to put the images (default: /dev/shm if it has room, "
                                                "else the system temp dir)")
    ap.add_argument("--fraction", type=float, default=0.5, help="allocated fraction of the source")
    ap.add_argument("--changed", type=float, default=0.01, help="fraction changed for the incremental")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--connections", type=int, default=None)
    ap.add_argument("--queue-depth", type=int, default=None)
    ap.add_argument("--request-size", default=None)
    ap.add_argument("--no-flush", action="store_true", help="do not flush at the end of our copies")
    args = ap.parse_args(argv)

    size = parse_size(args.size)
    opts: dict = {}
    if args.connections:
        opts["connections"] = args.connections
    if args.queue_depth:
        opts["queue_depth"] = args.queue_depth
    if args.request_size:
        opts["request_size"] = parse_size(args.request_size)
    if args.no_flush:
        opts["flush"] = False

    if not shutil.which("nbdkit") or not shutil.which("nbdcopy"):
        print("nbdkit and nbdcopy are required", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="datamover-bench-", dir=args.dir or pick_dir(size, args.fraction))
    servers: list[NbdkitServer] = []
    ok = True
    try:
        src = os.path.join(tmp, "source.img")
        t0 = time.perf_counter()
        written = make_source(src, size, args.fraction, args.seed)
        extents = allocated_extents(src)
        data, zero = plan_full_copy(extents, size)
        allocated = sum(n for _, n in data)
        print(f"source: {size / GiB:.2f} GiB, {allocated / GiB:.2f} GiB allocated in {len(data)} extents "
              f"({written / GiB:.2f} GiB written), built in {time.perf_counter() - t0:.1f}s, in {tmp}")
        src_sum = sha256_file(src)
        prefault(tmp, allocated)
        src_srv = serve(src, readonly=True)
        servers.append(src_srv)

        theirs: list[float] = []
        ours: list[float] = []
        cpu: dict[str, list[float]] = {"nbdcopy": [], "ours": []}
        total_cpu: dict[str, list[float]] = {"nbdcopy": [], "ours": []}
        target = os.path.join(tmp, "target.img")
        last = None
        for run in range(1, args.runs + 1):
            for tool in ("nbdcopy", "ours") if run % 2 else ("ours", "nbdcopy"):
                fresh_target(target, size)
                os.sync()  # earlier runs' dirty pages are not this run's cost
                dst = serve(target, readonly=False)
                src_cpu0 = proc_cpu(src_srv.pid)
                try:
                    if tool == "nbdcopy":
                        secs, cpu_s = run_nbdcopy(src_srv.uri, dst.uri)
                        theirs.append(secs)
                    else:
                        secs, cpu_s, last = run_ours(src_srv.uri, dst.uri, data, zero, opts)
                        ours.append(secs)
                    cpu[tool].append(cpu_s)
                    all_cpu = cpu_s + proc_cpu(src_srv.pid) - src_cpu0 + proc_cpu(dst.pid)
                    total_cpu[tool].append(all_cpu)
                finally:
                    dst.stop()
                got = sha256_file(target)
                good = got == src_sum
                ok &= good
                print(f"run {run} {tool:8s}: {secs:6.2f}s {mbps(size, secs):8.1f} MB/s "
                      f"({mbps(allocated, secs):7.1f} MB/s of data), CPU client {cpu_s:5.2f}s + servers "
                      f"{all_cpu - cpu_s:5.2f}s, "
                      f"sha256 {'OK' if good else 'MISMATCH ' + got}")
        if tool != "ours":  # the incremental starts from our full copy: redo it (untimed)
            fresh_target(target, size)
            dst = serve(target, readonly=False)
            try:
                run_ours(src_srv.uri, dst.uri, data, zero, opts)
            finally:
                dst.stop()
        best_theirs, best_ours = min(theirs), min(ours)
        med_theirs, med_ours = statistics.median(theirs), statistics.median(ours)
        ratio = med_theirs / med_ours
        ours_target = target
        print(f"engine: {last.connections} connections x queue depth {opts.get('queue_depth', 'default')}; "
              f"last result: {last}")

        # ---- incremental: each run changes a new set of blocks, copies just those
        inc_times: list[float] = []
        for run in range(1, args.runs + 1):
            changed = modify_source(src, size, args.changed, args.seed + run)
            inc_data, inc_zero = plan_incremental_copy(changed, size)
            new_sum = sha256_file(src)
            os.sync()
            dst = serve(ours_target, readonly=False)
            try:
                inc_secs, _, inc_res = run_ours(src_srv.uri, dst.uri, inc_data, inc_zero, opts)
            finally:
                dst.stop()
            inc_times.append(inc_secs)
            expected = sum(n for _, n in inc_data)
            good = sha256_file(ours_target) == new_sum
            ok &= good
            print(f"run {run} incremental: {len(changed)} extents, {expected / MiB:.1f} MiB in {inc_secs:.3f}s, "
                  f"sha256 {'OK' if good else 'MISMATCH'}")
            if inc_res.bytes_copied + inc_res.bytes_zeroed != expected:
                ok = False
                print(f"incremental wrote {inc_res.bytes_copied + inc_res.bytes_zeroed} bytes, expected {expected}")
        inc_secs = min(inc_times)
        inc_ratio = statistics.median(inc_times) / med_ours

        print()
        print("summary")
        print(f"  disk {size / GiB:.2f} GiB, allocated {allocated / GiB:.2f} GiB, runs {args.runs}")
        print(f"  images in {os.path.dirname(tmp)}")
        for name, times, key in (("nbdcopy", theirs, "nbdcopy"), ("ours   ", ours, "ours")):
            med, best = statistics.median(times), min(times)
            print(f"  {name} full: median {med:.2f}s = {mbps(size, med):.1f} MB/s (best {best:.2f}s = "
                  f"{mbps(size, best):.1f} MB/s); CPU median client {statistics.median(cpu[key]):.2f}s, "
                  f"client+servers {statistics.median(total_cpu[key]):.2f}s")
        print(f"  best-of ratio vs nbdcopy: {best_theirs / best_ours:.2f}; CPU (client+servers) nbdcopy/ours: "
              f"{statistics.median(total_cpu['nbdcopy']) / statistics.median(total_cpu['ours']):.2f}")
        print(f"  incremental ({args.changed:.0%} changed, {len(changed)} extents, {expected / MiB:.1f} MiB): "
              f"median {statistics.median(inc_times):.3f}s, best {inc_secs:.3f}s; "
              f"best/best {inc_secs / best_ours:.3f}")
        print(f"  checksums: {'OK' if ok else 'MISMATCH'}")
        print(f"ratio vs nbdcopy: {ratio:.2f}")
        print(f"incremental/full time: {inc_ratio:.3f}")
    finally:
        for srv in servers:
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
