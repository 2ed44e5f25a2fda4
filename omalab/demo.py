"""The local lab: a real migration of a simulated vSphere VM to an emulated CloudStack, on this machine.

Four real processes, each on a free port, all in one work folder:

    simulated vCenter  python -m omalab.vcsim               VMs whose disks are raw files, with exact CBT
    CloudStack         python -m omalab.cloudstack_emulator volumes are files; attached ones show in a by-id folder
    VMA agent          vma-agent (source mode "file")       reads the VM disks and copies them over NBD
    OMA server         oma-server (SQLite)                  the control plane that omactl talks to

Then the demo works only through ``omactl``, as an operator would: log in, save the vCenter credential,
configure CloudStack, discover, add a VM, replicate it in full, let the "guest" write a few blocks,
replicate again (incremental). It checks the result itself: every replica volume holds the exact bytes
of its source disk (sha256), and the incremental run copied only the changed blocks. Then it runs a test
failover: completes the CloudStack settings (template, compute offering) and maps the VM's networks,
checks readiness, boots the VM in CloudStack with live step progress, shows the destination VM, ends
the test and checks that the test VM is gone, the VM is ready for failover again and the replicas still
equal the source disks.

    scripts/lab                                   # setup, then this demo (the README's main command)
    scripts/lab --no-setup --vms 6 --disk-size 256MiB
    scripts/lab --keep --workdir /tmp/lab         # keep the work folder (logs, database, volumes)
    scripts/lab --stay                            # leave the lab running to try omactl yourself

Exit status: 0 when the migration and every check succeeded, 1 on a failure (the message says which
step), 130 when interrupted. Everything started is stopped on the way out (process groups, and this
process adopts any orphan as "child subreaper", ``omalab.processes``), and the work folder is removed
unless --keep. Run as ``python -m omalab.demo`` (what ``scripts/lab`` does).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from omalab.checksums import sha256_prefix
from omalab.processes import LabError, Processes, become_subreaper, free_port, wait_healthy

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin folder: vma-agent, oma-server, omactl
PYTHON = sys.executable
MIB = 1 << 20
WRITE_SIZE = 4096  # one simulated guest write
SERVING = r"serving on port (\d+)"  # what oma-server and vma-agent print once they listen
JSON_LINE = r"^\{.*\}$"  # what the simulator and the emulator print once they listen


# --- printing -------------------------------------------------------------------------------------
_T0 = time.monotonic()
_COLOR = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None


def _style(text: str, code: str) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if _COLOR else text


def step(title: str) -> None:
    print(f"\n{_style('==>', '1;34')} {_style(title, '1')}  [{time.monotonic() - _T0:5.1f}s]", flush=True)


def say(text: str) -> None:
    print(f"    {text}", flush=True)


def size(n: float) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.0f} KiB" if n >= 1024 else f"{int(n)} B"


# --- omactl ---------------------------------------------------------------------------------------
class Omactl:
    """Runs omactl as a separate command, showing each command line first."""

    def __init__(self, env: dict[str, str]):
        self.env = env

    def _argv(self, args: tuple[str, ...]) -> list[str]:
        return [str(BIN / "omactl"), *args]

    def run(self, *args: str, stdin: str | None = None, quiet_stderr: bool = False) -> None:
        """Output straight to the terminal (live progress included); fails on a non-zero exit."""
        print(f"\n{_style('$ omactl ' + shlex.join(args), '1;32')}"
              + (_style("   <<< secret on stdin", "2") if stdin is not None else ""), flush=True)
        proc = subprocess.run(self._argv(args), cwd=REPO, env=self.env, text=True,
                              input=stdin + "\n" if stdin is not None else None,
                              stderr=subprocess.PIPE if quiet_stderr else None)
        if proc.returncode != 0:
            detail = f":\n{proc.stderr.strip()}" if quiet_stderr and proc.stderr else ""
            raise LabError(f"'omactl {args[0]}{' ' + args[1] if len(args) > 1 else ''}' failed "
                           f"(exit {proc.returncode}){detail}")

    def json(self, *args: str) -> Any:
        """The command's --json answer, for the demo to read (not printed)."""
        print(_style(f"$ omactl {shlex.join(args)} --json   (read by the demo)", "2"), flush=True)
        proc = subprocess.run(self._argv([*args, "--json"]), cwd=REPO, env=self.env, text=True,
                              capture_output=True)
        if proc.returncode != 0:
            raise LabError(f"'omactl {' '.join(args)} --json' failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return json.loads(proc.stdout)


# --- checks ---------------------------------------------------------------------------------------
def seconds_between(start: str, end: str) -> float:
    if not start or not end:
        return 0.0
    return (datetime.fromisoformat(end.replace("Z", "+00:00"))
            - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()


def guest_writes(disks: list[dict[str, Any]], block: int) -> dict[str, int]:
    """Write a few scattered 4 KiB blocks into the live source disks, as a running guest would:
    at the start, in the middle, across a CBT block boundary, near the end. Returns the bytes CBT must
    report changed per disk (whole CBT blocks)."""
    expected = {}
    for index, disk in enumerate(disks):
        capacity = int(disk["capacity"])
        if index == 0:
            offsets = [0, capacity // 3 + 100, (2 * capacity // 3) // block * block - WRITE_SIZE // 2]
        else:
            offsets = [3 * block, capacity - WRITE_SIZE]
        blocks: set[int] = set()
        fd = os.open(disk["path"], os.O_WRONLY)
        try:
            for offset in offsets:
                os.pwrite(fd, os.urandom(WRITE_SIZE), offset)
                blocks |= set(range(offset // block, (offset + WRITE_SIZE - 1) // block + 1))
        finally:
            os.close(fd)
        disk_id = f"disk-{disk['key']}"
        expected[disk_id] = len(blocks) * block
        say(f"{disk_id}: {len(offsets)} writes of 4 KiB at offsets {', '.join(map(str, offsets))} "
            f"-> {len(blocks)} changed CBT block(s) of {block // 1024} KiB")
    return expected


def replication_metrics(text: str) -> list[str]:
    """The non-zero replication samples of a Prometheus text page (not the *_created timestamps)."""
    samples = []
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if line.startswith("oma_replication") and "_created" not in name and float(value or 0):
            samples.append(line)
    return samples


# --- the demo -------------------------------------------------------------------------------------
@dataclass
class LabEndpoints:
    """What the started services told us: addresses, keys and the simulator's inventory."""
    work: Path
    vc: dict[str, Any]  # the simulator's JSON line (address, thumbprint, datastores, data VMs, ...)
    cs: dict[str, Any]  # the emulator's JSON line (url, keys, zone, disk offering, state and by-id dirs)
    oma_address: str
    admin_password: str
    metrics_url: str
    vma_metrics_url: str

    def source_vm(self, name: str) -> dict[str, Any]:
        """The simulator's manifest entry: disks with key, path (the live raw file) and capacity."""
        manifest = json.loads(Path(self.vc["manifest"]).read_text())
        return next(v for v in manifest["vms"] if v["name"] == name)


@dataclass
class Run:
    """One replication as the operator sees it afterwards (``omactl replications show --json``)."""
    job: dict[str, Any]
    cbt_history: list[dict[str, Any]]
    wall_seconds: float  # omactl replicate, end to end (volume set-up included)

    @property
    def bytes(self) -> int:
        return int(self.job["bytes_transferred"])

    @property
    def copy_seconds(self) -> float:  # the job's started -> completed (after the volumes are set up)
        return seconds_between(self.job["started_at"], self.job["completed_at"])


def start_services(args: argparse.Namespace, work: Path, procs: Processes) -> LabEndpoints:
    token, admin_password = secrets.token_urlsafe(24), secrets.token_urlsafe(18)
    data_vms = max(1, args.vms // 2)

    step(f"1. Simulated vCenter: {args.vms} VMs, 2 disks of {args.disk_size} each, {data_vms} with data")
    vcsim = procs.start("vcsim", [
        PYTHON, "-m", "omalab.vcsim", f"-dir={work / 'vcenter'}", f"-vms={args.vms}", "-disks=2",
        f"-disk-size={args.disk_size}", f"-data-vms={data_vms}", "-exit-on-stdin-eof"], keep_stdin_open=True)
    vc = json.loads(procs.ready_line(
        vcsim, JSON_LINE, timeout=900,
        slow_hint="(building the simulated vCenter from Go sources - first run only, may take minutes)").group(0))
    say(f"vCenter {vc['url']} ({vc['about']}), datacenter {vc['datacenters'][0]}, TLS SHA-1 {vc['thumbprint_sha1']}")
    say(f"datastores: {', '.join(f'{k} = {v}' for k, v in vc['datastores'].items())}")

    step("2. CloudStack emulator")
    cloud = procs.start("cloudstack", [PYTHON, "-m", "omalab.cloudstack_emulator", "--port", "0",
                                       "--state-dir", str(work / "cloudstack"), "--job-delay", "0.1"])
    cs = json.loads(procs.ready_line(cloud, JSON_LINE, timeout=60).group(0))
    say(f"API {cs['url']}, zone {cs['zone_id']}, OMA appliance VM {cs['oma_vm_id']} (NIC {cs['oma_mac']})")
    say(f"volumes are files in {cs['state_dir']}/volumes, attached ones appear in {cs['byid_dir']}")

    step("3. VMA agent (reads the VM disks straight from the datastore folders)")
    vma_metrics = free_port()
    vma = procs.start("vma-agent", [str(BIN / "vma-agent")], {
        "VMA_LISTEN": "127.0.0.1:0", "VMA_AUTH_TOKEN": token, "VMA_SOURCE_MODE": "file",
        "VMA_DATASTORE_MAP": ",".join(f"{k}={v}" for k, v in vc["datastores"].items()),
        "VMA_WORK_DIR": str(work / "vma"), "VMA_METRICS_LISTEN": f"127.0.0.1:{vma_metrics}",
        "VMA_PROGRESS_INTERVAL_SECONDS": "0.5"})
    vma_address = f"127.0.0.1:{procs.ready_line(vma, SERVING, timeout=60).group(1)}"
    wait_healthy(vma, vma_address)
    say(f"VMA agent serving gRPC on {vma_address} (healthy)")

    step("4. OMA server (SQLite in the work folder)")
    oma_metrics = free_port()
    nbd_base = 30000 + secrets.randbelow(100) * 100  # ports of the nbdkit exports of the attached volumes
    oma = procs.start("oma-server", [str(BIN / "oma-server")], {
        "OMA_LISTEN": "127.0.0.1:0", "OMA_DATA_DIR": str(work / "oma"),
        "OMA_DB_URL": f"sqlite:///{work / 'oma' / 'oma.db'}", "OMA_ADMIN_PASSWORD": admin_password,
        "OMA_VMA_ADDRESS": vma_address, "OMA_VMA_TOKEN": token, "OMA_DEVICE_DIR": cs["byid_dir"],
        "OMA_DEVICE_WAIT_SECONDS": "10", "OMA_REPLICA_EXTRA_GIB": "0",
        "OMA_NBD_PORT_MIN": str(nbd_base), "OMA_NBD_PORT_MAX": str(nbd_base + 99),
        "OMA_CLOUDSTACK_POLL_INTERVAL_SECONDS": "0.2", "OMA_METRICS_LISTEN": f"127.0.0.1:{oma_metrics}"})
    oma_address = f"127.0.0.1:{procs.ready_line(oma, SERVING, timeout=60).group(1)}"
    wait_healthy(oma, oma_address)
    metrics_url = f"http://127.0.0.1:{oma_metrics}/metrics"
    say(f"OMA server serving gRPC on {oma_address} (healthy), metrics on {metrics_url}")
    say(f"logs of all four: {procs.logs}")
    return LabEndpoints(work, vc, cs, oma_address, admin_password, metrics_url, f"http://127.0.0.1:{vma_metrics}/metrics")


def configure(ctl: Omactl, lab: LabEndpoints) -> None:
    step("5. Operator: log in, save the vCenter credential, configure CloudStack")
    vc, cs = lab.vc, lab.cs
    ctl.run("login", "--target", lab.oma_address, "--password-stdin", stdin=lab.admin_password)
    ctl.run("credentials", "add", "lab-vcenter", "--vcenter", vc["address"], "--username", vc["username"],
            "--datacenter", vc["datacenters"][0], "--thumbprint", vc["thumbprint_sha1"], "--default",
            "--password-stdin", stdin=vc["password"])
    ctl.run("cloudstack", "set", "lab-cloudstack", "--api-url", cs["url"], "--api-key", cs["api_key"],
            "--zone", cs["zone_id"], "--disk-offering-id", cs["disk_offering_id"], "--secret-key-stdin",
            stdin=cs["secret_key"])
    ctl.run("cloudstack", "detect-oma-vm", "--api-url", cs["url"], "--api-key", cs["api_key"], "--persist",
            "--secret-key-stdin", stdin=cs["secret_key"])
    ctl.run("cloudstack", "test")


def replicate(ctl: Omactl, vm: str, *extra: str, quiet: bool) -> Run:
    """``omactl replicate`` with its live progress, then the job as ``replications show`` reports it."""
    started = time.monotonic()
    try:
        ctl.run("replicate", vm, *extra, quiet_stderr=quiet)
    except LabError:
        with contextlib.suppress(LabError, IndexError, KeyError):  # show which step failed, if a job exists
            ctl.run("jobs", "show", ctl.json("replications", "list", "--vm", vm)["jobs"][0]["job_id"])
        raise
    wall = time.monotonic() - started
    job_id = ctl.json("replications", "list", "--vm", vm)["jobs"][0]["job_id"]  # newest first
    shown = ctl.json("replications", "show", job_id)
    return Run(shown["job"], shown["cbt_history"], wall)


def check_jobs(full: Run, incr: Run, changed: dict[str, int], failures: list[str]) -> bool:
    """Both jobs completed with the right type; the incremental copied exactly the changed CBT blocks."""
    for name, run, kind in (("full", full, "initial"), ("incremental", incr, "incremental")):
        j = run.job
        if (j["status"], j["replication_type"]) == ("completed", kind):
            say(f"{name} replication: completed (job {j['job_id']}, type {kind})")
        else:
            failures.append(f"{name} job {j['job_id']} is {j['status']} ({j['replication_type']}), expected "
                            f"completed ({kind}): {j['error_message']}")
    history = {h["disk_id"]: h for h in incr.cbt_history}
    only_changes = incr.bytes == sum(changed.values())
    for disk_id, want in changed.items():
        got = history.get(disk_id, {})
        sent = int(got.get("bytes_transferred", -1))
        ok = got.get("sync_type") == "incremental" and sent == want
        say(f"{disk_id}: the incremental copy sent {size(max(sent, 0))}, the guest changed {size(want)} "
            f"(change id {got.get('previous_change_id', '?')} -> {got.get('change_id', '?')})  "
            f"{'OK' if ok else 'MISMATCH'}")
        if not ok:
            only_changes = False
            failures.append(f"{disk_id}: the incremental copy sent {sent} bytes ({got.get('sync_type')}), "
                            f"the guest changed {want}")
    if incr.bytes != sum(changed.values()):
        failures.append(f"the incremental job copied {incr.bytes} bytes, the guest changed {sum(changed.values())}")
    return only_changes


def check_volumes(ctl: Omactl, lab: LabEndpoints, vm: str, failures: list[str]) -> list[bool]:
    """sha256 of each source disk == sha256 of the first <capacity> bytes of its CloudStack volume.

    omactl shows a disk's replica only as the OMA's numeric volume id, so CloudStack is asked which
    volume it is: the OMA names them migration-<vm>-<disk id>; the uuid gives the emulator's file."""
    import cs as cloudstack_api  # the CloudStack client library the OMA server itself uses

    api = cloudstack_api.CloudStack(endpoint=lab.cs["url"], key=lab.cs["api_key"], secret=lab.cs["secret_key"])
    source = lab.source_vm(vm)
    matches = []
    for disk in ctl.json("vms", "show", vm)["details"]["disks"]:
        src = next(d for d in source["disks"] if f"disk-{d['key']}" == disk["disk_id"])
        name = f"migration-{vm}-{disk['disk_id']}"
        volumes = [v for v in api.listVolumes(name=name, listall=True).get("volume", []) if v["name"] == name]
        if len(volumes) != 1:
            failures.append(f"{disk['disk_id']}: CloudStack has {len(volumes)} volumes named {name}, expected 1")
            continue
        volume, capacity = volumes[0], int(src["capacity"])
        want = sha256_prefix(Path(src["path"]), capacity)
        got = sha256_prefix(Path(lab.cs["state_dir"]) / "volumes" / f"{volume['id']}.img", capacity)
        matches.append(want == got)
        say(f"{disk['disk_id']} ({size(capacity)}): source {want[:16]}...  volume {volume['id']} {got[:16]}...  "
            f"{'match' if want == got else 'DIFFER'}  (attached to {volume.get('vmname', '-')})")
        if want != got:
            failures.append(f"{disk['disk_id']}: volume {volume['id']} does not hold the source disk's bytes")
    if len(matches) != len(source["disks"]):
        failures.append(f"compared {len(matches)} of the {len(source['disks'])} disks of {vm}")
    return matches


@dataclass
class FailoverRun:
    """The test failover as the operator saw it."""
    job: dict[str, Any]  # ``omactl failover status JOB --json``
    destination: dict[str, Any]  # the destination VM as CloudStack listed it while the test ran
    networks: list[str]  # CloudStack networks of its NICs
    cleanup: dict[str, Any]  # the JobLog job that ended the test (``omactl jobs show ID --json``)
    failover_seconds: float  # omactl failover test, end to end
    end_seconds: float  # omactl failover end, end to end
    status_after: str  # the VM's status once the test is over
    replicas_match: bool  # the replica volumes still hold the source disks' bytes afterwards

    @property
    def ok(self) -> bool:
        return (self.job.get("status"), self.cleanup.get("status"), self.status_after) == (
            "completed", "completed", "ready_for_failover") and self.replicas_match


def prepare_failover(ctl: Omactl, lab: LabEndpoints, vm: str) -> None:
    """What a failover needs besides the replica: a template and a compute offering in the CloudStack
    settings, and a CloudStack network for each source network (production for live, isolated for test)."""
    cs = lab.cs
    ctl.run("cloudstack", "set", "lab-cloudstack", "--template-id", cs["template_id"], "--service-offering-id",
            cs["service_offering_id"], "--network-id", cs["network_id"])
    for source in ctl.json("mappings", "status", vm)["source_networks"]:
        ctl.run("mappings", "add", vm, source, cs["network_id"], "--strategy", "production")
        ctl.run("mappings", "add", vm, source, cs["ids"]["network_test"], "--test", "--strategy", "isolated")
    ctl.run("mappings", "status", vm)


def cloudstack_vms(lab: LabEndpoints) -> dict[str, dict[str, Any]]:
    """Every VM CloudStack lists (destroyed ones are not listed), by id."""
    import cs as cloudstack_api

    api = cloudstack_api.CloudStack(endpoint=lab.cs["url"], key=lab.cs["api_key"], secret=lab.cs["secret_key"])
    return {v["id"]: v for v in api.listVirtualMachines(listall=True).get("virtualmachine", [])}


def show_destination(lab: LabEndpoints, vm: str, destination_id: str, failures: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The test VM as CloudStack reports it: running, on the test network, booting from the replica volumes."""
    import cs as cloudstack_api

    api = cloudstack_api.CloudStack(endpoint=lab.cs["url"], key=lab.cs["api_key"], secret=lab.cs["secret_key"])
    found = cloudstack_vms(lab).get(destination_id)
    if found is None:
        failures.append(f"CloudStack has no VM {destination_id} (the test failover's destination)")
        return {}, []
    networks = [nic["networkname"] for nic in found.get("nic", [])]
    say(f"CloudStack VM {found['displayname']} ({found['id']}): {found['state']}, {found['cpunumber']} vCPU, "
        f"{found['memory']} MiB, NICs on {', '.join(networks) or 'no network'}")
    volumes = sorted(api.listVolumes(virtualmachineid=destination_id, listall=True).get("volume", []),
                     key=lambda v: int(v.get("deviceid", 0)))
    for volume in volumes:
        say(f"  device {volume.get('deviceid')}: {volume['name']} ({volume['type']}, {size(int(volume['size']))})")
    if found["state"] != "Running":
        failures.append(f"the test VM {found['id']} is {found['state']}, expected Running")
    if not volumes or any(not v["name"].startswith(f"migration-{vm}-") for v in volumes):
        failures.append(f"the test VM {found['id']} does not boot from the replica volumes of {vm}: "
                        f"{[v['name'] for v in volumes]}")
    if set(networks) != {"test-isolated-network"}:
        failures.append(f"the test VM's NICs are on {networks}, expected the test network only")
    return found, networks


def run_test_failover(ctl: Omactl, lab: LabEndpoints, vm: str, failures: list[str]) -> FailoverRun:
    """``omactl failover test`` with its steps, the destination VM, then ``omactl failover end``."""
    step(f"12. Operator: test failover of {vm} - a copy boots in CloudStack on the test network, the source "
         f"keeps running (live step progress)")
    ctl.run("readiness", vm, "--type", "test")
    started = time.monotonic()
    try:
        ctl.run("failover", "test", vm)
    except LabError:
        with contextlib.suppress(LabError, IndexError, KeyError):  # show which step failed, if a job exists
            ctl.run("failover", "status", ctl.json("failover", "list", "--vm", vm)["failover_jobs"][0]["job_id"])
        raise
    failover_seconds = time.monotonic() - started
    job_id = ctl.json("failover", "list", "--vm", vm)["failover_jobs"][0]["job_id"]  # newest first
    ctl.run("failover", "status", job_id)
    job = ctl.json("failover", "status", job_id)
    destination, networks = show_destination(lab, vm, job["failover_job"]["destination_vm_id"], failures)
    ctl.run("vms", "list")

    step("13. Operator: end the test failover - the test VM is removed, the replica volumes go back to the OMA")
    started = time.monotonic()
    ctl.run("failover", "end", vm)
    end_seconds = time.monotonic() - started
    cleanup = ctl.json("jobs", "show", ctl.json("jobs", "list", "--vm", vm, "--type", "cleanup")["jobs"][0]["id"])
    if destination and destination["id"] in cloudstack_vms(lab):
        failures.append(f"the test VM {destination['id']} still exists after the end of the test")
    elif destination:
        say(f"CloudStack VM {destination['displayname']} ({destination['id']}) is gone")
    ctl.run("vms", "list")
    status_after = ctl.json("vms", "show", vm)["details"]["context"]["current_status"]
    if status_after != "ready_for_failover":
        failures.append(f"{vm} is {status_after} after the end of the test failover, expected ready_for_failover")
    say(f"{vm} is {status_after}; the replica volumes still equal the source disks:")
    before = len(failures)
    matches = check_volumes(ctl, lab, vm, failures)
    return FailoverRun(job["job"], destination, networks, cleanup["job"], failover_seconds, end_seconds,
                        status_after, bool(matches) and all(matches) and len(failures) == before)


def show_metrics(lab: LabEndpoints) -> None:
    import urllib.request

    with contextlib.suppress(OSError, ValueError):
        text = urllib.request.urlopen(lab.metrics_url, timeout=5).read().decode()
        say(f"OMA metrics ({lab.metrics_url}), replication samples:")
        for line in replication_metrics(text):
            say(f"  {line}")


def summary(lab: LabEndpoints, vm: str, disks: int, capacity: int, full: Run, incr: Run, only_changes: bool,
            matches: list[bool], test: FailoverRun, keep: bool) -> None:
    checksums_ok = bool(matches) and all(matches) and len(matches) == disks
    rows = [("VM", "DISKS", "FULL COPIED", "FULL S", "FULL MiB/s", "INCR COPIED", "INCR S", "CHECKSUMS"),
            (vm, f"{disks} x {size(capacity)}", size(full.bytes), f"{full.copy_seconds:.1f}",
             f"{full.bytes / MIB / full.copy_seconds:.1f}" if full.copy_seconds else "-",
             size(incr.bytes), f"{incr.copy_seconds:.1f}",
             f"{'OK' if checksums_ok else 'FAILED'} ({sum(matches)}/{disks})")]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    step("Summary")
    for r in rows:
        say("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    say("(seconds: the copy, from the job's start to its completion; end-to-end times below)")
    print()
    say(f"full replication:        {full.job['status']} (job {full.job['job_id']}; {full.wall_seconds:.1f}s end "
        f"to end with volume set-up)")
    say(f"incremental replication: {incr.job['status']} (job {incr.job['job_id']}; {incr.wall_seconds:.1f}s end "
        f"to end; {'copied only the changed blocks' if only_changes else 'did NOT copy exactly the changed blocks'})")
    say(f"checksums:               {'match' if checksums_ok else 'DO NOT MATCH'} ({sum(matches)} of {disks} disks, "
        f"sha256)")
    destination = f"{test.destination.get('displayname', '?')} {test.destination.get('state', 'missing')} on " \
                  f"{', '.join(test.networks) or 'no network'}"
    say(f"test failover:           {test.job.get('status')} (job {test.job.get('job_id')}; {test.failover_seconds:.1f}s; "
        f"{destination}); ended {test.cleanup.get('status')} (job {test.cleanup.get('id')}; "
        f"{test.end_seconds:.1f}s); {vm} {'back to ' if test.ok else 'is '}{test.status_after}"
        f"{', replicas unchanged' if test.replicas_match else ', replicas CHANGED'}")
    say(f"metrics:                 {lab.metrics_url}  (VMA: {lab.vma_metrics_url})")
    say(f"work folder:             {lab.work}{'' if keep else ' (removed on exit; --keep keeps it)'}")
    say(f"total time:              {time.monotonic() - _T0:.1f}s")


def demo(args: argparse.Namespace, work: Path, procs: Processes) -> int:
    lab = start_services(args, work, procs)
    omactl_config = work / "omactl" / "config.json"
    say(f"export OMACTL_CONFIG={omactl_config}   # omactl's login, for the commands below")
    ctl = Omactl({**procs.run_env, "OMACTL_CONFIG": str(omactl_config)})
    configure(ctl, lab)

    vm = lab.vc["data_vms"][0]
    source = lab.source_vm(vm)
    step(f"6. Operator: discover the vCenter's VMs and put {vm} under management")
    ctl.run("discover")
    ctl.run("add", vm)

    step(f"7. Operator: full replication of {vm} (live progress)")
    full = replicate(ctl, vm, "--full", quiet=args.quiet_progress)

    step(f"8. Guest writes into the running {vm} (scattered blocks on both disks)")
    changed = guest_writes(source["disks"], int(lab.vc["cbt_block_size"]))

    step(f"9. Operator: replicate {vm} again - an incremental copy of the changed blocks (live progress)")
    incr = replicate(ctl, vm, quiet=args.quiet_progress)
    ctl.run("jobs", "show", incr.job["job_id"])
    ctl.run("vms", "show", vm)

    step("10. Checks: the replica volumes equal the source disks; the incremental copied only the changes")
    failures: list[str] = []
    only_changes = check_jobs(full, incr, changed, failures)
    matches = check_volumes(ctl, lab, vm, failures)
    show_metrics(lab)

    step(f"11. Operator: prepare the failover of {vm} - CloudStack template and compute offering, network mappings")
    prepare_failover(ctl, lab, vm)
    test = run_test_failover(ctl, lab, vm, failures)

    summary(lab, vm, len(source["disks"]), int(source["disks"][0]["capacity"]), full, incr, only_changes,
            matches, test, args.keep)
    if failures:
        print(_style("\nFAILED:", "1;31"), flush=True)
        for failure in failures:
            say(failure)
        return 1
    print(_style("\nOK: the VM's disks were replicated in full and incrementally; the replicas match the source; "
                 "a test failover booted it in CloudStack and was ended cleanly.", "1;32"), flush=True)
    if args.stay:
        print(f"\nThe lab keeps running. Try it yourself:\n    export OMACTL_CONFIG={omactl_config}\n"
              f"    {BIN / 'omactl'} vms list\nPress Ctrl-C to stop everything.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/lab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vms", type=int, default=4, help="VMs in the simulated vCenter (default 4; half have data)")
    p.add_argument("--disk-size", default="128MiB", help="capacity of each disk, e.g. 64MiB, 256MiB (default 128MiB)")
    p.add_argument("--workdir", type=Path, help="work folder (default: a new temp folder); must be empty or new")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, database, volumes)")
    p.add_argument("--quiet-progress", action="store_true",
                   help="no live replication progress (for CI logs; the failover's steps are still listed)")
    p.add_argument("--stay", action="store_true", help="leave the lab running after the demo until Ctrl-C")
    args = p.parse_args(argv)
    if args.vms < 1:
        p.error("--vms must be at least 1")
    if not re.fullmatch(r"\d+(B|KiB|MiB|GiB)?", args.disk_size):
        p.error("--disk-size looks like 64MiB, 256MiB or 1GiB")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    if args.workdir:
        work = args.workdir.resolve()
        if work.exists() and any(work.iterdir()):
            print(f"lab: --workdir {work} is not empty; give a new or empty folder", file=sys.stderr)
            return 2
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="oma-lab-"))
    (work / "logs").mkdir()

    # Children get a clean environment: nothing of the caller's OMA_*/VMA_*/OMACTL_* settings, and a
    # run id that marks every process of this lab (the test uses it to prove nothing is left behind).
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("OMA_", "VMA_", "OMACTL_"))}
    run_env["LAB_RUN_ID"] = os.environ.get("LAB_RUN_ID") or uuid.uuid4().hex
    procs = Processes(work / "logs", run_env, announce=lambda line: say(_style(line, "2")))
    become_subreaper()

    def terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    print(f"OMA/VMA migration lab - work folder {work}", flush=True)
    code = 1
    try:
        code = demo(args, work, procs)
    except LabError as exc:
        print(_style(f"\nFAILED: {exc}", "1;31"), file=sys.stderr, flush=True)
        for service in procs.services:
            print(f"\n    last lines of {service.name}'s output:\n{service.tail()}", file=sys.stderr)
        if not args.keep:
            print("\n    (the logs are removed with the work folder; run again with --keep to look at them)",
                  file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        code = 130
    except Exception as exc:  # a bug or an answer the demo did not expect: say so, then clean up as always
        traceback.print_exc()
        print(_style(f"\nFAILED: unexpected {type(exc).__name__}: {exc}", "1;31"), file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave processes behind
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"\nstopping {', '.join(s.name for s in reversed(procs.services)) or 'nothing'}", flush=True)
        procs.stop_all()
        if args.keep:
            print(f"kept the work folder {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
