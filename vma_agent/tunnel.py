"""Keeping the approved agent's SSH tunnel to the OMA up (docs/design/enrollment.md#agent-side).

The original left the tunnel's configuration, known hosts, restart and test as placeholders and disabled
host-key checking (E-8, E-9). Once the enrollment is approved, this keeper:

1. pins the OMA's SSH host key: asks the OMA's sshd for its Ed25519 key (ssh-keyscan) and writes
   ``known_hosts`` only if its fingerprint is the ``host_key_hash`` the OMA sent with the approval —
   otherwise it does not connect and says why (a different key is a different server);
2. runs ``ssh -F tunnel.ssh_config -N oma-tunnel`` (the configuration the enrollment wrote from checked
   values; the command line is the agent's own, the ``tunnel.command`` file only shows it) and restarts
   it ``restart_delay`` after it ends (like the original systemd unit's ``Restart=always``, 10 s);
3. reports the tunnel up only when the OMA confirms it reached this agent through the reverse forward:
   the OMA's connection monitor records ``last_seen_at``, and GetEnrollmentResult returns it — a value
   newer than the one before this run of ssh started proves this very tunnel works (no clock comparison);
4. stops for good when the OMA says the tunnel access was revoked.

Every change is written to the enrollment state (``tunnel_configured`` and the message), which
GetEnrollmentStatus reports.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from vma_agent.integrations import ssh_tunnel

log = logging.getLogger("vma_agent.tunnel")

KNOWN_HOSTS_FILE, TUNNEL_LOG_FILE, SSH_CONFIG_FILE = "known_hosts", "tunnel.log", "tunnel.ssh_config"


class TunnelCheckError(Exception):
    """The OMA could not be asked about the tunnel (it will be asked again)."""


@dataclass(frozen=True)
class TunnelView:
    """The OMA's view of this agent's tunnel: when its monitor last reached the agent through it, and
    whether the access was revoked."""

    tunnel_last_seen_at: datetime | None
    access_revoked: bool


class EnrollmentView(Protocol):
    """What the keeper needs from the enrollment (``vma_agent.enrollment.Enrollment``)."""

    directory: Any

    def approved_record(self) -> Any: ...
    def tunnel_result(self) -> TunnelView: ...
    def record_tunnel(self, configured: bool, message: str) -> None: ...
    def write_private_file(self, name: str, text: str) -> None: ...


class TunnelKeeper:
    def __init__(self, enrollment: EnrollmentView, *, restart_delay: float, check_interval: float,
                 keyscan_timeout: float):
        self._enrollment = enrollment
        self._restart_delay, self._interval, self._keyscan_timeout = restart_delay, check_interval, keyscan_timeout
        self._process: ssh_tunnel.SshProcess | None = None
        self._seen_before: Any = None  # the OMA's last_seen_at when the current ssh started
        self._next_start = 0.0
        self._revoked = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="vma-tunnel", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=15)
        self._end_process()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a bug or a broken file must not end the keeper
                log.exception("tunnel keeper step failed")
            if self._stop.wait(self._interval):
                return

    # --- one step ----------------------------------------------------------------------------------------

    def step(self) -> None:
        record = self._enrollment.approved_record()
        if record is None or self._revoked:
            self._end_process()
            return
        known_hosts = self._enrollment.directory / KNOWN_HOSTS_FILE
        if not known_hosts.exists() and not self._pin(record):
            return
        if self._process is None:
            self._start(record)
        elif (code := self._process.exit_code()) is not None:
            reason = self._process.last_error() or "no output"
            self._process = None
            self._next_start = time.monotonic() + self._restart_delay
            self._down(f"tunnel down: ssh exited with status {code} ({reason}); restarting in "
                       f"{self._restart_delay:g} s")
            self._check_revoked()
        elif not record.tunnel_configured:
            self._confirm(record)

    def _pin(self, record: Any) -> bool:
        if time.monotonic() < self._next_start:
            return False
        try:
            offered = ssh_tunnel.host_keys(record.oma_host, record.ssh_port, self._keyscan_timeout)
        except ssh_tunnel.SshError as exc:
            self._next_start = time.monotonic() + self._restart_delay
            self._down(f"tunnel down: {exc}; retrying in {self._restart_delay:g} s")
            return False
        for key_type, blob in offered:
            if ssh_tunnel.key_fingerprint(blob) == record.host_key_hash:
                self._enrollment.write_private_file(
                    KNOWN_HOSTS_FILE, ssh_tunnel.known_hosts_line(record.oma_host, record.ssh_port, key_type, blob))
                log.info("pinned the OMA's SSH host key %s", record.host_key_hash)
                return True
        fingerprints = ", ".join(ssh_tunnel.key_fingerprint(blob) for _, blob in offered)
        self._next_start = time.monotonic() + self._restart_delay
        self._down(f"tunnel not started: the sshd at {record.oma_host}:{record.ssh_port} offers host key "
                   f"{fingerprints}, not the {record.host_key_hash} the OMA approved this agent with")
        return False

    def _start(self, record: Any) -> None:
        if time.monotonic() < self._next_start:
            return
        try:
            self._seen_before = self._oma_view().tunnel_last_seen_at
        except TunnelCheckError as exc:
            self._next_start = time.monotonic() + self._restart_delay
            self._down(f"tunnel not started: {exc}")
            return
        if self._revoked:
            return
        # The command line is built here, not read from tunnel.command (that file is for people): nothing
        # in a file can add an argument to ssh.
        command = ssh_tunnel.tunnel_command(self._enrollment.directory / SSH_CONFIG_FILE)
        try:
            self._process = ssh_tunnel.SshProcess(command, self._enrollment.directory / TUNNEL_LOG_FILE)
        except (OSError, ssh_tunnel.SshError) as exc:
            self._next_start = time.monotonic() + self._restart_delay
            self._down(f"tunnel not started: {exc}")
            return
        self._enrollment.record_tunnel(False, f"tunnel starting (ssh pid {self._process.pid}); waiting for the "
                                              f"OMA to reach this agent through port {record.reverse_tunnel_port}")

    def _confirm(self, record: Any) -> None:
        try:
            view = self._oma_view()
        except TunnelCheckError:
            return  # asked again next step
        if self._revoked:
            return
        seen = view.tunnel_last_seen_at
        if seen is not None and (self._seen_before is None or seen > self._seen_before):
            self._enrollment.record_tunnel(True, f"tunnel up: the OMA reached this agent through its port "
                                                 f"{record.reverse_tunnel_port} at {seen.isoformat()}")
            log.info("tunnel to %s up (reverse port %d)", record.oma_host, record.reverse_tunnel_port)

    def _check_revoked(self) -> None:
        try:
            self._oma_view()
        except TunnelCheckError:
            pass

    def _oma_view(self) -> Any:
        view = self._enrollment.tunnel_result()
        if view.access_revoked and not self._revoked:
            self._revoked = True
            self._end_process()
            self._down("tunnel stopped: the OMA revoked this agent's tunnel access; enroll again to reconnect")
        return view

    def _down(self, message: str) -> None:
        log.warning("%s", message)
        self._enrollment.record_tunnel(False, message)

    def _end_process(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
