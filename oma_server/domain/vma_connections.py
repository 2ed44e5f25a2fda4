"""Liveness of the approved VMAs' tunnels (docs/design/enrollment.md#connection-monitor).

The original matched the system's login table against key fingerprints, which never matched, and was
never started (E-12). Here liveness comes from the tunnel itself: each pass calls the VMA's health
service through its reverse-forward port on the OMA (``vma_active_connections.reverse_tunnel_port``).

* success → ``last_seen_at = now``; a ``disconnected`` connection becomes ``connected`` again (audit
  ``connection``, detected by the monitor);
* no success for ``disconnect_after`` since it was last seen (or, never seen, since it was approved)
  → ``disconnected`` (audit ``disconnection``, reason ``connection_timeout``);
* ``revoked`` is terminal: revoked connections are never probed (their port is released), and every
  write is conditional on the status it read, so a revocation during a pass always wins.

Probes run outside any transaction (a dead tunnel costs a connect timeout); each write is one short
transaction with its audit row.
"""
from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import Callable

from oma_server.db.database import database_proxy as db
from oma_server.db.models import (
    AuditEventType,
    ConnectionStatus,
    VmaActiveConnection,
    VmaConnectionAudit,
    utcnow,
)

log = logging.getLogger("oma_server.enrollment")

MONITOR = "monitor"

#: ``probe(reverse_tunnel_port) -> True`` when the VMA answered its health check through the tunnel.
Probe = Callable[[int], bool]


def _audit(event_type: AuditEventType, connection: VmaActiveConnection, **details: object) -> None:
    VmaConnectionAudit.create(
        enrollment=connection.enrollment_id, event_type=event_type, vma_fingerprint=connection.vma_fingerprint,
        approved_by=MONITOR, event_details={"detected_by": MONITOR, "connection_id": connection.id,
                                            "reverse_tunnel_port": connection.reverse_tunnel_port, **details})


def monitor_pass(probe: Probe, disconnect_after: timedelta) -> None:
    """Probe every connected or disconnected VMA once and record what changed."""
    watched = list(VmaActiveConnection.select().where(
        VmaActiveConnection.connection_status.in_([ConnectionStatus.CONNECTED, ConnectionStatus.DISCONNECTED]),
        VmaActiveConnection.reverse_tunnel_port.is_null(False)).order_by(VmaActiveConnection.connected_at))
    for connection in watched:
        if probe(connection.reverse_tunnel_port):
            _seen(connection, utcnow())
        else:
            _unanswered(connection, utcnow(), disconnect_after)


def _seen(connection: VmaActiveConnection, at: datetime) -> None:
    with db.atomic():
        if connection.connection_status == ConnectionStatus.DISCONNECTED:
            moved = VmaActiveConnection.update(connection_status=ConnectionStatus.CONNECTED, last_seen_at=at,
                                               updated_at=at).where(
                VmaActiveConnection.id == connection.id,
                VmaActiveConnection.connection_status == ConnectionStatus.DISCONNECTED).execute()
            if moved:
                _audit(AuditEventType.CONNECTION, connection, reason="tunnel_answered",
                       disconnected_since=_iso(connection.updated_at))
                log.info("VMA %r (connection %s) answers through its tunnel again", connection.vma_name,
                         connection.id)
            return
        VmaActiveConnection.update(last_seen_at=at, updated_at=at).where(
            VmaActiveConnection.id == connection.id,
            VmaActiveConnection.connection_status == ConnectionStatus.CONNECTED).execute()


def _unanswered(connection: VmaActiveConnection, at: datetime, disconnect_after: timedelta) -> None:
    if connection.connection_status != ConnectionStatus.CONNECTED:
        return
    since = connection.last_seen_at or connection.connected_at
    if at - since < disconnect_after:
        return
    with db.atomic():
        moved = VmaActiveConnection.update(connection_status=ConnectionStatus.DISCONNECTED, updated_at=at).where(
            VmaActiveConnection.id == connection.id,
            VmaActiveConnection.connection_status == ConnectionStatus.CONNECTED,
            # not seen by a pass that ran meanwhile (another OMA process, or a slow probe of this one)
            (VmaActiveConnection.last_seen_at.is_null()) | (VmaActiveConnection.last_seen_at <= since)).execute()
        if moved:
            _audit(AuditEventType.DISCONNECTION, connection, reason="connection_timeout",
                   last_seen_at=_iso(connection.last_seen_at), silent_seconds=int((at - since).total_seconds()))
    if moved:
        log.warning("VMA %r (connection %s) has not answered through its tunnel (port %s) since %s: disconnected",
                    connection.vma_name, connection.id, connection.reverse_tunnel_port, _iso(since))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


class ConnectionMonitor:
    """The monitor's thread: one :func:`monitor_pass` every ``interval`` seconds."""

    def __init__(self, probe: Probe, interval: float, disconnect_after: float):
        self._probe, self._interval = probe, interval
        self._disconnect_after = timedelta(seconds=disconnect_after)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vma-connection-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def run_once(self) -> None:
        with db.connection_context():
            monitor_pass(self._probe, self._disconnect_after)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the monitor
                log.exception("VMA connection monitor pass failed; retrying in %.0f s", self._interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
