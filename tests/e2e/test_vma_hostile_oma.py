"""A hostile OMA cannot make the VMA agent run anything (issue 9, item 1).

A fake OMA — a real gRPC server answering the agent's Enroll, VerifyChallenge and GetEnrollmentResult —
approves the agent with values that, written unchecked into ``tunnel.ssh_config``, would add a
``ProxyCommand`` that ssh runs as the agent's user. It also runs a real sshd whose host key it names, so
the agent's tunnel keeper would go as far as starting ssh. The real agent must refuse the approval with a
message naming the bad value, write no tunnel file, start no ssh, and nothing may run. A control run
with the same fake OMA and honest values shows the same set-up does write the files and start ssh, so
the refusals are the checks at work and not a broken harness."""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import subprocess
import time
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from oma.v1 import enrollment_pb2 as oma_pb
from oma.v1 import enrollment_pb2_grpc as oma_grpc
from vma.v1 import enrollment_pb2 as pb

from tests.fixtures.sshd import start_sshd
from tests.helpers.vma_enrollment import META, agent_runner, status

PROOF = "proof.txt"


def _fingerprint(public_key_line: str) -> str:
    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class FakeOma(oma_grpc.EnrollmentServiceServicer):
    """Answers the agent's enrollment calls; ``enroll`` and ``approval`` fields override the honest answers."""

    def __init__(self, ssh_port: int, host_key_hash: str):
        self.enrollment_id = str(uuid.uuid4())
        self.reverse_port = 9181
        self.enroll: dict = {}
        self.approval = dict(
            status="approved", message="approved by a test", ssh_user="vma_tunnel", ssh_port=ssh_port,
            host_key_hash=host_key_hash, reverse_tunnel_port=self.reverse_port,
            ssh_options=f'restrict,port-forwarding,permitopen="127.0.0.1:10809",'
                        f'permitlisten="127.0.0.1:{self.reverse_port}"')
        self.calls: list[str] = []

    def Enroll(self, request, context):
        self.calls.append("Enroll")
        answer = dict(enrollment_id=self.enrollment_id, status="pending_verification",
                      challenge=base64.b64encode(secrets.token_bytes(32)).decode(),
                      vma_fingerprint=_fingerprint(request.vma_public_key))
        return oma_pb.EnrollResponse(**{**answer, **self.enroll})

    def VerifyChallenge(self, request, context):
        self.calls.append("VerifyChallenge")
        return oma_pb.VerifyChallengeResponse(enrollment_id=request.enrollment_id, status="awaiting_approval",
                                              message="waiting for the operator")

    def GetEnrollmentResult(self, request, context):
        self.calls.append("GetEnrollmentResult")
        return oma_pb.GetEnrollmentResultResponse(enrollment_id=request.enrollment_id, **self.approval)


@pytest.fixture
def fake_oma(tmp_path):
    """(fake OMA servicer, its gRPC port); its sshd serves the host key the approval names."""
    host_key = tmp_path / "oma_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    dropin = tmp_path / "sshd-dropin.conf"
    dropin.write_text("# the fake OMA's sshd only has to show its host key\n")
    with contextlib.ExitStack() as stack:
        sshd = stack.enter_context(start_sshd(tmp_path / "sshd", host_key, dropin))
        servicer = FakeOma(sshd.port, _fingerprint(Path(f"{host_key}.pub").read_text()))
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        oma_grpc.add_EnrollmentServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        stack.callback(server.stop, None)
        yield servicer, port


@pytest.fixture
def agent(tmp_path):
    return agent_runner(tmp_path, tunnel_check_interval_seconds=0.1, tunnel_restart_delay_seconds=0.3,
                        enrollment_call_timeout_seconds=5.0)


def _enroll(stub, port: int):
    return stub.Enroll(pb.EnrollRequest(oma_host="127.0.0.1", oma_port=port, pairing_code="ABCD-EFGH-JKMN",
                                        vma_name="site-a", vma_version="1"), metadata=META, timeout=30)


def _settled(stub, timeout: float = 20.0) -> pb.GetEnrollmentStatusResponse:
    deadline = time.monotonic() + timeout
    while (current := status(stub)).state not in ("approved", "failed", "rejected", "expired"):
        assert time.monotonic() < deadline, f"still {current.state}: {current.message}"
        time.sleep(0.05)
    return current


def test_control_honest_values_from_the_same_fake_oma_write_the_files_and_start_ssh(fake_oma, agent):
    oma, port = fake_oma
    with agent() as vma:
        _enroll(vma, port)
        assert _settled(vma).state == "approved"
        deadline = time.monotonic() + 20
        while not (agent.dir / "tunnel.log").exists():  # the keeper pinned the host key and started ssh
            assert time.monotonic() < deadline, status(vma).message
            time.sleep(0.05)
    config = (agent.dir / "tunnel.ssh_config").read_text()
    assert "    User vma_tunnel\n" in config and "    ProxyCommand none\n" in config
    assert f"    RemoteForward 127.0.0.1:{oma.reverse_port} 127.0.0.1:{agent.port}\n" in config
    assert "    LocalForward 127.0.0.1:10809 127.0.0.1:10809\n" in config
    assert (agent.dir / "known_hosts").exists()


