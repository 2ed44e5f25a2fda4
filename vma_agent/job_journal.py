"""The agent's journal of running replication jobs: one small JSON file per job on local disk.

A job that dies with the agent (kill -9, power loss, appliance restart) leaves its VMware snapshot
behind on purpose: the OMA can resume the copy from it. The journal is how the restarted agent
still knows about that snapshot and about each disk's last checkpoint without any vCenter
credentials (it never holds a password): ``ListInterruptedJobs`` reads it back. An entry is written
when the job's snapshot exists, rewritten at every checkpoint (atomically: temp file, fsync,
rename), and removed when the job ends for good (snapshot removed).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class JournalDisk:
    disk_id: str
    key: int
    previous_change_id: str = ""
    checkpoint_offset: int = 0
    completed: bool = False
    change_id: str = ""


@dataclass
class JournalEntry:
    job_id: str
    context_id: str
    vcenter: str
    vm_moref: str
    snapshot_moref: str = ""
    snapshot_name: str = ""
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    updated_at: str = ""
    disks: dict[str, JournalDisk] = field(default_factory=dict)

    def age_seconds(self, now: datetime | None = None) -> float:
        now = now or datetime.now(timezone.utc)
        return (now - datetime.fromisoformat(self.updated_at or self.started_at)).total_seconds()


class JobJournal:
    """Thread-safe store of :class:`JournalEntry` files in one private directory (0700)."""

    def __init__(self, directory: Path):
        self._dir = Path(directory)
        self._lock = threading.Lock()

    def _path(self, job_id: str) -> Path:
        return self._dir / f"{_SAFE_NAME.sub('_', job_id)}.json"

    def save(self, entry: JournalEntry) -> None:
        with self._lock:  # serialise under the lock: a later state must never be overwritten by an older one
            entry.updated_at = datetime.now(timezone.utc).isoformat()
            data = json.dumps(asdict(entry), indent=1).encode()
            try:
                self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=".tmp-")
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self._path(entry.job_id))
            except OSError as exc:  # the copy goes on; only a later resume would lack this entry
                log.warning("cannot write the job journal in %s: %s", self._dir, exc)

    def remove(self, job_id: str) -> None:
        with self._lock, contextlib.suppress(OSError):
            self._path(job_id).unlink(missing_ok=True)

    def entries(self) -> list[JournalEntry]:
        out = []
        with self._lock:
            files = sorted(self._dir.glob("*.json")) if self._dir.is_dir() else []
            for f in files:
                try:
                    raw = json.loads(f.read_text())
                    raw["disks"] = {k: JournalDisk(**v) for k, v in raw.get("disks", {}).items()}
                    out.append(JournalEntry(**raw))
                except (OSError, ValueError, TypeError) as exc:
                    log.warning("ignoring unreadable job journal entry %s: %s", f, exc)
        return out
