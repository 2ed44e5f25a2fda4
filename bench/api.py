"""How fast the OMA serves reads, and how many progress watchers it holds, against references measured in
the same run (issue: serving at estate scale).

    .venv/bin/python bench/api.py                    # both databases, ratio mode
    .venv/bin/python bench/api.py --db sqlite --seconds 5
    .venv/bin/python bench/api.py --watchers 1000    # watchers mode (SQLite)

Ratio mode: a bare Python gRPC echo server (same thread pool size as the OMA) and the OMA are each driven
from a separate load process with ``--inflight`` calls in flight for ``--seconds``; it prints requests per
second for the echo, ``GetVMContext`` (one of ``--contexts`` seeded contexts) and ``ListCredentials`` (a tiny
table), and ``ratio: X`` lines (RPC rate / echo rate). Watchers mode: one process opens ``--watchers``
``WatchReplicationProgress`` streams on a running job and holds them; another measures unary
(``GetVMContext``) and health-check latency meanwhile and prints their p50/p99.

Everything runs on this machine's loopback; every loop is bounded in count and time.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent import futures
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "clients/python")]
ADMIN_PASSWORD = "bench-admin-password-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ reference
def _echo_server(port: int, ready, stop) -> None:
    def echo(request: bytes, context) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    ready.set()
    stop.wait(600)
    server.stop(0)


# --------------------------------------------------------------------------------------------------- load
def _drive(target: str, kind: str, token: str, argument: str, inflight: int, seconds: float, out) -> None:
    """A separate process: ``inflight`` callers in a loop for ``seconds``; sends (count, latencies)."""
    from oma.v1 import vm_contexts_pb2, vm_contexts_pb2_grpc, vmware_credentials_pb2, vmware_credentials_pb2_grpc

    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=10)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    if kind == "echo":
        call = channel.unary_unary("/bench.Echo/Echo")
        request = b"x" * 64
    elif kind == "GetVMContext":
        call = vm_contexts_pb2_grpc.VMContextServiceStub(channel).GetVMContext
        request = vm_contexts_pb2.GetVMContextRequest(context_id=argument)
    else:
        call = vmware_credentials_pb2_grpc.VMwareCredentialServiceStub(channel).ListCredentials
        request = vmware_credentials_pb2.ListCredentialsRequest()
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = []
        while time.monotonic() < deadline:
            started = time.monotonic()
            call(request, metadata=metadata, timeout=30)
            mine.append(time.monotonic() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(inflight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((len(latencies), seconds, sorted(latencies)))


def measure(target: str, kind: str, *, token: str = "", argument: str = "", inflight: int, seconds: float) -> dict:
    out: mp.Queue = mp.Queue()
    proc = mp.Process(target=_drive, args=(target, kind, token, argument, inflight, seconds, out))
    proc.start()
    count, elapsed, latencies = out.get(timeout=seconds + 120)
    proc.join(30)
    return {"rate": count / elapsed, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)]}


# ---------------------------------------------------------------------------------------------------- OMA
class Oma:
    def __init__(self, db_url: str, workdir: Path):
        self.port = free_port()
        self.db_url = db_url
        env = dict(os.environ, OMA_ADMIN_PASSWORD=ADMIN_PASSWORD, OMA_LOG_LEVEL="WARNING")
        self.process = subprocess.Popen(
            [str(ROOT / ".venv/bin/oma-server"), "--listen", f"127.0.0.1:{self.port}", "--db", db_url,
             "--data-dir", str(workdir)], env=env, stdout=subprocess.DEVNULL, stderr=open(workdir / "oma.log", "w"))
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from oma.v1 import auth_pb2, auth_pb2_grpc
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            if health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.1)
        self.token = auth_pb2_grpc.AuthServiceStub(channel).Login(
            auth_pb2.LoginRequest(username="admin", password=ADMIN_PASSWORD), timeout=30).token
        self.channel = channel

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def seed(db_url: str, contexts: int, credentials: int) -> tuple[str, str]:
    """Contexts written straight into the database (a running OMA would discover them); returns one
    context id in the middle and a job id of a replication that stays running (for watchers)."""
    from oma_server.db import models
    from oma_server.db.database import init_database

    database = init_database(db_url)
    with database.connection_context(), database.atomic():
        rows = [dict(context_id=f"ctx-bench-{i:06d}", vm_name=f"vm-{i:06d}", vmware_vm_id=f"vm-{i}",
                     vm_path=f"/DC0/vm/vm-{i:06d}", vcenter_host="vc.bench", datacenter="DC0") for i in range(contexts)]
        for start in range(0, len(rows), 500):
            models.VmReplicationContext.insert_many(rows[start:start + 500]).execute()
        middle = rows[len(rows) // 2]["context_id"]
        job = models.ReplicationJob.create(
            id=f"job-bench-{uuid.uuid4().hex[:8]}", vm_context=middle, source_vm_id="vm-bench",
            source_vm_name="vm-bench", source_vm_path="/DC0/vm/vm-bench", vcenter_host="vc.bench",
            datacenter="DC0", replication_type="initial", status="replicating")
    database.close()
    return middle, job.id


def add_credentials(oma: Oma, count: int) -> None:
    from oma.v1 import vmware_credentials_pb2 as pb
    from oma.v1 import vmware_credentials_pb2_grpc
    stub = vmware_credentials_pb2_grpc.VMwareCredentialServiceStub(oma.channel)
    for i in range(count):
        stub.CreateCredential(pb.CreateCredentialRequest(
            credential_name=f"bench-{i}", vcenter_host=f"vc{i}.bench:443", username="administrator@vsphere.local",
            password="not-a-real-password", datacenter="DC0", tls_insecure=True),
            metadata=(("authorization", f"Bearer {oma.token}"),), timeout=30)


def database_url(kind: str, workdir: Path) -> tuple[str, callable]:
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}", lambda: None
    import pymysql
    name = f"oma_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    host, port = os.environ.get("BENCH_MARIADB_HOST", "127.0.0.1"), int(os.environ.get("BENCH_MARIADB_PORT", "3306"))
    admin = pymysql.connect(host=host, port=port, user="root", password="", autocommit=True)
    admin.cursor().execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")

    def drop() -> None:
        admin.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()

    return f"mysql://root@{host}:{port}/{name}", drop


def migrate(db_url: str, workdir: Path) -> None:
    subprocess.run([str(ROOT / ".venv/bin/oma-server"), "migrate", "--db", db_url, "--data-dir", str(workdir)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, OMA_ADMIN_PASSWORD=ADMIN_PASSWORD))


# ---------------------------------------------------------------------------------------------------- modes
def ratio_mode(args) -> None:
    ready, stop = mp.Event(), mp.Event()
    echo_port = free_port()
    echo = mp.Process(target=_echo_server, args=(echo_port, ready, stop))
    echo.start()
    ready.wait(30)
    try:
        reference = measure(f"127.0.0.1:{echo_port}", "echo", inflight=args.inflight, seconds=args.seconds)
        print(f"echo server: {reference['rate']:.0f} req/s (p50 {reference['p50_ms']:.1f} ms)")
        for kind in args.db:
            workdir = Path(tempfile.mkdtemp(prefix=f"bench-api-{kind}-"))
            url, drop = database_url(kind, workdir)
            oma = None
            try:
                migrate(url, workdir)
                context_id, _ = seed(url, args.contexts, 0)
                oma = Oma(url, workdir)
                add_credentials(oma, 5)
                for rpc in ("GetVMContext", "ListCredentials"):
                    result = measure(oma.target, rpc, token=oma.token, argument=context_id,
                                     inflight=args.inflight, seconds=args.seconds)
                    print(f"{kind} {rpc}: {result['rate']:.0f} req/s (p50 {result['p50_ms']:.1f} ms, "
                          f"p99 {result['p99_ms']:.1f} ms)")
                    print(f"ratio: {result['rate'] / reference['rate']:.3f} ({kind} {rpc} / echo)")
            finally:
                if oma:
                    oma.stop()
                drop()
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        stop.set()
        echo.join(30)


def _hold_watchers(target: str, token: str, job_id: str, count: int, opened, release, out) -> None:
    from oma.v1 import progress_pb2, progress_pb2_grpc
    channel = grpc.insecure_channel(target)
    stub = progress_pb2_grpc.ProgressServiceStub(channel)
    metadata = (("authorization", f"Bearer {token}"),)
    streams, first = [], 0
    for _ in range(count):
        streams.append(stub.WatchReplicationProgress(
            progress_pb2.WatchReplicationProgressRequest(job_id=job_id), metadata=metadata, timeout=600))
    errors: list[str] = []
    for stream in streams:  # the first update of each proves the stream is open and served
        try:
            next(stream)
            first += 1
        except grpc.RpcError as exc:
            errors.append(exc.code().name)
    out.put({"opened": first, "errors": errors[:5]})
    opened.set()
    release.wait(600)
    for stream in streams:
        stream.cancel()


def watchers_mode(args) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from oma.v1 import vm_contexts_pb2, vm_contexts_pb2_grpc

    workdir = Path(tempfile.mkdtemp(prefix="bench-watchers-"))
    url, drop = database_url(args.db[0], workdir)
    oma = None
    opened, release, out = mp.Event(), mp.Event(), mp.Queue()
    holder = None
    try:
        migrate(url, workdir)
        context_id, job_id = seed(url, 100, 0)
        oma = Oma(url, workdir)
        holder = mp.Process(target=_hold_watchers, args=(oma.target, oma.token, job_id, args.watchers, opened,
                                                         release, out))
        holder.start()
        held = out.get(timeout=600)
        print(f"watchers open: {held['opened']} of {args.watchers}" + (f" (errors {held['errors']})" if held["errors"] else ""))
        channel = grpc.insecure_channel(oma.target)
        contexts = vm_contexts_pb2_grpc.VMContextServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        metadata = (("authorization", f"Bearer {oma.token}"),)
        unary, checks, failures = [], [], 0
        for _ in range(200):
            for call, sink in ((lambda: contexts.GetVMContext(vm_contexts_pb2.GetVMContextRequest(
                    context_id=context_id), metadata=metadata, timeout=5), unary),
                               (lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5), checks)):
                started = time.monotonic()
                try:
                    call()
                    sink.append(time.monotonic() - started)
                except grpc.RpcError:
                    failures += 1
        for name, values in (("unary GetVMContext", unary), ("health Check", checks)):
            if values:
                values.sort()
                print(f"{name}: p50 {1000 * statistics.median(values):.1f} ms, "
                      f"p99 {1000 * values[int(len(values) * 0.99) - 1]:.1f} ms ({len(values)} calls)")
        print(f"failed calls while watchers were open: {failures}")
        print(json.dumps({"watchers": held["opened"], "failures": failures}))
    finally:
        release.set()
        if holder:
            holder.join(60)
        if oma:
            oma.stop()
        drop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "mariadb", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--contexts", type=int, default=1000)
    parser.add_argument("--watchers", type=int, default=0, help="watchers mode with this many open streams")
    args = parser.parse_args()
    mp.set_start_method("spawn")  # no fork of a process that already runs gRPC threads
    args.db = ["sqlite", "mariadb"] if args.db == "both" else [args.db]
    if args.watchers:
        watchers_mode(args)
    else:
        ratio_mode(args)


if __name__ == "__main__":
    main()
