"""The VMA tunnel end to end through a real OpenSSH server (spec failover-scheduler-enrollment §5.6–5.8):
sshd configured with exactly what ``oma-server tunnel-sshd-config`` prints, the tunnel account's keys as
the OMA's approvals write them, and a real VMA agent that enrolled, was approved and runs the ssh command
it wrote (``tunnel.ssh_config``). Through the tunnel the OMA's connection monitor reaches the VMA's API;
the key allows only the forwards it names; revoking the VMA removes the key and ends the live session."""
from __future__ import annotations

import contextlib
import getpass
import json
import os
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
from tests.test_vma_enrollment import agent, enroll, new_code, wait_for  # noqa: F401 (agent is a fixture)

USER = getpass.getuser()  # the tunnel account: sshd here runs as this user, so it can only log in as it
REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture
def tunnel_lab(oma_factory, tmp_path):
    """An OMA whose tunnel settings name a private sshd, that sshd (configured by `oma-server
    tunnel-sshd-config`), and an admin client."""
    sshd_port, nbd, reverse = _free_ports(1), _free_ports(2), _free_ports(2)
    settings = {
        "tunnel_authorized_keys": str(tmp_path / "tunnel-home" / ".ssh" / "authorized_keys"),
        "tunnel_ssh_user": USER, "tunnel_ssh_port": sshd_port, "nbd_port_min": nbd, "nbd_port_max": nbd + 1,
        "tunnel_reverse_port_min": reverse, "tunnel_reverse_port_max": reverse + 1,
        "vma_monitor_interval_seconds": 0.2, "vma_monitor_probe_timeout_seconds": 1.0,
        "vma_disconnect_after_seconds": 1.0,
    }
    oma = oma_factory(**settings)
    data_dir = oma.runtime.settings.data_dir
    env = {**os.environ, "OMA_DATA_DIR": str(data_dir),
           **{f"OMA_{key.upper()}": str(value) for key, value in settings.items()}}
    generated = subprocess.run([str(Path(sys.executable).with_name("oma-server")), "tunnel-sshd-config"], env=env,
                               capture_output=True, text=True, timeout=60)
    assert generated.returncode == 0, generated.stderr
    dropin = tmp_path / "sshd" / "oma-vma-tunnel.conf"
    dropin.parent.mkdir(parents=True)
    dropin.write_text(generated.stdout)
    with start_sshd(tmp_path / "sshd", data_dir / "ssh_host_ed25519_key", dropin, port=sshd_port) as sshd, \
            OmaClient(f"127.0.0.1:{oma.port}", token="") as admin:
        admin.login("admin", ADMIN_PASSWORD)
        yield oma, sshd, admin, generated.stdout, reverse


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


def test_the_tunnel_carries_the_monitor_and_revocation_ends_it(tunnel_lab, agent, tmp_path):  # noqa: F811
    oma, sshd, admin, _, reverse = tunnel_lab
    with agent() as vma:
        started = enroll(vma, oma.port, new_code(admin))
        wait_for(vma, "awaiting_approval")
        admin.enrollment_admin.ApproveEnrollment(apb.ApproveEnrollmentRequest(enrollment_id=started.enrollment_id),
                                                 timeout=10)
        approved = wait_for(vma, "approved")
        written = json.loads((agent.dir / f"enrollment-{started.enrollment_id}.json").read_text())
        assert (written["reverse_tunnel_port"], written["ssh_port"], written["ssh_user"]) == (reverse, sshd.port, USER)
        # Not yet connected through a tunnel: the monitor marks it disconnected after the threshold.
        _wait_for(lambda: _connection(started.enrollment_id).connection_status == "disconnected",
                  "the VMA without a tunnel to be disconnected")

        # The operator's step the VMA asks for: the OMA host key, checked against the pinned fingerprint.
        host_key_line = (oma.runtime.settings.data_dir / "ssh_host_ed25519_key.pub").read_text().split()
        assert parse_public_key(" ".join(host_key_line))[0].fingerprint == written["host_key_hash"]
        (agent.dir / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {host_key_line[0]} {host_key_line[1]}\n")
        command = (agent.dir / "tunnel.command").read_text().split()
        log = open(tmp_path / "ssh-client.log", "wb")
        tunnel = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            # The OMA reaches the VMA's API through the reverse forward: the monitor sees it again.
            back = _wait_for(lambda: (c := _connection(started.enrollment_id)).connection_status == "connected" and c,
                             "the VMA to answer through the tunnel")
            assert back.last_seen_at is not None and tunnel.poll() is None
            reconnected = models.VmaConnectionAudit.get(models.VmaConnectionAudit.enrollment == started.enrollment_id,
                                                        models.VmaConnectionAudit.event_type == "connection")
            assert reconnected.event_details["reverse_tunnel_port"] == reverse

            # The key forwards nothing else: another reverse port is refused by sshd.
            other = subprocess.run(["ssh", "-F", "none", "-i", str(agent.dir / "id_ed25519"), "-o", "IdentitiesOnly=yes",
                                    "-o", f"UserKnownHostsFile={agent.dir / 'known_hosts'}", "-o", "BatchMode=yes",
                                    "-o", "ExitOnForwardFailure=yes", "-p", str(sshd.port), "-N", "-R",
                                    f"127.0.0.1:{reverse + 1}:127.0.0.1:{agent.port}", f"{USER}@127.0.0.1"],
                                   capture_output=True, text=True, timeout=30)
            assert other.returncode == 255 and "remote port forwarding failed" in other.stderr, other.stderr

            # Revoked: the key leaves authorized_keys and the live session is ended.
            revoked = admin.enrollment_admin.RevokeVMA(apb.RevokeVMARequest(enrollment_id=started.enrollment_id,
                                                                            reason="site closed"), timeout=30)
            assert revoked.sessions_ended == 1 and "1 live tunnel session ended" in revoked.message, revoked.message
            assert tunnel.wait(15) == 255  # the ssh client lost its session
            assert not _listening(reverse)
            audit = models.VmaConnectionAudit.get(models.VmaConnectionAudit.enrollment == started.enrollment_id,
                                                  models.VmaConnectionAudit.event_type == "revocation")
            assert len(audit.event_details["sessions_ended"]) == 1
            assert approved.vma_fingerprint.split(":", 1)[1] not in Path(
                oma.runtime.settings.tunnel_authorized_keys).read_text()
            # ... and the VMA cannot come back with it.
            again = subprocess.run(command, capture_output=True, text=True, timeout=30)
            assert again.returncode == 255 and "Permission denied (publickey)" in again.stderr, again.stderr
            assert _connection(started.enrollment_id).connection_status == "revoked"
        finally:
            if tunnel.poll() is None:
                tunnel.kill()
            tunnel.wait()
            log.close()
    assert json.loads((agent.dir / "state.json").read_text())["state"] == "approved"
