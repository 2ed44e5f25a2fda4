"""The VMA's SSH tunnel to the OMA: the only module that runs OpenSSH (``ssh-keyscan`` and ``ssh``).

Written around the OpenSSH client rather than a Python SSH library: the tunnel must be exactly the
``ssh -F tunnel.ssh_config -N oma-tunnel`` command the agent writes to ``tunnel.command``, so an operator
can run and debug the same thing by hand, with OpenSSH's own known_hosts checking, keep-alives and
``ExitOnForwardFailure``.
"""
from __future__ import annotations

import base64
import hashlib
import subprocess
from pathlib import Path


class SshError(Exception):
    """OpenSSH could not be run, or the OMA's sshd could not be reached."""


def key_fingerprint(blob_b64: str) -> str:
    """OpenSSH's ``SHA256:<base64>`` fingerprint of a public key blob (base64 as in a key line)."""
    blob = base64.b64decode(blob_b64)
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def host_keys(host: str, port: int, timeout: float) -> list[tuple[str, str]]:
    """The Ed25519 host keys the sshd at ``host:port`` offers, as (key type, base64 blob)."""
    try:
        scanned = subprocess.run(["ssh-keyscan", "-T", str(max(1, int(timeout))), "-p", str(port), "-t", "ed25519",
                                  host], capture_output=True, text=True, timeout=timeout + 10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SshError(f"cannot run ssh-keyscan: {exc}") from None
    keys = []
    for line in scanned.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and not line.startswith("#"):
            keys.append((parts[1], parts[2]))
    if not keys:
        detail = scanned.stderr.strip().splitlines()[-1:] or ["no answer"]
        raise SshError(f"the OMA's sshd at {host}:{port} offered no Ed25519 host key ({detail[0]})")
    return keys


def known_hosts_line(host: str, port: int, key_type: str, blob_b64: str) -> str:
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {key_type} {blob_b64}\n"


class SshProcess:
    """One run of the tunnel command; its output goes to ``log_path`` (appended)."""

    def __init__(self, command: list[str], log_path: Path):
        self.command, self.log_path = command, log_path
        try:
            with open(log_path, "ab") as log:
                self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            raise SshError(f"cannot start {command[0]}: {exc}") from None

    @property
    def pid(self) -> int:
        return self._process.pid

    def exit_code(self) -> int | None:
        return self._process.poll()

    def last_error(self) -> str:
        """The last line ssh printed (why it ended)."""
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
