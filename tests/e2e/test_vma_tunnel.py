"""The VMA tunnel end to end through a real OpenSSH server (docs/design/enrollment.md#tunnel):
sshd configured with exactly what ``oma-server tunnel-sshd-config`` prints, the tunnel account's keys as
the OMA's approvals write them, and a real VMA agent that enrolled, was approved, pinned the OMA's host
key and keeps its ssh tunnel up. Through the tunnel the OMA's connection monitor reaches the VMA's API,
which is what tells the agent its tunnel works; the key allows only the forwards it names; a lost
session is restarted; revoking the VMA removes the key, ends the live session and stops the agent's
tunnel; an sshd with another host key is never connected to."""
from __future__ import annotations

import contextlib
import getpass
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from oma.v1 import enrollment_admin_pb2 as apb

from oma_server.db import models
from oma_server.integrations.ssh_keys import parse_public_key
from omaclient.client import OmaClient
from tests.fixtures.servers import ADMIN_PASSWORD
from tests.fixtures.sshd import check_config, start_sshd
from tests.helpers.vma_enrollment import agent_runner, enroll, new_code, status, wait_for

USER = getpass.getuser()  # the tunnel account: sshd here runs as this user, so it can only log in as it
REPO = Path(__file__).resolve().parents[2]


def _free_ports(count: int) -> int:
    """A port p with p … p+count-1 free (the OMA's port ranges are contiguous)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return first
    raise AssertionError("no free port range")


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _wait_for(condition, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _connection(enrollment_id: str) -> models.VmaActiveConnection:
    return models.VmaActiveConnection.get(models.VmaActiveConnection.enrollment == enrollment_id)


def _free_port() -> int:
    return _free_ports(1)


@pytest.fixture
def tunnel_lab_factory(oma_factory, tmp_path):
    """``tunnel_lab_factory(sshd_host_key=None)``: an OMA whose tunnel settings name a private sshd, that
    sshd (configured by ``oma-server tunnel-sshd-config``; its host key is the OMA's own unless another is
    given), and an admin client."""
    stack = contextlib.ExitStack()

    def make(sshd_host_key: Path | None = None, **extra):
        sshd_port, nbd, reverse = _free_ports(1), _free_ports(2), _free_ports(2)
        settings = {
            "tunnel_authorized_keys": str(tmp_path / "tunnel-home" / ".ssh" / "authorized_keys"),
            "tunnel_ssh_user": USER, "tunnel_ssh_port": sshd_port, "nbd_port_min": nbd, "nbd_port_max": nbd + 1,
            "tunnel_reverse_port_min": reverse, "tunnel_reverse_port_max": reverse + 1,
            "vma_monitor_interval_seconds": 0.2, "vma_monitor_probe_timeout_seconds": 1.0,
            "vma_disconnect_after_seconds": 1.0, **extra,
        }
        oma = oma_factory(**settings)
        data_dir = oma.runtime.settings.data_dir
        env = {**os.environ, "OMA_DATA_DIR": str(data_dir),
               **{f"OMA_{key.upper()}": str(value) for key, value in settings.items()}}
        generated = subprocess.run([str(Path(sys.executable).with_name("oma-server")), "tunnel-sshd-config"],
                                   env=env, capture_output=True, text=True, timeout=60)
        assert generated.returncode == 0, generated.stderr
        dropin = tmp_path / "sshd" / "oma-vma-tunnel.conf"
        dropin.parent.mkdir(parents=True)
        dropin.write_text(generated.stdout)
        sshd = stack.enter_context(start_sshd(tmp_path / "sshd", sshd_host_key or data_dir / "ssh_host_ed25519_key",
                                              dropin, port=sshd_port))
        admin = stack.enter_context(OmaClient(f"127.0.0.1:{oma.port}", token=""))
        admin.login("admin", ADMIN_PASSWORD)
        return oma, sshd, admin, generated.stdout, reverse

    with stack:
        yield make


@pytest.fixture
def tunnel_lab(tunnel_lab_factory):
    return tunnel_lab_factory()


@pytest.fixture
def tunnel_agent(tmp_path):
    """A VMA agent whose tunnel keeper checks often and restarts ssh quickly."""
    return agent_runner(tmp_path, tunnel_check_interval_seconds=0.1, tunnel_restart_delay_seconds=0.5)


def test_generated_sshd_settings_match_the_keys_and_sshd_accepts_them(tunnel_lab):
    oma, sshd, _, dropin, reverse = tunnel_lab
    s = oma.runtime.settings
    assert check_config(sshd.config).returncode == 0, check_config(sshd.config).stderr
    lines = [line.strip() for line in dropin.splitlines()]
    assert f"Match User {USER}" in lines and "AuthenticationMethods publickey" in lines
    assert f"AuthorizedKeysFile {s.tunnel_authorized_keys}" in lines
    assert f"PermitOpen 127.0.0.1:{s.nbd_port_min} 127.0.0.1:{s.nbd_port_max}" in lines
    assert f"PermitListen 127.0.0.1:{reverse} 127.0.0.1:{reverse + 1}" in lines
    for line in ("PermitTTY no", "X11Forwarding no", "AllowAgentForwarding no", "AllowStreamLocalForwarding no",
                 "GatewayPorts no", "PasswordAuthentication no"):
        assert line in lines, line
    assert f"# sshd must also listen on the tunnel port: add `Port {s.tunnel_ssh_port}`" in dropin


def _enrolled_and_approved(oma, admin, vma):
    started = enroll(vma, oma.port, new_code(admin))
    wait_for(vma, "awaiting_approval")
    admin.enrollment_admin.ApproveEnrollment(apb.ApproveEnrollmentRequest(enrollment_id=started.enrollment_id),
                                             timeout=10)
    wait_for(vma, "approved")
    return started.enrollment_id


def test_the_agent_pins_the_host_key_keeps_the_tunnel_up_and_stops_when_revoked(tunnel_lab, tunnel_agent):
    oma, sshd, admin, _, reverse = tunnel_lab
    with tunnel_agent() as vma:
        enrollment_id = _enrolled_and_approved(oma, admin, vma)
        written = json.loads((tunnel_agent.dir / f"enrollment-{enrollment_id}.json").read_text())
        assert (written["reverse_tunnel_port"], written["ssh_port"], written["ssh_user"]) == (reverse, sshd.port, USER)

        # The agent pins the host key the OMA approved it with, starts ssh, and calls the tunnel up only
        # once the OMA's monitor has reached the agent's API through the reverse forward.
        up = _wait_for(lambda: (st := status(vma)).tunnel_configured and st, "the agent's tunnel to be up")
        assert up.message.startswith(f"tunnel up: the OMA reached this agent through its port {reverse} at ")
        host_key = (oma.runtime.settings.data_dir / "ssh_host_ed25519_key.pub").read_text().split()
        assert (tunnel_agent.dir / "known_hosts").read_text() == f"[127.0.0.1]:{sshd.port} {host_key[0]} {host_key[1]}\n"
        assert parse_public_key(" ".join(host_key))[0].fingerprint == written["host_key_hash"]
        connection = _connection(enrollment_id)
        assert connection.connection_status == "connected" and connection.last_seen_at is not None
        assert _listening(reverse)

        # The key forwards nothing else: another reverse port is refused by sshd.
        other = subprocess.run(["ssh", "-F", "none", "-i", str(tunnel_agent.dir / "id_ed25519"), "-o",
                                "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={tunnel_agent.dir / 'known_hosts'}",
                                "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-p", str(sshd.port), "-N",
                                "-R", f"127.0.0.1:{reverse + 1}:127.0.0.1:{tunnel_agent.port}", f"{USER}@127.0.0.1"],
                               capture_output=True, text=True, timeout=30)
        assert other.returncode == 255 and "remote port forwarding failed" in other.stderr, other.stderr

        # The session ends (sshd restarted, network cut): the agent starts ssh again by itself.
        first_pid = _session_pid(reverse)
        os.kill(first_pid, signal.SIGTERM)
        _wait_for(lambda: (pid := _session_pid(reverse)) and pid != first_pid, "the agent to restart the tunnel")

        # Revoked: the key leaves authorized_keys, the live session is ended, and the agent stops.
        revoked = admin.enrollment_admin.RevokeVMA(apb.RevokeVMARequest(enrollment_id=enrollment_id,
                                                                        reason="site closed"), timeout=30)
        assert revoked.sessions_ended == 1 and "1 live tunnel session ended" in revoked.message, revoked.message
        stopped = _wait_for(lambda: "revoked" in (st := status(vma)).message and st, "the agent to stop")
        assert not stopped.tunnel_configured and stopped.message.startswith("tunnel stopped: the OMA revoked")
        assert not _listening(reverse)
        audit = models.VmaConnectionAudit.get(models.VmaConnectionAudit.enrollment == enrollment_id,
                                              models.VmaConnectionAudit.event_type == "revocation")
        assert len(audit.event_details["sessions_ended"]) == 1
        assert written["host_key_hash"] and enrollment_id and _connection(enrollment_id).connection_status == "revoked"
        attempts = sshd.log_text().count("Accepted publickey")
        time.sleep(1.5)  # three restart delays: the agent does not try again
        assert sshd.log_text().count("Accepted publickey") == attempts and not _listening(reverse)
        # ... and the key no longer logs in.
        command = (tunnel_agent.dir / "tunnel.command").read_text().split()
        again = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert again.returncode == 255 and "Permission denied (publickey)" in again.stderr, again.stderr
    assert json.loads((tunnel_agent.dir / "state.json").read_text())["tunnel_configured"] is False


def test_the_agent_does_not_connect_to_an_sshd_with_another_host_key(tunnel_lab_factory, tunnel_agent, tmp_path):
    other_key = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True)
    oma, sshd, admin, _, reverse = tunnel_lab_factory(sshd_host_key=other_key)  # not the key the OMA pins
    with tunnel_agent() as vma:
        enrollment_id = _enrolled_and_approved(oma, admin, vma)
        pinned = json.loads((tunnel_agent.dir / f"enrollment-{enrollment_id}.json").read_text())["host_key_hash"]
        refused = _wait_for(lambda: "tunnel not started" in (st := status(vma)).message and st,
                            "the agent to refuse the host key")
        offered = subprocess.run(["ssh-keygen", "-lf", f"{other_key}.pub"], capture_output=True, text=True,
                                 check=True).stdout.split()[1]
        assert refused.message == (f"tunnel not started: the sshd at 127.0.0.1:{sshd.port} offers host key {offered}, "
                                   f"not the {pinned} the OMA approved this agent with")
        assert not refused.tunnel_configured
        assert not (tunnel_agent.dir / "known_hosts").exists() and not (tunnel_agent.dir / "tunnel.log").exists()
        assert "Accepted publickey" not in sshd.log_text() and not _listening(reverse)


def _session_pid(port: int) -> int | None:
    """The sshd process listening on the reverse port (the agent's tunnel session), if any."""
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None
