"""NBD exports of the attached replica volumes: one ``nbdkit file`` process per volume on a TCP port,
so the VMA's data mover can write to it. (The nbdkit process wrapper is shared with the agent:
``vma_agent.integrations.nbdkit``.)

Exports live as long as the OMA process (nbdkit runs with --exit-with-parent) and are reused by every
sync of the same volume; ``ensure`` restarts one whose process died (e.g. after an OMA restart).

With ``psk_for`` an export served for a job requires TLS with that job's pre-shared key
(``--tls=require --tls-psk=FILE``; identity = the job id): the key file (0600, in ``psk_dir``, 0700)
exists while the export runs, and an export is restarted when the next job of its volume comes with
another key. An export served for no job gets a random key nobody has. The key is never on a command
line (visible in ``ps``) nor in a log.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from oma_server.errors import FailedPrecondition, Unavailable
from server_kit.private_files import write_private
from vma_agent.integrations.nbdkit import NbdkitError, NbdkitServer, file_plugin_args

log = logging.getLogger("oma_server.nbd")


UNBOUND_IDENTITY = "no-job"


@dataclass(frozen=True)
class ExportTls:
    """TLS-PSK of an export: the identity a client names and its key (kept out of repr)."""

    identity: str
    psk: bytes = field(repr=False)

    def psk_file_line(self) -> str:
        return f"{self.identity}:{self.psk.hex()}\n"


@dataclass(frozen=True)
class Export:
    name: str
    device_path: str
    port: int
    uri: str
    tls: ExportTls | None = None


class ExportManager:
    def __init__(self, *, bind_host: str, public_host: str, port_min: int, port_max: int,
                 psk_dir: Path | None = None, psk_for: Callable[[str], bytes] | None = None):
        if (psk_dir is None) != (psk_for is None):
            raise ValueError("give both psk_dir and psk_for, or neither")
        self._bind, self._public = bind_host, public_host
        self._ports = range(port_min, port_max + 1)
        self._servers: dict[str, tuple[NbdkitServer, Export]] = {}
        self._lock = threading.Lock()
        self._psk_dir, self._psk_for = psk_dir, psk_for
        self._psk_files: dict[str, Path] = {}  # export name → the key file its running nbdkit reads

    def tls_for(self, job_id: str | None) -> ExportTls | None:
        """The TLS-PSK of a job's exports (None without TLS or without a job)."""
        if self._psk_for is None or not job_id:
            return None
        return ExportTls(job_id, self._psk_for(job_id))

    def _write_psk_file(self, name: str, tls: ExportTls) -> Path:
        """A key file for one nbdkit run. Its name is unique to this run: several OMA processes of one
        appliance share the data dir, and one process stopping its server for an export must never remove
        the file another process's nbdkit of the same export reads (nbdkit reads it at start and on every
        TLS handshake)."""
        self._psk_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._psk_dir.chmod(0o700)
        path = self._psk_dir / f"{name}.{os.getpid()}-{secrets.token_hex(4)}.psk"
        write_private(path, tls.psk_file_line())
        return path

    def _stop_server(self, name: str, server: NbdkitServer) -> None:
        server.stop()
        psk_file = self._psk_files.pop(name, None)
        if psk_file is not None:
            psk_file.unlink(missing_ok=True)

    def _bindable(self, port: int) -> bool:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self._bind, port))
            except OSError:
                return False
        return True

    def _free_port(self, preferred: int | None = None) -> int:
        used = {export.port for _, export in self._servers.values()}
        if preferred and preferred not in used:
            # An agent may still be writing to this port: wait a little for a previous server to let go.
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                if self._bindable(preferred):
                    return preferred
                time.sleep(0.1)
        for port in self._ports:
            if port not in used and self._bindable(port):
                return port
        raise Unavailable(f"no free NBD port left in {self._ports.start}-{self._ports.stop - 1}")

    def ensure(self, name: str, device_path: str, port: int | None = None, job_id: str | None = None) -> Export:
        """A running export of ``device_path`` named ``name`` (reused when already running for the same
        job key). ``port``: serve on this port if it is free (an agent may still be writing to the old
        URI). ``job_id``: the job the export serves (with TLS: its key)."""
        tls = self.tls_for(job_id)
        with self._lock:
            current = self._servers.get(name)
            if tls is None and self._psk_for is not None:
                # Served for no job (a volume back on the OMA after a failover): TLS with a key nobody
                # has, so the export opens for nobody until a job serves it with its own key.
                kept = current[1].tls if current is not None else None
                tls = kept if kept is not None and kept.identity == UNBOUND_IDENTITY else ExportTls(
                    UNBOUND_IDENTITY, secrets.token_bytes(32))
            if current is not None:
                server, export = current
                if server.alive() and export.device_path == device_path and export.tls == tls:
                    return export
                self._stop_server(name, server)
                del self._servers[name]
                port = port or export.port
            port = self._free_port(port)
            extra_args: list[str] = []
            psk_file: Path | None = None
            if tls is not None:
                psk_file = self._write_psk_file(name, tls)
                extra_args = ["--tls=require", f"--tls-psk={psk_file}"]
            server = NbdkitServer(file_plugin_args(device_path), tcp_host=self._bind, tcp_port=port,
                                  export_name=name, extra_args=extra_args)
            try:
                server.start()
            except NbdkitError as exc:
                if psk_file is not None:
                    psk_file.unlink(missing_ok=True)
                raise FailedPrecondition(f"cannot export {device_path} over NBD: {exc}") from None
            export = Export(name, device_path, port, f"nbd://{self._public}:{port}/{name}", tls)
            self._servers[name] = (server, export)
            if psk_file is not None:
                self._psk_files[name] = psk_file
            log.info("NBD export %s of %s on port %d", name, device_path, port)
            return export

    def current(self, name: str) -> tuple[Export, list[str]] | None:
        """The running export ``name`` and its nbdkit command line (None when it is not running)."""
        with self._lock:
            current = self._servers.get(name)
            return (current[1], current[0].argv()) if current and current[0].alive() else None

    def alive(self, name: str) -> bool:
        with self._lock:
            current = self._servers.get(name)
            return bool(current and current[0].alive())

    def remove(self, name: str) -> None:
        with self._lock:
            current = self._servers.pop(name, None)
        if current:
            self._stop_server(name, current[0])

    def stop(self) -> None:
        with self._lock:
            servers = list(self._servers.items())
            self._servers.clear()
        for name, (server, _) in servers:
            self._stop_server(name, server)
