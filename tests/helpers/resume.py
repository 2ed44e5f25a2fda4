"""What the resume tests share: the agent's settings for a copy that can be killed half-way, the slack a
resume may rewrite, the bytes the OMA's NBD exports wrote (measured on the target side), the job's log
messages and the replicas-equal-sources check."""
from __future__ import annotations

import os
from pathlib import Path

from oma_server.db import models
from omalab.lab import sha256_prefix

MiB = 1024 * 1024
CHECKPOINT_MIB = 4
# Beyond the uncopied part a resume may rewrite one checkpoint interval per disk plus one request at its
# edge (docs/design/resume.md), and nbdkit's NBD replies count as writes too (16 bytes per request).
SLACK = 2 * (CHECKPOINT_MIB * MiB + 2 * MiB) + 256 * 1024
AGENT = {"source_rate_limit_mbps": 16, "checkpoint_interval_mib": CHECKPOINT_MIB,
         "checkpoint_interval_seconds": 1, "connections_per_disk": 1}


def export_bytes_written(job_id: str) -> int:
    """Bytes the nbdkit processes serving ``job_id``'s exports passed to write(2) so far."""
    names = [e.export_name for e in models.NbdExport.select().where(models.NbdExport.job == job_id)]
    total, found = 0, set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if not argv or not argv[0].endswith(b"nbdkit"):
                continue
            name = next((n for n in names if any(n.encode() in a for a in argv)), None)
            if name is None:
                continue
            io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        except (FileNotFoundError, ProcessLookupError):
            continue
        found.add(name)
        total += int(io["wchar"])
    assert found == set(names), f"no nbdkit found for {set(names) - found}"
    return total


def job_messages(job_id: str) -> list[str]:
    return [e.message for e in models.LogEvent.select().where(models.LogEvent.external_job_id == job_id)]


def assert_replicas_equal(lab, vm: str, context_id: str) -> None:
    for disk in models.VmDisk.select().where(models.VmDisk.vm_context == context_id):
        volume = models.OsseaVolume.get_by_id(disk.ossea_volume_id)
        source = lab.vcenter.disk_file(vm, disk.disk_id)
        size = os.path.getsize(source)
        assert sha256_prefix(lab.volume_file(volume.volume_id), size) == sha256_prefix(source, size), disk.disk_id
