"""The generated Go client against the real OMA server, through the example program
clients/go/examples/omaclient: login, paged VM listing as JSON lines, gRPC errors as exit codes.

The program is built once per session in GOPATH mode with Debian's Go packages, offline (the recipe
of clients/go/README.md); GOCACHE lives in the workspace, so after the first build a run costs
about a second. Go missing is a failure, never a skip: the Go client is part of the product.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from oma_server.db.models import VmReplicationContext
from tests.fixtures.servers import ADMIN_PASSWORD

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "github.com/oma-vma/migrate/clients/go/examples/omaclient"
# The generated packages import each other as github.com/oma-vma/migrate/...: the GOPATH entry
# .gopath/src/github.com/oma-vma/migrate is a relative symlink back to this checkout.
GOPATH_LINK = REPO / ".gopath" / "src" / "github.com" / "oma-vma" / "migrate"
GO_ENV = {"GO111MODULE": "off", "GOPATH": f"{REPO / '.gopath'}:/usr/share/gocode", "GOFLAGS": "",
          "GOCACHE": str(REPO / ".gocache")}
SETUP_HINT = ("run scripts/setup (Debian golang-go, golang-google-grpc-dev, golang-google-protobuf-dev, "
              "golang-github-golang-protobuf-1-5-dev, golang-google-genproto-dev)")

EXIT_NOT_FOUND = 105
EXIT_UNIMPLEMENTED = 112
EXIT_UNAUTHENTICATED = 116


def _link_checkout_into_gopath() -> None:
    GOPATH_LINK.parent.mkdir(parents=True, exist_ok=True)
    try:
        GOPATH_LINK.symlink_to(os.path.relpath(REPO, GOPATH_LINK.parent), target_is_directory=True)
    except FileExistsError:
        pass  # made earlier, or by a parallel worker
    if GOPATH_LINK.resolve() != REPO:
        pytest.fail(f"{GOPATH_LINK} exists but does not lead to {REPO}; remove it and run again")


@pytest.fixture(scope="session")
def omaclient_binary(tmp_path_factory) -> Path:
    go = shutil.which("go") or next((p for p in ("/usr/lib/go/bin/go",) if os.path.exists(p)), None)
    if go is None:
        pytest.fail(f"Go is not installed (no 'go' on PATH): {SETUP_HINT}")
    _link_checkout_into_gopath()
    binary = tmp_path_factory.mktemp("go-client") / "omaclient"
    build = subprocess.run([go, "build", "-o", str(binary), PACKAGE], cwd=REPO, env={**os.environ, **GO_ENV},
                           capture_output=True, text=True, timeout=900)
    if build.returncode != 0:
        pytest.fail(f"building {PACKAGE} failed (exit {build.returncode}); if packages are missing, "
                    f"{SETUP_HINT}:\n{build.stdout}{build.stderr}")
    return binary


def run_client(binary: Path, port: int, *flags: str, password: str = ADMIN_PASSWORD) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMA_PASSWORD": password}
    return subprocess.run([str(binary), "-target", f"127.0.0.1:{port}", "-username", "admin", *flags],
                          env=env, capture_output=True, text=True, timeout=60)


def test_logs_in_and_prints_one_json_line_per_context(omaclient_binary, oma_server, db):
    contexts = [
        VmReplicationContext.create(vm_name=name, vmware_vm_id=f"4210-{name}", vm_path=f"/DC1/vm/{name}",
                                    vcenter_host="vc.lab", datacenter="DC1", current_status=status)
        for name, status in (("web-01", "discovered"), ("db-01", "ready_for_failover"))
    ]
    result = run_client(omaclient_binary, oma_server.port)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(lines, key=lambda line: line["name"]) == sorted(
        ({"name": c.vm_name, "status": c.current_status, "id": c.context_id} for c in contexts),
        key=lambda line: line["name"],
    )


def test_wrong_password_is_unauthenticated(omaclient_binary, oma_server):
    result = run_client(omaclient_binary, oma_server.port, "-password", "wrong", password="")
    assert result.returncode == EXIT_UNAUTHENTICATED
    assert result.stderr.strip() == "error: UNAUTHENTICATED: invalid username or password"
    assert result.stdout == ""


def test_watching_an_unknown_job_is_not_found(omaclient_binary, oma_server):
    result = run_client(omaclient_binary, oma_server.port, "-watch", "no-such-job")
    assert result.returncode == EXIT_NOT_FOUND, result.stderr
    assert result.stderr.startswith("error: NOT_FOUND: ") and result.stdout == ""


def test_follows_a_real_replication_to_the_end(omaclient_binary, lab_private):
    from oma.v1 import discovery_pb2, replications_pb2

    lab = lab_private
    context_id = lab.client.discovery.AddVMs(discovery_pb2.AddVMsRequest(
        source=discovery_pb2.VCenterSource(credential_id=lab.credential_id), vm_names=[lab.vcenter.data_vms[0]]),
        timeout=60).processed_vms[0].context_id
    job_id = lab.client.replications.CreateReplication(
        replications_pb2.CreateReplicationRequest(context_id=context_id), timeout=30).job_id
    result = run_client(omaclient_binary, lab.oma.port, "-watch", job_id)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    contexts = [line for line in lines if line.get("id") == context_id]
    updates = [line for line in lines if line.get("job_id") == job_id]
    assert len(contexts) == 1 and len(updates) >= 2, result.stdout[:2000]
    assert updates[-1]["status"] == "completed" and updates[-1]["progress_percent"] == 100
    assert updates[-1]["terminal"] is True
