"""A real VMA agent enrolling with a real OMA server (mapping: VMA Enrollment → the OMA's enrollment tables):
pairing code from the admin API, the agent's asynchronous Enroll → sign → verify → wait, approval by the
operator, the key in the tunnel account's authorized_keys, private files, resuming after an agent restart,
rejection, and TLS pinned to the SHA-256 of the certificate the OMA's TLS listener serves."""
from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from oma.v1 import enrollment_admin_pb2 as apb
from vma.v1 import enrollment_pb2 as pb

from omaclient.client import OmaClient
from omalab.processes import free_port
from tests.fixtures.servers import ADMIN_PASSWORD
from tests.helpers.vma_enrollment import META, agent_runner, enroll, new_code, status, wait_for


@pytest.fixture
def keys_file(tmp_path):
    return tmp_path / "tunnel" / "authorized_keys"


@pytest.fixture
def oma(oma_factory, keys_file):
    return oma_factory(tunnel_authorized_keys=str(keys_file), nbd_port_min=10809, nbd_port_max=10810,
                       tls_listen="127.0.0.1:0")


@pytest.fixture
def admin(oma):
    with OmaClient(f"127.0.0.1:{oma.port}", token="") as client:
        client.login("admin", ADMIN_PASSWORD)
        yield client


@pytest.fixture
def agent(tmp_path):
    return agent_runner(tmp_path)


