"""NBD exports of the attached replica volumes: one ``nbdkit file`` process per volume on a TCP port,
so the VMA's data mover can write to it. (The nbdkit process wrapper is shared with the agent:
``vma_agent.integrations.nbdkit``.)

Exports live as long as the OMA process (nbdkit runs with --exit-with-parent) and are reused by every
sync of the same volume; ``ensure`` restarts one whose process died (e.g. after an OMA restart).
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

from oma_server.errors import FailedPrecondition, Unavailable
from vma_agent.integrations.nbdkit import NbdkitError, NbdkitServer, file_plugin_args

log = logging.getLogger("oma_server.nbd")


@dataclass(frozen=True)
class Export:
    name: str
    device_path: str
    port: int
    uri: str


class ExportManager:
    def __init__(self, *, bind_host: str, public_host: str, port_min: int, port_max: int):
        self._bind, self._public = bind_host, public_host
        self._ports = range(port_min, port_max + 1)
        self._servers: dict[str, tuple[NbdkitServer, Export]] = {}
        self._lock = threading.Lock()

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

    def ensure(self, name: str, device_path: str, port: int | None = None) -> Export:
        """A running export of ``device_path`` named ``name`` (reused when already running). ``port``:
        serve on this port if it is free (an agent may still be writing to the old URI)."""
        with self._lock:
            current = self._servers.get(name)
            if current is not None:
                server, export = current
                if server.alive() and export.device_path == device_path:
                    return export
                server.stop()
                del self._servers[name]
            port = self._free_port(port)
            server = NbdkitServer(file_plugin_args(device_path), tcp_host=self._bind, tcp_port=port,
                                  export_name=name)
            try:
                server.start()
            except NbdkitError as exc:
                raise FailedPrecondition(f"cannot export {device_path} over NBD: {exc}") from None
            export = Export(name, device_path, port, f"nbd://{self._public}:{port}/{name}")
            self._servers[name] = (server, export)
            log.info("NBD export %s of %s on port %d", name, device_path, port)
            return export

    def alive(self, name: str) -> bool:
        with self._lock:
            current = self._servers.get(name)
            return bool(current and current[0].alive())

    def remove(self, name: str) -> None:
        with self._lock:
            current = self._servers.pop(name, None)
        if current:
            current[0].stop()

    def stop(self) -> None:
        with self._lock:
            servers = list(self._servers.values())
            self._servers.clear()
        for server, _ in servers:
            server.stop()
