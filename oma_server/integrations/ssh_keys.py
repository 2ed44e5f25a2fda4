"""The SSH side of the VMA tunnel: the tunnel account's ``authorized_keys`` and the OMA's SSH host key.

This is the only module that edits the tunnel user's ``authorized_keys`` (docs/design/enrollment.md#tunnel),
through a narrow interface: add one VMA's key, remove one VMA's key. Keys are Ed25519 only and are
identified by the server-computed fingerprint *and* the exact key blob — never by text the client sent (the
original matched a client-supplied placeholder fingerprint, so a second VMA was never installed and revoking
one removed them all: E-2). Every change holds a lock (threads of this process and, through ``flock`` on a
lock file beside it, other processes) and rewrites the file atomically: a temporary file (mode 0600, owned
like the old file or, for a new one, like its directory) renamed into place, so sshd never reads a half-written file.

Each line restricts the key to exactly what the tunnel needs: ``restrict`` (no PTY, no agent/X11
forwarding, no port forwarding), then ``port-forwarding`` to allow forwarding again, limited by
``permitopen`` to the targets the VMA may reach — only the NBD export ports of its own running jobs,
rewritten when a job starts or ends (:meth:`AuthorizedKeys.set_open_ports`) — and by ``permitlisten`` to the one
OMA-side port this VMA may reverse-forward to its API, and a forced ``command`` (the wrapper), so the key
never gets a shell. (``restrict`` with only ``permitlisten`` refuses every forward: sshd tells the client
"remote port forwarding failed" — the original's E-10; the tests run a real sshd to keep this true.)

:meth:`AuthorizedKeys.sshd_config` writes the matching sshd settings for the tunnel account (``oma-server
tunnel-sshd-config``), from the same lists, so sshd's ``PermitOpen``/``PermitListen`` never disagree
with the keys' options.

The host key is sshd's Ed25519 key; VMAs pin its fingerprint (E-8). Production points at sshd's public key
file; the lab generates one in the data dir.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from server_kit.private_files import write_private

ALGORITHM = "ssh-ed25519"
_KEY_BYTES = 32
# The OMA-side address a VMA's reverse forward binds (sshd's loopback: only the OMA reaches it).
REVERSE_LISTEN_HOST = "127.0.0.1"
# Comment of every line this module writes (followed by the fingerprint), for people reading the file.
LINE_COMMENT = "vma-enrollment"
# The permitopen target of a key that may open nothing. sshd has no "none" for the key option (it refuses
# the whole line), and a key without any permitopen may open everything sshd's PermitOpen allows (every
# export port). So: one target that can never be reached — the reserved .invalid domain (RFC 6761) never
# resolves, and sshd only allows a request naming exactly this host and port.
NO_OPEN_TARGET = "nothing.invalid:1"


class SshKeyError(Exception):
    """The key file could not be read or written, or a key is not a well-formed Ed25519 key."""


@dataclass(frozen=True)
class Ed25519PublicKey:
    """An SSH Ed25519 public key by its wire blob: string "ssh-ed25519" + string(32-byte key)."""

    blob: bytes

    @property
    def raw(self) -> bytes:
        return self.blob[-_KEY_BYTES:]

    @property
    def fingerprint(self) -> str:
        """``SHA256:<base64 without padding>`` of the blob, as ``ssh-keygen -l`` prints it."""
        return fingerprint(self.blob)

    def openssh(self, comment: str = "") -> str:
        text = f"{ALGORITHM} {base64.b64encode(self.blob).decode()}"
        return f"{text} {comment}" if comment else text

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


def fingerprint(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


_BLOB_PREFIX = struct.pack(">I", len(ALGORITHM)) + ALGORITHM.encode() + struct.pack(">I", _KEY_BYTES)


def key_from_blob(blob: bytes) -> Ed25519PublicKey:
    """Validate a wire blob: exactly the length-prefixed algorithm name and a 32-byte key, nothing more
    (the original took the last 32 bytes of whatever it got)."""
    if len(blob) != len(_BLOB_PREFIX) + _KEY_BYTES or not blob.startswith(_BLOB_PREFIX):
        raise SshKeyError(f"not an {ALGORITHM} key blob (length-prefixed algorithm name and 32-byte key)")
    return Ed25519PublicKey(blob)


def parse_public_key(text: str) -> tuple[Ed25519PublicKey, str]:
    """``ssh-ed25519 <base64 blob> [comment]`` → (key, comment). The algorithm named in the text must
    match the one inside the blob."""
    parts = text.strip().split(None, 2)
    if len(parts) < 2:
        raise SshKeyError(f"expected '{ALGORITHM} <base64> [comment]'")
    if parts[0] != ALGORITHM:
        raise SshKeyError(f"only {ALGORITHM} keys are accepted, not {parts[0][:40]!r}")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise SshKeyError("the key is not valid base64") from None
    return key_from_blob(blob), parts[2].strip() if len(parts) == 3 else ""


def _split_options(line: str) -> tuple[str, str]:
    """An authorized_keys line → (options, rest starting at the key type). Options end at the first
    whitespace outside double quotes (where ``\\"`` is a literal quote)."""
    if line.startswith(("ssh-", "ecdsa-", "sk-")):
        return "", line
    quoted, i = False, 0
    while i < len(line) and (quoted or not line[i].isspace()):
        if quoted and line[i] == "\\":
            i += 1
        elif line[i] == '"':
            quoted = not quoted
        i += 1
    return line[:i], line[i:].lstrip()


def _line_blob(line: str) -> bytes | None:
    """The key blob of an authorized_keys line (None for comments, blank or unparsable lines)."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    parts = _split_options(stripped)[1].split(None, 2)
    if len(parts) < 2:
        return None
    try:
        return base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return None


class _FileLock:
    """Exclusive use of one key file: re-entrant for the holding thread, threads of this process wait on a
    lock, other processes on ``flock`` of ``<file>.lock``."""

    def __init__(self, path: Path):
        self._lock_file = Path(f"{path}.lock")
        self._lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                try:
                    self._lock_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    self._fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT, 0o600)
                    fcntl.flock(self._fd, fcntl.LOCK_EX)
                except OSError as exc:
                    if self._fd is not None:
                        os.close(self._fd)
                        self._fd = None
                    raise SshKeyError(f"cannot lock {self._lock_file}: {exc.strerror or exc}") from None
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    os.close(self._fd)  # releases the flock
                    self._fd = None


_file_locks: dict[Path, _FileLock] = {}
_file_locks_guard = threading.Lock()


def _file_lock(path: Path) -> _FileLock:
    with _file_locks_guard:
        return _file_locks.setdefault(path, _FileLock(path))


class AuthorizedKeys:
    """The tunnel account's authorized_keys file (``path``) and the options every VMA key gets."""

    def __init__(self, path: Path, *, forced_command: str, permit_open: Sequence[str]):
        if any(c in forced_command for c in '"\\\n\r') or not forced_command:
            raise ValueError("the tunnel's forced command must be non-empty without quotes, backslashes or newlines")
        self.path = Path(path)
        self._forced_command = forced_command
        self._permit_open = tuple(permit_open)
        self._file_lock = _file_lock(self.path.absolute())

    def open_targets(self, ports: Sequence[int]) -> list[str]:
        """The ``host:port`` targets of sshd's PermitOpen list on these ports (others are never granted)."""
        wanted = {int(port) for port in ports}
        return [target for target in self._permit_open if int(target.rpartition(":")[2]) in wanted]

    def options(self, reverse_port: int, open_ports: Sequence[int] | None = None) -> str:
        """The forwarding restrictions of a VMA whose API is reverse-forwarded to ``reverse_port`` and that
        may reach the NBD exports on ``open_ports`` (empty: none, :data:`NO_OPEN_TARGET`). ``None``: every
        export port sshd allows — what the VMA is told to set its local forwards up for (the enrollment
        result); the key's own line grants only its jobs' ports."""
        targets = list(self._permit_open) if open_ports is None else self.open_targets(open_ports)
        targets = targets or [NO_OPEN_TARGET]
        opens = ",".join(f'permitopen="{target}"' for target in targets)
        return f'restrict,port-forwarding,{opens},permitlisten="{REVERSE_LISTEN_HOST}:{reverse_port}"'

    def sshd_config(self, ssh_user: str, ssh_port: int, reverse_ports: range) -> str:
        """sshd settings for the tunnel account (a drop-in for /etc/ssh/sshd_config.d/): public keys from
        this file only, no shell, TTY, X11, agent or socket forwarding, and exactly the forwards the keys'
        options allow — PermitOpen the same targets, PermitListen every reverse port the OMA hands out."""
        listens = " ".join(f"{REVERSE_LISTEN_HOST}:{port}" for port in reverse_ports)
        return "\n".join([
            "# The VMA tunnel account, generated by `oma-server tunnel-sshd-config` from the OMA's settings",
            "# (see docs/design/enrollment.md#tunnel). Regenerate it when the NBD or reverse port ranges change.",
            f"# sshd must also listen on the tunnel port: add `Port {ssh_port}` next to the existing Port lines",
            "# (a Port line here alone would replace port 22).",
            f"Match User {ssh_user}",
            f"    AuthorizedKeysFile {self.path.absolute()}",
            "    AuthenticationMethods publickey",
            "    PubkeyAuthentication yes",
            "    PasswordAuthentication no",
            "    KbdInteractiveAuthentication no",
            "    PermitTTY no",
            "    X11Forwarding no",
            "    AllowAgentForwarding no",
            "    AllowStreamLocalForwarding no",
            "    AllowTcpForwarding yes",
            "    GatewayPorts no",
            f"    PermitOpen {' '.join(self._permit_open) or 'none'}",
            f"    PermitListen {listens or 'none'}",
            f"    ForceCommand {self._forced_command}",
            "    ClientAliveInterval 30",
            "    ClientAliveCountMax 3",
            "",
        ])

    def line(self, key: Ed25519PublicKey, reverse_port: int, open_ports: Sequence[int] = ()) -> str:
        return (f'command="{self._forced_command}",{self.options(reverse_port, list(open_ports))} '
                f"{key.openssh(f'{LINE_COMMENT} {key.fingerprint}')}")

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the file's lock (re-entrant in this thread), e.g. around a change and the database
        transaction that records it."""
        return self._file_lock.held()

    def _read_lines(self) -> list[str]:
        try:
            return self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise SshKeyError(f"cannot read {self.path}: {getattr(exc, 'strerror', None) or exc}") from None

    def _write_lines(self, lines: list[str]) -> None:
        try:
            # sshd reads the file as the tunnel user: keep the old file's owner, or take the .ssh directory's.
            owner = (self.path if self.path.exists() else self.path.parent).stat()
            write_private(self.path, "".join(f"{line}\n" for line in lines),
                          owner=(owner.st_uid, owner.st_gid) if os.geteuid() == 0 else None)
        except OSError as exc:
            raise SshKeyError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def add(self, key: Ed25519PublicKey, reverse_port: int, open_ports: Sequence[int] = ()) -> None:
        """Install ``key`` with the tunnel options (a line with the same blob is replaced)."""
        with self.locked():
            kept = [line for line in self._read_lines() if _line_blob(line) != key.blob]
            self._write_lines([*kept, self.line(key, reverse_port, open_ports)])

    def set_open_ports(self, grants: Sequence[tuple[Ed25519PublicKey, int, Sequence[int]]]) -> int:
        """Rewrite the lines of these keys — ``(key, reverse_port, open_ports)`` each — so each may reach
        exactly its ``open_ports``; lines of other keys are kept as they are, a key without a line is not
        added (it was revoked). One atomic write, only when something changed; returns the lines changed."""
        wanted = {key.blob: self.line(key, reverse_port, open_ports) for key, reverse_port, open_ports in grants}
        with self.locked():
            lines = self._read_lines()
            rewritten = [wanted.get(_line_blob(line), line) for line in lines]
            changed = sum(old != new for old, new in zip(lines, rewritten, strict=True))
            if changed:
                self._write_lines(rewritten)
            return changed

    def remove(self, key: Ed25519PublicKey) -> int:
        """Remove every line of exactly this key blob; returns how many there were."""
        with self.locked():
            lines = self._read_lines()
            kept = [line for line in lines if _line_blob(line) != key.blob]
            if len(kept) != len(lines):
                self._write_lines(kept)
            return len(lines) - len(kept)


def load_host_key(public_key_file: str | Path, data_dir: Path) -> Ed25519PublicKey:
    """The OMA's SSH host key: sshd's Ed25519 public key file when configured (it must exist), else
    ``<data_dir>/ssh_host_ed25519_key`` (generated on first use, private part 0600) for the lab."""
    if public_key_file:
        path = Path(public_key_file)
    else:
        private = data_dir / "ssh_host_ed25519_key"
        path = private.with_name(private.name + ".pub")
        if not path.exists():
            _generate_host_key(private, path)
    try:
        return parse_public_key(path.read_text())[0]
    except OSError as exc:
        raise SshKeyError(f"cannot read the SSH host key {path}: {exc.strerror or exc}") from None


def _generate_host_key(private: Path, public: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    private.parent.mkdir(parents=True, exist_ok=True)
    write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()))
    blob_text = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_text(f"{blob_text.decode()} oma-tunnel-host\n")
