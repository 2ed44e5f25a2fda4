"""grpcurl-style access works: ``buf curl`` lists the services through reflection and calls Health and
Login against a running OMA server (the commands the README shows)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.fixtures.servers import ADMIN_PASSWORD

BUF = Path(__file__).resolve().parents[2] / "node_modules/.bin/buf"


def buf_curl(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", *args],
        capture_output=True, text=True, timeout=60,
    )


def test_reflection_health_and_login_with_buf_curl(oma_server):
    base = f"http://127.0.0.1:{oma_server.port}"
    listed = buf_curl(oma_server.port, "--list-services", base)
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"oma.v1.AuthService", "oma.v1.VMContextService", "grpc.health.v1.Health"} <= services

    health = buf_curl(oma_server.port, "-d", '{"service": ""}', f"{base}/grpc.health.v1.Health/Check")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout) == {"status": "SERVING"}

    login = buf_curl(oma_server.port, "-d", json.dumps({"username": "admin", "password": ADMIN_PASSWORD}),
                     f"{base}/oma.v1.AuthService/Login")
    assert login.returncode == 0, login.stderr
    token = json.loads(login.stdout)["token"]

    listed_vms = buf_curl(oma_server.port, "-H", f"authorization: Bearer {token}", "-d", "{}",
                          f"{base}/oma.v1.VMContextService/ListVMContexts")
    assert listed_vms.returncode == 0, listed_vms.stderr

    refused = buf_curl(oma_server.port, "-d", "{}", f"{base}/oma.v1.VMContextService/ListVMContexts")
    assert refused.returncode == 16 * 8  # buf curl exits with gRPC code × 8: UNAUTHENTICATED
    assert "unauthenticated" in refused.stderr.lower()
