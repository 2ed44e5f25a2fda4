"""The README's main command: ``scripts/lab`` runs a real migration on this machine and cleans up after itself.

The demo runs as a separate process (simulated vCenter, CloudStack emulator, VMA agent, OMA server and
their nbdkit exports as its own children, driven by omactl). We assert its verdict (exit 0, checksums
match, a full and an incremental replication completed, a test failover booted the VM in CloudStack with
its steps shown live and was ended, leaving the VM ready for failover) and that nothing it started
outlives it:

* while it runs, its process tree is sampled from /proc (pid + start time + command line), so every
  pid seen can be checked afterwards without confusing it with a recycled pid;
* every process of the run carries ``LAB_RUN_ID=<uuid>`` in its environment (the demo passes it on to
  all it starts, and nbdkit inherits it), so a scan of /proc/*/environ finds any survivor, also one
  that lived too briefly to be sampled.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240  # well under a minute alone; others run tests concurrently on this 2-core machine


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time in clock ticks) of a process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def _processes() -> dict[int, tuple[int, str, int]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            found[int(entry.name)] = stat
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _descendants(root: int) -> dict[tuple[int, int], str]:
    """{(pid, start time): command line} of every process below ``root``."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[(pid, table[pid][2])] = _cmdline(pid)
        todo += children.get(pid, [])
    return found


def _running(pid: int, started: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[2] == started and stat[1] != "Z"


def _marked(run_id: str) -> list[int]:
    """Live processes whose environment carries this run's marker."""
    marker = f"LAB_RUN_ID={run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in Path(entry, "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return [pid for pid in found if (stat := _stat(pid)) is not None and stat[1] != "Z"]


@pytest.mark.slow
def test_lab_demo_migrates_a_vm_and_leaves_nothing_running(tmp_path):
    run_id = uuid.uuid4().hex
    work = tmp_path / "lab"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMA_", "VMA_", "OMACTL_"))}
    env.update(LAB_RUN_ID=run_id, NO_COLOR="1")
    proc = subprocess.Popen(
        [str(REPO / "scripts" / "lab"), "--no-setup", "--quiet-progress", "--vms", "3", "--disk-size", "64MiB",
         "--workdir", str(work)],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()

    seen: dict[tuple[int, int], str] = {}
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            for key, command in _descendants(proc.pid).items():
                if command or key not in seen:  # an exiting process shows an empty command line
                    seen[key] = command
            time.sleep(0.1)
    finally:
        if proc.poll() is None:  # timed out: let the demo clean up (SIGTERM), then make sure
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            for pid, started in seen:  # only the processes this test's demo started, by pid
                if _running(pid, started):
                    os.kill(pid, signal.SIGKILL)
        reader.join(timeout=10)
    text = "".join(output)
    assert time.monotonic() < deadline, f"the demo did not finish within {TIMEOUT_S}s:\n{text}"

    assert proc.returncode == 0, text
    assert re.search(r"full replication:\s+completed \(job ", text), text
    assert re.search(r"incremental replication:\s+completed \(job .*copied only the changed blocks", text), text
    assert re.search(r"checksums:\s+match \(2 of 2 disks, sha256\)", text), text
    assert re.search(r"^\s+vm-\d+\s+2 x 64\.0 MiB\s+.*OK \(2/2\)$", text, re.M), text  # the summary row
    assert "$ omactl replicate" in text and "$ omactl login" in text  # driven through omactl

    # The test failover, prepared, run and ended through omactl as an operator would.
    for command in ("$ omactl cloudstack set lab-cloudstack --template-id ", "$ omactl mappings add ",
                    "$ omactl readiness ", "$ omactl failover test ", "$ omactl failover end "):
        assert command in text, command
    assert re.search(r"^vm-\d+ is ready for a test failover \(score 100%\)", text, re.M), text
    # Its steps as they progressed (plain lines: the demo's output is not a terminal), then the outcome.
    assert re.search(r"\[ 1/10\] Pre-flight Validation\s+done", text), text
    assert re.search(r"\[ 7/10\] Creating Destination VM\s+done", text), text
    assert re.search(r"\[10/10\] Updating VM Status\s+done", text), text
    assert re.search(r"^unified-test-failover of vm-\d+: job \S+ completed in \S+; destination VM "
                     r"vm-\d+-test-\d+ \(\S+\)$", text, re.M), text
    assert re.search(r"CloudStack VM vm-\d+-test-\d+ \(\S+\): Running, .*NICs on test-isolated-network", text), text
    assert re.search(r"\] Removing Test VM\s+done", text), text
    assert re.search(r"^test-failover-cleanup of vm-\d+: job \S+ completed in ", text, re.M), text
    assert re.search(r"CloudStack VM vm-\d+-test-\d+ \(\S+\) is gone", text), text
    assert re.search(r"^\s+test failover:\s+completed \(job \S+; [\d.]+s; vm-\d+-test-\d+ Running on "
                     r"test-isolated-network\); ended completed \(job \S+; [\d.]+s\); vm-\d+ back to "
                     r"ready_for_failover, replicas unchanged$", text, re.M), text

    # The whole cast was running under the demo (so the checks below are about real processes) ...
    commands = "\n".join(seen.values())
    for part in ("omalab.cloudstack_emulator", "vcsim", "vma-agent", "oma-server", "nbdkit", "omactl"):
        assert part in commands, f"{part} never seen under the demo:\n{commands}"
    # ... and none of it outlives the demo.
    survivors = {pid: cmd for (pid, started), cmd in seen.items() if _running(pid, started)}
    assert not survivors, f"still running after the demo exited: {survivors}"
    assert _marked(run_id) == [], f"processes of this lab run still alive: {_marked(run_id)}"
    assert not work.exists(), "the work folder is removed without --keep"
