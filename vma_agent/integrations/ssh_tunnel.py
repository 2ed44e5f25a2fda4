"""The VMA's SSH tunnel to the OMA: the only module that runs OpenSSH (``ssh-keyscan`` and ``ssh``).

Written around the OpenSSH client rather than a Python SSH library: the tunnel must be exactly the
``ssh -F tunnel.ssh_config -N oma-tunnel`` command the agent writes to ``tunnel.command``, so an operator
can run and debug the same thing by hand, with OpenSSH's own known_hosts checking, keep-alives and
``ExitOnForwardFailure``.
"""
from __future__ import annotations

import base64
import hashlib
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

#: The ``Host`` alias of the tunnel in ``tunnel.ssh_config`` (what ``ssh -F … -N oma-tunnel`` names).
HOST_ALIAS = "oma-tunnel"
# ssh_config(5) expands %-tokens in these directives; a literal % is written %%. Elsewhere a % is refused.
_TOKEN_DIRECTIVES = frozenset({"HostName", "IdentityFile", "UserKnownHostsFile"})
_DIRECTIVE = re.compile(r"[A-Z][A-Za-z0-9]+")
# Any character that could end the line, or that OpenSSH's own config tokenizer treats specially inside
# a quoted value (quote, backslash), or that starts an environment variable ($): such values are refused,
# never escaped.
_UNSAFE = re.compile(r'[\x00-\x1f\x7f"\\$\u0085\u2028\u2029]')
# Characters that make a value need quoting (else it would be split into several arguments or cut at #).
_NEEDS_QUOTES = re.compile(r"[\s#=']")
_LINE_BREAK = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")


class SshError(Exception):
    """OpenSSH could not be run, or the OMA's sshd could not be reached."""


class SshConfigError(ValueError):
    """A value cannot be written into an ssh configuration safely."""


def _config_value(directive: str, value: str) -> str:
    if not value or _UNSAFE.search(value):
        raise SshConfigError(f"{directive}: {value[:100]!r} cannot be written into an ssh configuration "
                             f"(empty, or contains a line break, control character, quote, backslash or $)")
    if "%" in value:
        if directive not in _TOKEN_DIRECTIVES:
            raise SshConfigError(f"{directive}: {value[:100]!r} contains %, which ssh would expand")
        value = value.replace("%", "%%")
    return f'"{value}"' if _NEEDS_QUOTES.search(value) else value


def ssh_config_text(comments: Sequence[str], directives: Sequence[tuple[str, ...]]) -> str:
    """The one place an ssh_config is written: ``Host`` :data:`HOST_ALIAS` followed by ``directives``, each
    ``(name, argument, …)`` on one line. Every argument is checked so it cannot span lines or add a
    directive (refused with :class:`SshConfigError` otherwise), quoted when it contains spaces, and ``%``
    is escaped where ssh expands tokens. Comments are single lines too."""
    lines = []
    for comment in comments:
        if _LINE_BREAK.search(comment):
            raise SshConfigError(f"comment {comment[:100]!r} contains a line break or control character")
        lines.append(f"# {comment}")
    lines.append(f"Host {HOST_ALIAS}")
    for directive, *arguments in directives:
        if not _DIRECTIVE.fullmatch(directive) or not arguments:
            raise SshConfigError(f"{directive!r} is not an ssh_config directive with arguments")
        lines.append(f"    {directive} {' '.join(_config_value(directive, a) for a in arguments)}")
    return "\n".join(lines) + "\n"


def tunnel_command(config_path: Path) -> list[str]:
    """The tunnel's command line: ssh with only the agent's configuration, no remote command."""
    return ["ssh", "-F", str(config_path), "-N", HOST_ALIAS]


def key_fingerprint(blob_b64: str) -> str:
    """OpenSSH's ``SHA256:<base64>`` fingerprint of a public key blob (base64 as in a key line)."""
    blob = base64.b64decode(blob_b64)
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def host_keys(host: str, port: int, timeout: float) -> list[tuple[str, str]]:
    """The Ed25519 host keys the sshd at ``host:port`` offers, as (key type, base64 blob)."""
    if not host or host.startswith("-") or any(c.isspace() for c in host):  # never an option to ssh-keyscan
        raise SshError(f"{host[:100]!r} is not a host name")
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
