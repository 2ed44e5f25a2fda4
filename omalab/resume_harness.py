"""Kill a real ``vma-agent`` in the middle of a copy, restart it, resume the job, and measure on the
target side what the resumed run wrote (shared by tests/e2e/test_vma_resume.py and bench/resume.py).

The targets are nbdkit file exports with the log filter: every Write/Zero request they received is
in their log with a timestamp, so "rewritten after the restart" and "time to resume" are measured
where the bytes land, not by the agent's own counters.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pyVim.connect import Disconnect
from pyVmomi import vim
from vma.v1 import progress_pb2, vcenter_pb2
from vma.v1 import replication_pb2 as pb

from omalab.nbd_records import logged_writes
from omalab.vcsim import VCSim
from omalab.vma_process import AUTH, VmaProcess
from vma_agent.integrations.nbdkit import NbdkitServer, file_plugin_args

TERMINAL = (progress_pb2.JOB_STATUS_SUCCEEDED, progress_pb2.JOB_STATUS_FAILED, progress_pb2.JOB_STATUS_CANCELLED)


@dataclass
class Target:
    """One replica: a file served by nbdkit (log filter) on a unix socket."""

    disk_key: int
    path: Path
    log: Path
    server: NbdkitServer

    @classmethod
    def create(cls, folder: Path, disk_key: int, size: int) -> Target:
        path, log = folder / f"replica-{disk_key}.img", folder / f"replica-{disk_key}.log"
        with open(path, "wb") as f:
            f.truncate(size)
        server = NbdkitServer(file_plugin_args(path, filters=["log"], filter_params={"logfile": str(log)}),
                              exit_with_parent=True)
        server.start()
        return cls(disk_key, path, log, server)

    def writes(self) -> list[tuple[str, int, int]]:
        return logged_writes(self.log)

    def first_write_after(self, skip: int) -> datetime | None:
        """Local time of the first Write/Zero request after the first ``skip`` ones."""
        seen = 0
        for line in self.log.read_text(errors="replace").splitlines():
            if " Write id=" in line or " Zero id=" in line:
                seen += 1
                if seen > skip:
                    return datetime.fromisoformat(line[:26])
        return None


def snapshot_names(sim: VCSim, vm_name: str) -> list[str]:
    """Names of every snapshot of ``vm_name`` in the simulator (to check no ``srep-*`` is left)."""
    si = sim.connect()
    try:
        view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.VirtualMachine], True)
        vm = next(v for v in view.view if v.name == vm_name)
        names, todo = [], list(vm.snapshot.rootSnapshotList if vm.snapshot else [])
        while todo:
            node = todo.pop()
            names.append(node.name)
            todo.extend(node.childSnapshotList)
        return names
    finally:
        Disconnect(si)


def start_request(sim: VCSim, vm_name: str, job_id: str, targets: list[Target],
                  previous: dict[int, str] | None = None) -> pb.StartReplicationRequest:
    vm = sim.vm(vm_name)
    return pb.StartReplicationRequest(
        job_id=job_id, context_id=f"ctx-{vm_name}",
        connection=vcenter_pb2.VCenterConnection(host=sim.address, username=sim.username, password=sim.password,
                                                 thumbprint=sim.thumbprint_sha1),
        vm=vcenter_pb2.VMReference(path=vm["path"]), enable_cbt=True,
        disks=[pb.ReplicationDisk(disk_id=f"disk-{t.disk_key}", vmware_disk_key=t.disk_key,
                                  target_nbd_uri=t.server.uri, previous_change_id=(previous or {}).get(t.disk_key, ""))
               for t in targets])


def follow(agent: VmaProcess, job_id: str, until_percent: float | None = None,
           timeout: float = 600) -> progress_pb2.JobProgress:
    """Watch the job until it ends (or reaches ``until_percent`` with every disk streaming and
    checkpointed at least once)."""
    latest = None
    for msg in agent.progress().WatchProgress(progress_pb2.WatchProgressRequest(job_id=job_id), metadata=AUTH,
                                              timeout=timeout):
        latest = msg.progress
        if until_percent is not None and latest.percentage >= until_percent and latest.disks and all(
                d.status == progress_pb2.DISK_STATUS_STREAMING and d.checkpoint_offset > 0 for d in latest.disks):
            return latest
        if latest.status in TERMINAL:
            return latest
    assert latest is not None
    return latest


@dataclass
class ResumeMeasure:
    killed_at_percent: float
    planned: int                      # bytes the run plans to write (all disks)
    written_before_kill: int          # target-side bytes of the killed run
    rewritten_after_restart: int      # target-side bytes of the resumed run
    resume_seconds: float             # agent ready -> first byte on a target
    final: progress_pb2.JobProgress
    checkpoints: dict[str, int] = field(default_factory=dict)

    @property
    def uncopied(self) -> int:
        return self.planned - self.written_before_kill

    @property
    def ratio(self) -> float:
        return self.rewritten_after_restart / self.uncopied if self.uncopied else float("inf")


def kill_and_resume(agent: VmaProcess, request: pb.StartReplicationRequest, targets: list[Target],
                    kill_at_percent: float = 50.0, timeout: float = 600) -> ResumeMeasure:
    """Start ``request``, SIGKILL the agent at ``kill_at_percent``, restart it, resume with the
    last checkpoints the progress stream reported, and follow the job to its end."""
    start = {t.disk_key: len(t.writes()) for t in targets}
    agent.replication().StartReplication(request, metadata=AUTH, timeout=60)
    at_kill = follow(agent, request.job_id, until_percent=kill_at_percent, timeout=timeout)
    assert at_kill.status not in TERMINAL, f"the job ended before {kill_at_percent} %: {at_kill}"
    agent.kill()
    time.sleep(0.5)  # let the targets finish what the dead agent had sent
    before = {t.disk_key: len(t.writes()) for t in targets}
    written_before = sum(n for t in targets for _, _, n in t.writes()[start[t.disk_key]:before[t.disk_key]])
    checkpoints = {d.disk_id: d.checkpoint_offset for d in at_kill.disks}
    planned = sum(d.total_bytes for d in at_kill.disks)

    agent.start()
    ready_wall = datetime.now()
    resume = pb.StartReplicationRequest()
    resume.CopyFrom(request)
    resume.resume_snapshot.moref = at_kill.snapshot_moref
    resume.resume_snapshot.name = at_kill.snapshot_name
    for disk in resume.disks:
        disk.resume_offset = checkpoints[disk.disk_id]
    agent.replication().StartReplication(resume, metadata=AUTH, timeout=60)
    final = follow(agent, request.job_id, timeout=timeout)
    rewritten = sum(n for t in targets for _, _, n in t.writes()[before[t.disk_key]:])
    firsts = [w for w in (t.first_write_after(before[t.disk_key]) for t in targets) if w is not None]
    resume_seconds = (min(firsts) - ready_wall).total_seconds() if firsts else float("nan")
    return ResumeMeasure(at_kill.percentage, planned, written_before, rewritten, resume_seconds, final, checkpoints)
