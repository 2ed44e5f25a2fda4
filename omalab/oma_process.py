"""A real ``oma-server`` process (not an in-process server), for tests that kill the OMA.

    with OmaProcess(data_dir, db_url, vma_address="127.0.0.1:9091", nbd_port_min=20000, ...) as oma:
        client = OmaClient(oma.address, token="")
        ...
        oma.kill()     # SIGKILL: no cleanup runs; its nbdkit exports die with it (--exit-with-parent)
        oma.start()    # same port, database, data dir (keys) and instance name (its job leases) as before

Settings are passed as ``OMA_<NAME>`` variables, exactly as an operator's unit file would. The port is
fixed on the first start so clients reconnect to the restarted server; the instance name is fixed so the
restarted process takes back the jobs it leased before it died (``ReplicationWorkflow.start``).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

from omalab.servers import ADMIN_PASSWORD, VMA_TOKEN

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OmaProcess:
    def __init__(self, data_dir: Path, db_url: str, *, instance_name: str = "lab-oma", **settings: Any):
        self.data_dir = Path(data_dir)
        self.db_url = db_url
        self.settings = {"admin_password": ADMIN_PASSWORD, "vma_token": VMA_TOKEN, "instance_name": instance_name,
                         "cloudstack_poll_interval_seconds": 0.1, **settings}
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Self:
        if not self.port:
            self.port = _free_port()
        env = {**os.environ, **{f"OMA_{k.upper()}": str(v) for k, v in self.settings.items()}}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        out = self.data_dir.parent / f"{self.data_dir.name}.out"
        out.write_bytes(b"")
        with open(out, "wb") as stdout, open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "oma_server.cli", "--listen", self.address, "--db", self.db_url,
                 "--data-dir", str(self.data_dir)],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        # A port another process took between two starts would show here as a start that never serves.
        while b"serving on port" not in out.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"oma-server did not start; log: {self.data_dir.parent / self.data_dir.name}.log")
            time.sleep(0.1)
        return self

    def kill(self) -> None:
        """SIGKILL the server: no lease is handed back, no export stopped by it (nbdkit follows its parent)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.stop()