def test_an_impossible_last_seen_time_is_reported_not_crashed_on(fake_oma, agent):
    oma, port = fake_oma
    oma.approval["tunnel_last_seen_at"] = Timestamp(seconds=2 ** 62)
    with agent() as vma:
        _enroll(vma, port)
        assert _settled(vma).state == "approved"
        deadline = time.monotonic() + 20
        while (current := status(vma)).message != ("tunnel not started: the OMA reported an impossible "
                                                   "tunnel_last_seen_at"):
            assert time.monotonic() < deadline, current.message
            time.sleep(0.05)
        assert not current.tunnel_configured and not (agent.dir / "tunnel.log").exists()


_INJECTED = "\n    ProxyCommand /bin/sh -c 'id > {proof}'"


@pytest.mark.parametrize(("field", "value", "named"), [
    ("ssh_user", "vma_tunnel" + _INJECTED, "ssh_user"),
    ("ssh_user", "vma_tunnel -oProxyCommand=id", "ssh_user"),
    ("ssh_options", 'restrict,port-forwarding,permitopen="127.0.0.1:10809' + _INJECTED + '\n#",'
                    'permitlisten="127.0.0.1:9181"', "ssh_options"),
    ("ssh_options", 'restrict,port-forwarding,permitopen="127.0.0.1:10809",permitlisten="127.0.0.1:9181",'
                    'permitopen="*:*"', "ssh_options permitopen"),
    ("ssh_options", 'restrict,port-forwarding,permitlisten="127.0.0.1:9999"', "ssh_options permitlisten"),
    ("ssh_options", 'restrict,port-forwarding,proxycommand="id"', "ssh_options"),
    ("host_key_hash", "SHA256:" + "A" * 43 + _INJECTED, "host_key_hash"),
    ("ssh_port", 0, "ssh_port"),
    ("reverse_tunnel_port", 70000, "reverse_tunnel_port"),
])
def test_a_hostile_approval_is_refused_and_nothing_runs(fake_oma, agent, tmp_path, field, value, named):
    oma, port = fake_oma
    proof = tmp_path / PROOF
    oma.approval[field] = value.format(proof=proof) if isinstance(value, str) else value
    with agent() as vma:
        _enroll(vma, port)
        settled = _settled(vma)
        time.sleep(3)  # the keeper steps every 0.1 s: an injected command would have run by now
        assert not proof.exists(), f"the OMA's {field} ran a command: {proof.read_text()}"
        assert "GetEnrollmentResult" in oma.calls  # the agent did read the approval
        assert settled.state == "failed", settled.message
        assert settled.message.startswith(
            f"refused the OMA's approval of enrollment {oma.enrollment_id}: {named} "), settled.message
        assert settled.message.endswith("no tunnel file was written and ssh was not started")
        assert "\n" not in settled.message and len(settled.message) < 600
        assert status(vma).state == "failed"
    written = sorted(p.name for p in agent.dir.iterdir())
    assert written == ["id_ed25519", "id_ed25519.pub", "state.json"]  # no tunnel file, no ssh log
    assert json.loads((agent.dir / "state.json").read_text())["ssh_user"] == ""


@pytest.mark.parametrize(("field", "value", "named"), [
    ("enrollment_id", "../../../escaped", "enrollment_id"),
    ("enrollment_id", "x" * 1_000_000, "enrollment_id"),
    ("challenge", "not base64 at all!", "challenge"),
    ("challenge", base64.b64encode(b"x" * 4096).decode(), "challenge"),
])
def test_a_hostile_enroll_answer_is_refused(fake_oma, agent, tmp_path, field, value, named):
    oma, port = fake_oma
    oma.enroll[field] = value
    with agent() as vma:
        with pytest.raises(grpc.RpcError) as err:
            _enroll(vma, port)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details().startswith(f"refused the OMA's answer to Enroll: {named} ")
        assert len(err.value.details()) < 400  # a 1 MB value is quoted, not copied
        assert status(vma).state == "failed"
    assert "VerifyChallenge" not in oma.calls
    assert sorted(p.name for p in agent.dir.iterdir()) == ["id_ed25519", "id_ed25519.pub", "state.json"]
    assert not list(tmp_path.glob("escaped*"))


def test_a_tampered_saved_approval_is_not_run_after_a_restart(fake_oma, agent, tmp_path):
    """State written by an agent without these checks (or edited): the restarted agent checks it again,
    removes the tunnel files instead of running them, and says so."""
    oma, port = fake_oma
    proof = tmp_path / PROOF
    with agent() as vma:
        _enroll(vma, port)
        assert _settled(vma).state == "approved"
    state = json.loads((agent.dir / "state.json").read_text())
    state["ssh_user"] = "vma_tunnel" + _INJECTED.format(proof=proof)
    (agent.dir / "state.json").write_text(json.dumps(state))
    config = agent.dir / "tunnel.ssh_config"
    config.write_text(config.read_text().replace("    User vma_tunnel\n", f"    User {state['ssh_user']}\n"))
    (agent.dir / "known_hosts").unlink()
    with agent() as vma:
        current = status(vma)
        time.sleep(2)
        assert not proof.exists(), proof.read_text()
        assert current.state == "failed" and current.message.startswith("the saved approval is not valid (ssh_user ")
    assert not config.exists() and not (agent.dir / "tunnel.command").exists()
