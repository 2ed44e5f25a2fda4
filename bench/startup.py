"""How long `oma-server` takes from process start to health SERVING on a fresh SQLite database
(first start: migrations + admin user) and on an existing one. Goal: under 2 s.

    .venv/bin/python bench/startup.py
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_serving(data_dir: str) -> float:
    port = free_port()
    env = {**os.environ, "OMA_DATA_DIR": data_dir, "OMA_ADMIN_PASSWORD": "bench", "OMA_LISTEN": f"127.0.0.1:{port}"}
    started = time.monotonic()
    proc = subprocess.Popen([str(ROOT / ".venv/bin/oma-server")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        while time.monotonic() - started < 30:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - started
            except grpc.RpcError:
                time.sleep(0.02)
        raise SystemExit("oma-server did not become SERVING within 30 s")
    finally:
        proc.terminate()
        proc.wait()


def main() -> int:
    with tempfile.TemporaryDirectory() as data_dir:
        first = time_to_serving(data_dir)
        again = min(time_to_serving(data_dir) for _ in range(3))
    print(f"fresh database (migrations, admin user): {first:.2f} s")
    print(f"existing database (best of 3):           {again:.2f} s")
    print(f"goal: < 2 s — {'met' if max(first, again) < 2 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
