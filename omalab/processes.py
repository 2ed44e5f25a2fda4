"""Supervision of the lab's separate processes: start each in its own process group with its output in
files, wait for its "I am listening" line or its gRPC health, and stop everything on the way out.

Hand-written on the standard library: what the lab needs (process groups, adopting orphans as a child
subreaper, reaping them by pid) is a few Linux calls that no well-kept supervision library offers as a
plain importable API (supervisord and circus are daemons with their own configuration).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class LabError(Exception):
    """A step failed; the message says which and why."""


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    out: Path  # stdout: the line that says it is ready
    log: Path  # stderr: its log

    def tail(self, lines: int = 15) -> str:
        text = ""
        for path in (self.out, self.log):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return "\n".join("      | " + line for line in text.splitlines()[-lines:])


@dataclass
class Processes:
    """Everything the lab starts, each in its own process group; ``stop_all`` ends them newest first."""
    logs: Path
    run_env: dict[str, str]
    announce: Callable[[str], None] = print  # shows each command line before it starts
    services: list[Service] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, *,
              keep_stdin_open: bool = False) -> Service:
        out, log = self.logs / f"{name}.out", self.logs / f"{name}.log"
        shown_env = " ".join(f"{k}={_mask(k, v)}" for k, v in (env or {}).items())
        self.announce(f"$ {shown_env + ' ' if shown_env else ''}{shlex.join(_short(argv))}")
        with open(out, "wb") as stdout, open(log, "wb") as stderr:
            proc = subprocess.Popen(
                argv, cwd=REPO, env={**self.run_env, **(env or {})}, stdout=stdout, stderr=stderr,
                # vcsim exits when its stdin closes, i.e. also when this process dies without cleaning up
                stdin=subprocess.PIPE if keep_stdin_open else subprocess.DEVNULL,
                start_new_session=True,  # its own process group: the terminal's Ctrl-C reaches only us
            )
        service = Service(name, proc, out, log)
        self.services.append(service)
        return service

    def ready_line(self, service: Service, pattern: str, timeout: float, slow_hint: str = "") -> re.Match:
        """Wait for the first stdout line matching ``pattern`` (the service's "I am listening" line);
        ``slow_hint`` is announced once when that takes more than 5 seconds."""
        started, hinted = time.monotonic(), False
        while True:
            with contextlib.suppress(OSError):
                for line in service.out.read_text(errors="replace").splitlines():
                    if match := re.search(pattern, line):
                        return match
            if service.proc.poll() is not None:
                raise LabError(f"{service.name} exited with status {service.proc.returncode} while starting")
            if time.monotonic() > started + timeout:
                raise LabError(f"{service.name} did not start within {timeout:.0f}s")
            if slow_hint and not hinted and time.monotonic() > started + 5:
                self.announce(slow_hint)
                hinted = True
            time.sleep(0.05)

    def stop_all(self) -> None:
        for service in reversed(self.services):
            stop_group(service.proc)
            if service.proc.stdin:
                with contextlib.suppress(OSError):
                    service.proc.stdin.close()
        self.services.clear()
        reap_orphans()


def stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it if the leader does not exit in time."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def become_subreaper() -> None:
    """Orphaned grandchildren (e.g. nbdkit in its own session) are re-parented to us, not to init."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _children() -> list[int]:
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                    found.append(int(entry.name))
    return found


def reap_orphans() -> None:
    """End any process still parented to us (adopted orphans), by pid, and reap it."""
    started = time.monotonic()
    while pids := _children():
        if time.monotonic() > started + 15:
            print(f"lab: warning: could not end processes {pids}", file=sys.stderr)
            return
        sig = signal.SIGTERM if time.monotonic() < started + 5 else signal.SIGKILL
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                if os.waitpid(pid, os.WNOHANG) == (0, 0):
                    os.kill(pid, sig)
        time.sleep(0.1)


def _short(argv: list[str]) -> list[str]:
    """Paths relative to the repository, for reading."""
    return [os.path.relpath(a, REPO) if a.startswith(str(REPO) + "/") else a for a in argv]


def _mask(name: str, value: str) -> str:
    return "***" if any(word in name for word in ("PASSWORD", "TOKEN", "SECRET")) else value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(service: Service, address: str, timeout: float = 30.0) -> None:
    """gRPC health check until SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline, serving = time.monotonic() + timeout, health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.RpcError):
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == serving:
                    return
            if service.proc.poll() is not None:
                raise LabError(f"{service.name} exited with status {service.proc.returncode}")
            if time.monotonic() > deadline:
                raise LabError(f"{service.name} at {address} is not healthy after {timeout:.0f}s")
            time.sleep(0.1)
