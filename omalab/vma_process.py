"""A real ``vma-agent`` process (not an in-process server), for tests and benchmarks that kill it.

    with VmaProcess(work_dir, datastore_map="LocalDS_0=/...", source_rate_limit_mbps=40) as agent:
        stub = agent.replication()
        ...
        agent.kill()        # SIGKILL: no cleanup of any kind runs
        agent.start()       # same port, same work dir (journal) as before
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

import grpc
from vma.v1 import progress_pb2_grpc, replication_pb2_grpc

from omalab.servers import VMA_TOKEN

REPO = Path(__file__).resolve().parents[1]
AUTH = (("authorization", f"Bearer {VMA_TOKEN}"),)


class VmaProcess:
    def __init__(self, work_dir: Path, **settings: Any):
        self.work_dir = Path(work_dir)
        self.settings = {"source_mode": "file", "auth_token": VMA_TOKEN, "work_dir": str(work_dir),
                         "log_level": "INFO", **settings}
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.ready_at = 0.0
        self._channel: grpc.Channel | None = None

    def start(self, timeout: float = 60.0) -> Self:
        env = dict(os.environ)
        env.update({f"VMA_{k.upper()}": str(v) for k, v in self.settings.items()})
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.work_dir / "agent.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vma_agent.cli", "--listen", f"127.0.0.1:{self.port}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if "serving on port" not in line:
            self.proc.kill()
            raise RuntimeError(f"vma-agent did not start: {line!r}; log: {self.work_dir / 'agent.log'}")
        assert time.monotonic() < deadline
        self.port = int(line.rsplit(" ", 1)[1])
        self.ready_at = time.monotonic()
        self._channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        grpc.channel_ready_future(self._channel).result(timeout=timeout)
        return self

    def kill(self) -> None:
        """SIGKILL the agent (its nbdkit children follow it: --exit-with-parent)."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self.proc is not None and self.proc.stdout:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        self.proc = None

    def replication(self) -> replication_pb2_grpc.ReplicationServiceStub:
        assert self._channel is not None
        return replication_pb2_grpc.ReplicationServiceStub(self._channel)

    def progress(self) -> progress_pb2_grpc.ProgressServiceStub:
        assert self._channel is not None
        return progress_pb2_grpc.ProgressServiceStub(self._channel)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
