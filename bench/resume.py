#!/usr/bin/env python3
"""How much a crashed copy costs: kill the VMA agent (SIGKILL) at 50 % of a full copy, restart it,
resume the job from the last checkpoints its progress stream reported.

    .venv/bin/python bench/resume.py [--size 1G] [--kill-at 50] [--checkpoint-mib 64] [--dir DIR]
    .venv/bin/python bench/resume.py --size 8G      # the issue's case (needs ~2x the size on disk)

1. Starts the simulated vCenter with one VM of two disks of ``--size``/2 each, filled with
   pseudo-random data (with holes), a real ``vma-agent`` process (source_mode=file) and two
   replica files served by ``nbdkit file`` with the log filter (every write the target receives
   is logged: the measurement is taken on the target side).
2. Starts a full copy of both disks; at ``--kill-at`` percent (once each disk has a
   checkpoint) SIGKILLs the agent, starts it again and re-submits the job with the snapshot and
   each disk's last checkpoint.
3. Prints ``ratio:`` = bytes written after the restart / bytes that were not yet written when
   the agent died (goal <= 1.05: the resumed run rewrites at most one checkpoint interval per
   disk more, so the ratio depends on the interval against what is left: with the agent's
   default 64 MiB, 1.02 at 8G but up to 1.3 at the small default size), ``resume seconds:`` = from the restarted agent being ready to the
   first byte reaching a replica (goal <= 10 s), and checks both replicas' sha256 against the
   source disks (exit 1 when they differ, never because of a ratio or a time).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omalab.nbd_records import file_sha256  # noqa: E402
from omalab.resume_harness import Target, kill_and_resume, start_request  # noqa: E402
from omalab.vcsim import VCSim  # noqa: E402
from omalab.vma_process import VmaProcess  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1024, "M": MiB, "G": GiB}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * mult)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1G", help="total of both disks (default 1G; the issue's case: 8G)")
    p.add_argument("--kill-at", type=float, default=50.0, help="percent of the copy at which the agent dies")
    p.add_argument("--checkpoint-mib", type=int, default=64, help="checkpoint interval in MiB (default 64: the agent default)")
    p.add_argument("--checkpoint-seconds", type=float, default=5.0)
    p.add_argument("--rate-mbps", type=float, default=0.0, help="VMA_SOURCE_RATE_LIMIT_MBPS (0 = unlimited)")
    p.add_argument("--dir", help="folder for the replicas (default: a temp dir)")
    args = p.parse_args()
    disk = parse_size(args.size) // 2 // MiB * MiB
    work = Path(tempfile.mkdtemp(prefix="bench-resume-", dir=args.dir))
    t0 = time.monotonic()
    with VCSim(vms=1, disks=2, disk_size=f"{disk // MiB}MiB", data_vms=1) as sim:
        print(f"simulator ready with 2 x {disk / GiB:.2f} GiB in {time.monotonic() - t0:.1f}s", flush=True)
        vm = sim.data_vms[0]
        targets = [Target.create(work, 2000 + i, disk) for i in range(2)]
        agent = VmaProcess(work / "vma", datastore_map=",".join(f"{k}={v}" for k, v in sim.datastores.items()),
                           source_rate_limit_mbps=args.rate_mbps, checkpoint_interval_mib=args.checkpoint_mib,
                           checkpoint_interval_seconds=args.checkpoint_seconds, progress_interval_seconds=0.2)
        agent.start()
        try:
            m = kill_and_resume(agent, start_request(sim, vm, "bench-resume", targets), targets,
                                kill_at_percent=args.kill_at, timeout=7200)
            same = all(file_sha256(t.path) == file_sha256(sim.disk_file(vm, i)) for i, t in enumerate(targets))
        finally:
            agent.stop()
            for t in targets:
                t.server.stop()
    for t in targets:
        t.path.unlink(missing_ok=True)
    ok = same and m.final.status == 3
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept for inspection: {work} (agent.log, the replicas' nbdkit logs)")
    print(f"killed at: {m.killed_at_percent:.1f} % (checkpoints {', '.join(f'{k}={v / MiB:.0f} MiB' for k, v in m.checkpoints.items())})")
    print(f"planned: {m.planned / MiB:.0f} MiB; written before the kill: {m.written_before_kill / MiB:.0f} MiB; "
          f"left: {m.uncopied / MiB:.0f} MiB; written after the restart: {m.rewritten_after_restart / MiB:.0f} MiB")
    print(f"job: {m.final.status and 'succeeded' if m.final.status == 3 else m.final.last_error}; "
          f"{m.final.resume_summary}")
    bound = 1 + 2 * args.checkpoint_mib * MiB / m.uncopied if m.uncopied else float("inf")
    print(f"ratio: {m.ratio:.3f} (goal <= 1.05; design bound 1 + one interval per disk / left = {bound:.3f} "
          f"with the checkpoint interval {args.checkpoint_mib} MiB / {args.checkpoint_seconds:g} s)")
    print(f"resume seconds: {m.resume_seconds:.2f} (goal <= 10)")
    print(f"replicas equal to the source: {same}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