def _error(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def _wait_until(condition, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return found


def ssh_fingerprint(path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(path)], check=True, capture_output=True, text=True).stdout
    return out.split()[1]


def test_agent_enrolls_is_approved_and_keeps_its_state_across_restarts(oma, admin, agent, keys_file):
    with agent() as vma:
        assert _error(lambda: status(vma))[0] == grpc.StatusCode.NOT_FOUND
        started = enroll(vma, oma.port, new_code(admin))
        assert started.enrollment_id and started.state in ("enrolled", "verified", "awaiting_approval")
        waiting = wait_for(vma, "awaiting_approval")
        assert waiting.vma_fingerprint == ssh_fingerprint(agent.dir / "id_ed25519.pub")
        assert (waiting.oma_host, waiting.oma_port, waiting.vma_name) == ("127.0.0.1", oma.port, "site-a")
        assert _error(lambda: enroll(vma, oma.port, new_code(admin)))[0] == grpc.StatusCode.FAILED_PRECONDITION
    pending = admin.enrollment_admin.ListPendingEnrollments(apb.ListPendingEnrollmentsRequest(), timeout=10)
    assert [(e.id, e.vma_name, e.vma_version, e.vma_ip_address, e.vma_fingerprint) for e in pending.enrollments] == [
        (started.enrollment_id, "site-a", "1.2.3", "127.0.0.1", waiting.vma_fingerprint)]

    # Approved while the agent is down: the restarted agent resumes waiting and learns it.
    admin.enrollment_admin.ApproveEnrollment(apb.ApproveEnrollmentRequest(enrollment_id=started.enrollment_id),
                                             timeout=10)
    with agent() as vma:
        approved = wait_for(vma, "approved")
        assert approved.enrollment_id == started.enrollment_id and approved.ssh_user == "vma_tunnel"
        assert approved.HasField("enrolled_at") and not approved.tunnel_configured
        # Its tunnel keeper cannot pin the host key: nothing serves SSH on the OMA's port 443 here.
        message = _wait_until(lambda: "tunnel down" in (m := status(vma).message) and m)
        assert "the OMA's sshd at 127.0.0.1:443 offered no Ed25519 host key" in message, message

    public_key = (agent.dir / "id_ed25519.pub").read_text().split()
    assert public_key[2] == "vma-site-a"
    assert f"ssh-ed25519 {public_key[1]} vma-enrollment {waiting.vma_fingerprint}" in keys_file.read_text()
    # The private key is OpenSSH format: ssh-keygen derives the same public key from it.
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(agent.dir / "id_ed25519")], check=True,
                             capture_output=True, text=True).stdout.split()
    assert derived[:2] == public_key[:2]
    assert stat.S_IMODE(agent.dir.stat().st_mode) == 0o700
    files = sorted(p.name for p in agent.dir.iterdir() if not p.name.startswith("."))
    assert files == sorted(["id_ed25519", "id_ed25519.pub", "state.json", f"enrollment-{started.enrollment_id}.json",
                            "tunnel.ssh_config", "tunnel.command"])
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in agent.dir.iterdir()} == {name: 0o600 for name in files}

    host_key_hash = ssh_fingerprint(oma.runtime.settings.data_dir / "ssh_host_ed25519_key.pub")
    config = json.loads((agent.dir / f"enrollment-{started.enrollment_id}.json").read_text())
    assert (config["host_key_hash"], config["ssh_user"], config["reverse_tunnel_port"], config["ssh_port"]) == (
        host_key_hash, "vma_tunnel", 9081, 443)
    ssh_config = (agent.dir / "tunnel.ssh_config").read_text()
    for line in ("StrictHostKeyChecking yes", f"RemoteForward 127.0.0.1:9081 127.0.0.1:{agent.port}",
                 "LocalForward 127.0.0.1:10809 127.0.0.1:10809", "LocalForward 127.0.0.1:10810 127.0.0.1:10810",
                 f"IdentityFile {agent.dir / 'id_ed25519'}", "User vma_tunnel", "Port 443"):
        assert line in ssh_config
    assert (agent.dir / "tunnel.command").read_text().strip() == \
        f"ssh -F {agent.dir / 'tunnel.ssh_config'} -N oma-tunnel"
    state = json.loads((agent.dir / "state.json").read_text())
    assert state["tunnel_configured"] is False and state["host_key_hash"] == host_key_hash
    assert state["pairing_code"] == "" and state["challenge"] == ""

    with agent() as vma:  # the approval survives restarts; enrolling again needs a deliberate reset
        assert status(vma).state == "approved"
        code, details = _error(lambda: enroll(vma, oma.port, new_code(admin)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "enrolled" in details


def test_unreachable_oma_wrong_code_then_rejection(oma, admin, agent):
    with agent() as vma:
        code, details = _error(lambda: enroll(vma, free_port(), "ABCD-EFGH-JKMN"))  # nobody listens there
        assert code == grpc.StatusCode.UNAVAILABLE and "could not be reached" in details
        assert status(vma).state == "failed"
        code, details = _error(lambda: enroll(vma, oma.port, "ABCD-EFGH-JKMN"))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "Pairing code not found" in details
        assert status(vma).state == "failed"
        assert _error(lambda: enroll(vma, oma.port, "short"))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert _error(lambda: vma.Enroll(pb.EnrollRequest(pairing_code="ABCD-EFGH-JKMN"), metadata=META,
                                         timeout=10))[0] == grpc.StatusCode.INVALID_ARGUMENT

        started = enroll(vma, oma.port, new_code(admin), vma_name="")
        first = wait_for(vma, "awaiting_approval")
        assert first.vma_name.startswith("vma-")
        admin.enrollment_admin.RejectEnrollment(apb.RejectEnrollmentRequest(
            enrollment_id=started.enrollment_id, reason="not ours"), timeout=10)
        rejected = wait_for(vma, "rejected")
        assert rejected.enrollment_id == started.enrollment_id and not rejected.ssh_user

        # A rejected agent may enroll again, with a new key.
        again = enroll(vma, oma.port, new_code(admin))
        assert again.enrollment_id != started.enrollment_id
        assert wait_for(vma, "awaiting_approval").vma_fingerprint != first.vma_fingerprint


@pytest.fixture
def tls_enrollment(oma):
    """The OMA's own TLS listener (its generated self-signed certificate); yields (port, certificate SHA-256
    computed here from the certificate file, as an operator would)."""
    cert = x509.load_pem_x509_certificate(oma.tls_identity.cert_path.read_bytes())
    pin = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert pin == oma.tls_identity.sha256
    return oma.tls_port, pin


def test_tls_pinned_to_the_certificate_fingerprint(admin, agent, tls_enrollment):
    port, pin = tls_enrollment
    with agent() as vma:
        code, details = _error(lambda: enroll(vma, port, new_code(admin), oma_certificate_sha256="ab" * 32))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not the pinned" in details
        assert status(vma).state == "failed"
        # The operator hands the VMA the pairing code together with the fingerprint that comes with it.
        issued = admin.enrollment_admin.GeneratePairingCode(apb.GeneratePairingCodeRequest(), timeout=10)
        colons = ":".join(pin[i:i + 2] for i in range(0, 64, 2)).upper()
        assert issued.oma_certificate_sha256 == colons
        started = enroll(vma, port, issued.pairing_code, oma_certificate_sha256=issued.oma_certificate_sha256)
        assert wait_for(vma, "awaiting_approval").enrollment_id == started.enrollment_id
