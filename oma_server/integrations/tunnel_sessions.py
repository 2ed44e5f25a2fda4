"""Ending a VMA's live tunnel session when its access is revoked
(docs/design/enrollment.md#approval-and-revocation).

Removing the key stops new logins, but sshd does not re-check the keys of sessions already open, so the
revoked VMA would keep its tunnel until it reconnects. Each VMA's session is exactly the sshd process that
listens on that VMA's reverse-forward port: its key's ``permitlisten`` allows that one port, and the port
belongs to no other VMA. So the session is found by the listener and ended with SIGTERM (SIGKILL if it
lingers). Only processes named like sshd are signalled, never this process: whatever else may listen on
the port is left alone.

psutil reads the socket table and owner processes (a well-kept library instead of parsing /proc by hand).
Seeing and signalling sshd's session processes needs root (or CAP_KILL with CAP_SYS_PTRACE); without it
the problem is reported, not raised: the key is already gone.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import psutil

from oma_server.integrations.ssh_keys import REVERSE_LISTEN_HOST

log = logging.getLogger("oma_server.enrollment")

SSHD_PROCESS_NAMES = ("sshd",)
_GRACE_SECONDS = 5.0


@dataclass
class EndedSessions:
    """The session processes that were ended, and what stopped others from being ended."""

    pids: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def end_sessions(port: int, host: str = REVERSE_LISTEN_HOST,
                 process_names: tuple[str, ...] = SSHD_PROCESS_NAMES) -> EndedSessions:
    """End the sshd sessions listening on ``host:port`` (a revoked VMA's reverse-forward port)."""
    ended = EndedSessions()
    try:
        listeners = {c.pid for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.ip == host and c.laddr.port == port}
    except psutil.AccessDenied:
        ended.problems.append(f"cannot read the socket table to find the session on {host}:{port} "
                              "(the OMA needs root or CAP_SYS_PTRACE)")
        return ended
    if None in listeners:
        ended.problems.append(f"the process listening on {host}:{port} is not visible to the OMA")
    for pid in sorted(p for p in listeners if p is not None and p != os.getpid()):
        try:
            process = psutil.Process(pid)
            if process.name() not in process_names:
                log.info("%s:%d is held by %s (pid %d), not an sshd session: left alone", host, port,
                         process.name(), pid)
                continue
            process.terminate()
            try:
                process.wait(_GRACE_SECONDS)
            except psutil.TimeoutExpired:
                process.kill()
            ended.pids.append(pid)
        except psutil.NoSuchProcess:
            ended.pids.append(pid)  # it ended by itself meanwhile
        except psutil.AccessDenied:
            ended.problems.append(f"not allowed to end the sshd session pid {pid} on {host}:{port}")
    return ended
