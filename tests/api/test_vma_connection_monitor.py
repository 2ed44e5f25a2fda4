"""The VMA connection monitor (docs/design/enrollment.md#connection-monitor) on both databases: liveness from
the tunnel itself. Each approved VMA's reverse-forward port on the OMA is probed with the standard health
call; here a real VMA agent listens on that port (in production sshd does, forwarding to the VMA). A VMA
that does not answer for the disconnect threshold is marked ``disconnected`` with an audit row, one that
answers again is ``connected`` again, and ``revoked`` is terminal."""
from __future__ import annotations

import contextlib
import socket
import time

import pytest
from oma.v1 import debug_pb2
from oma.v1 import enrollment_admin_pb2 as apb

from oma_server.db import models
from omaclient.client import OmaClient
from tests.fixtures.servers import ADMIN_PASSWORD, start_vma
from tests.helpers.oma_enrollment import approve, audit_events, awaiting

DISCONNECT_AFTER = 2.0  # well above the probe interval (0.2 s) and timeout (1 s), even on a busy machine


def _two_free_ports() -> int:
    """A port p with p and p+1 both free (the OMA hands out reverse ports from a contiguous range)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with contextlib.suppress(OSError), socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", port))
            second.bind(("127.0.0.1", port + 1))
            return port
    raise AssertionError("no two adjacent free ports")


def _connection(enrollment_id: str) -> models.VmaActiveConnection:
    return models.VmaActiveConnection.get(models.VmaActiveConnection.enrollment == enrollment_id)


def _wait_for(condition, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _listed(admin, **kw) -> dict[str, str]:
    answer = admin.enrollment_admin.ListActiveVMAs(apb.ListActiveVMAsRequest(**kw), timeout=10)
    return {c.enrollment_id: c.connection_status for c in answer.connections}


def _events(admin, enrollment_id: str, event_type: str) -> list[apb.VMAAuditEvent]:
    return audit_events(admin, enrollment_id=enrollment_id, event_type=event_type)


@pytest.fixture
def monitored(oma_factory, tmp_path):
    port = _two_free_ports()
    server = oma_factory(tunnel_authorized_keys=str(tmp_path / "vma_tunnel" / "authorized_keys"),
                         tunnel_reverse_port_min=port, tunnel_reverse_port_max=port + 1,
                         vma_monitor_interval_seconds=0.2, vma_monitor_probe_timeout_seconds=1.0,
                         vma_disconnect_after_seconds=DISCONNECT_AFTER)
    with OmaClient(f"127.0.0.1:{server.port}", token="") as admin, \
            OmaClient(f"127.0.0.1:{server.port}", token="") as public:
        admin.login("admin", ADMIN_PASSWORD)
        yield admin, public, port


def test_silent_vmas_are_disconnected_answering_ones_reconnect_and_revoked_stays_revoked(monitored):
    admin, public, port = monitored
    site_a, site_b = awaiting(admin, public, "site-a"), awaiting(admin, public, "site-b")
    with start_vma(listen=f"127.0.0.1:{port}") as agent_a:
        approve(admin, site_a)
        approve(admin, site_b)
        a, b = _connection(site_a.enrollment_id), _connection(site_b.enrollment_id)
        assert (a.reverse_tunnel_port, b.reverse_tunnel_port) == (port, port + 1)
        assert a.connection_status == b.connection_status == "connected" and b.last_seen_at is None

        # A answers through its port: seen, and still connected. B never answers: disconnected once the
        # threshold since its approval has passed, with the reason in the audit trail.
        _wait_for(lambda: _connection(site_a.enrollment_id).last_seen_at, "site-a to be seen")
        b = _wait_for(lambda: (c := _connection(site_b.enrollment_id)).connection_status == "disconnected" and c,
                      "site-b to be disconnected")
        assert b.last_seen_at is None and (b.updated_at - b.connected_at).total_seconds() >= DISCONNECT_AFTER
        [gone] = _events(admin, site_b.enrollment_id, "disconnection")
        details = dict(gone.event_details)
        assert (details["reason"], details["detected_by"], details["reverse_tunnel_port"]) == \
            ("connection_timeout", "monitor", port + 1)
        assert gone.approved_by == "monitor"
        time.sleep(DISCONNECT_AFTER + 0.5)  # A stays connected for as long as it answers
        a = _connection(site_a.enrollment_id)
        assert a.connection_status == "connected" and not _events(admin, site_a.enrollment_id, "disconnection")
        assert _listed(admin) == {site_a.enrollment_id: "connected"}
        health = {c.name: c for c in admin.debug.GetSystemHealth(debug_pb2.GetSystemHealthRequest(),
                                                                 timeout=10).components}
        assert health["vma_connections"].status == "degraded"
        assert health["vma_connections"].message == \
            "1 of 2 enrolled VMAs do not answer through their tunnels: site-b"
        assert _listed(admin, include_disconnected=True) == {site_a.enrollment_id: "connected",
                                                             site_b.enrollment_id: "disconnected"}

        # B's tunnel comes up: connected again, seen, one `connection` event.
        with start_vma(listen=f"127.0.0.1:{port + 1}"):
            b = _wait_for(lambda: (c := _connection(site_b.enrollment_id)).connection_status == "connected" and c,
                          "site-b to reconnect")
            assert b.last_seen_at is not None
            [back] = _events(admin, site_b.enrollment_id, "connection")
            assert dict(back.event_details)["detected_by"] == "monitor"

            # Revoked while its agent still answers: revoked for good, the monitor writes nothing more.
            admin.enrollment_admin.RevokeVMA(apb.RevokeVMARequest(enrollment_id=site_b.enrollment_id,
                                                                  revoked_by="ops"), timeout=10)
            audit_before = models.VmaConnectionAudit.select().where(
                models.VmaConnectionAudit.enrollment == site_b.enrollment_id).count()
            revoked = _connection(site_b.enrollment_id)
            time.sleep(DISCONNECT_AFTER + 0.5)
            after = _connection(site_b.enrollment_id)
            assert (after.connection_status, after.last_seen_at, after.reverse_tunnel_port) == \
                ("revoked", revoked.last_seen_at, None)
            assert models.VmaConnectionAudit.select().where(
                models.VmaConnectionAudit.enrollment == site_b.enrollment_id).count() == audit_before

        agent_a.stop(grace=None)  # A's tunnel goes down: disconnected after the threshold since last seen
        a = _wait_for(lambda: (c := _connection(site_a.enrollment_id)).connection_status == "disconnected" and c,
                      "site-a to be disconnected")
        [gone] = _events(admin, site_a.enrollment_id, "disconnection")
        assert dict(gone.event_details)["last_seen_at"] == a.last_seen_at.isoformat()
        assert dict(gone.event_details)["silent_seconds"] >= DISCONNECT_AFTER - 0.01
