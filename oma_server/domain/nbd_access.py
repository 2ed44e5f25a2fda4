"""Who may reach which NBD export (design: docs/security/data.md, "NBD exports").

Two locks on every export of a replication job:

* **TLS with a pre-shared key per job.** nbdkit serves the export with ``--tls=require`` and a PSK file
  holding one identity (the job id) and its key; the key is derived from the encryption key and the job
  id (:func:`export_psk`), so every OMA process on the database derives the same key (a process that
  takes a job over serves its exports again with it) and nothing new is stored. The VMA receives the
  identity and key in its StartReplication request. A client without the key is refused by nbdkit
  during the TLS handshake, before any NBD request, and the data is encrypted on the wire.
* **permitopen per VMA.** An approved VMA's ``authorized_keys`` line lets it forward only to the export
  ports of the running jobs of that VMA (:class:`ExportPermits`). The lines are rewritten from the
  database when a job's exports start and when a job ends (under the key file's lock, atomic write), so
  the grants always follow the jobs, also after a restart or a take-over.

The OMA drives one VMA agent (``OMA_VMA_ADDRESS``); when that address is the OMA end of an approved
VMA's reverse tunnel (``<tunnel_reverse_host>:<its reverse port>``), that VMA runs every job of this OMA
and gets their ports; every other approved VMA gets none. A VMA reached directly (no tunnel, as in the
lab) needs no grant.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from oma_server.db.models import (
    REPLICATION_ACTIVE_STATUSES,
    ConnectionStatus,
    NbdExport,
    ReplicationJob,
    VmaActiveConnection,
    VmaEnrollment,
)
from oma_server.domain.crypto import SecretBox
from oma_server.errors import DomainError, FailedPrecondition
from oma_server.integrations import ssh_keys

log = logging.getLogger("oma_server.nbd_access")

NBD_TLS_PSK_PURPOSE = "nbd-tls-psk"


def export_psk(box: SecretBox, job_id: str) -> bytes:
    """The TLS pre-shared key of a job's NBD exports (32 bytes, derived: the same in every OMA process)."""
    return box.derive(NBD_TLS_PSK_PURPOSE, job_id)


def tunnel_port_of(vma_address: str, reverse_host: str) -> int | None:
    """The reverse tunnel port ``vma_address`` names when it is the OMA end of a VMA's tunnel."""
    host, _, port = vma_address.rpartition(":")
    if host.strip("[]") not in {reverse_host, "127.0.0.1", "localhost", "::1"} or not port.isdigit():
        return None
    return int(port)


def active_export_ports() -> list[int]:
    """Ports of the NBD exports of the replication jobs that are running."""
    rows = (NbdExport.select(NbdExport.port).join(ReplicationJob, on=(NbdExport.job == ReplicationJob.id))
            .where(ReplicationJob.status.in_(REPLICATION_ACTIVE_STATUSES)))
    return sorted({int(row.port) for row in rows})


class ExportPermits:
    """Keeps each approved VMA's ``permitopen`` equal to the export ports of its running jobs."""

    def __init__(self, tunnel: Callable[[], Any], vma_address: str, reverse_host: str):
        self._tunnel, self._vma_address, self._reverse_host = tunnel, vma_address, reverse_host

    def stop(self) -> None:
        """The server stops: its grants are no longer kept by this process."""
        global _installed
        with _installed_lock:
            if _installed is self:
                _installed = None

    def sync(self) -> int:
        """Rewrite the approved VMAs' lines from the database; returns how many lines changed."""
        if not VmaActiveConnection.select().where(
                VmaActiveConnection.connection_status != ConnectionStatus.REVOKED,
                VmaActiveConnection.reverse_tunnel_port.is_null(False)).exists():
            return 0
        tunnel = self._tunnel()
        runner_port = tunnel_port_of(self._vma_address, self._reverse_host)
        # Read the jobs under the key file's lock: two syncs cannot write an older view over a newer one.
        with tunnel.keys.locked():
            ports = active_export_ports()
            grants = []
            rows = (VmaActiveConnection.select(VmaActiveConnection.reverse_tunnel_port, VmaEnrollment.vma_public_key)
                    .join(VmaEnrollment, on=(VmaActiveConnection.enrollment == VmaEnrollment.id))
                    .where(VmaActiveConnection.connection_status != ConnectionStatus.REVOKED,
                           VmaActiveConnection.reverse_tunnel_port.is_null(False)).tuples())
            for reverse_port, public_key in rows:
                key = ssh_keys.parse_public_key(public_key)[0]
                grants.append((key, reverse_port, ports if reverse_port == runner_port else []))
            changed = tunnel.keys.set_open_ports(grants)
        if changed:
            log.info("tunnel grants rewritten: export ports %s for the VMA on reverse port %s", ports or "none",
                     runner_port)
        return changed


_installed: ExportPermits | None = None
_installed_lock = threading.Lock()


def install(permits: ExportPermits | None) -> None:
    """Make ``permits`` the grants that :func:`job_started`/:func:`job_ended` keep (None: none)."""
    global _installed
    with _installed_lock:
        _installed = permits


def job_started(job_id: str) -> None:
    """A job's exports are served: grant its VMA their ports. A grant that cannot be written fails the
    job's step (its VMA could not reach the exports)."""
    permits = _installed
    if permits is None:
        return
    try:
        permits.sync()
    except ssh_keys.SshKeyError as exc:
        raise FailedPrecondition(f"the VMA's tunnel cannot be granted the NBD exports of job {job_id}: {exc}") \
            from None


def job_ended(job_id: str) -> None:
    """A job ended: take its ports away. A failure is logged (the job has ended whatever happens here)
    and corrected by the next job's start or end."""
    permits = _installed
    if permits is None:
        return
    try:
        permits.sync()
    except (ssh_keys.SshKeyError, DomainError) as exc:
        log.warning("job %s ended but the tunnel grants could not be rewritten: %s", job_id, exc)
