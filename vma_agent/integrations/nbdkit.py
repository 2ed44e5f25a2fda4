"""Start and stop ``nbdkit`` processes (file plugin for tests and the OMA, vddk on the VMA).

``NbdkitServer`` is a context manager::

    with NbdkitServer(file_plugin_args("/dev/vdb"), socket_path="/run/x.sock") as srv:
        copy(srv.uri, ...)

The process runs in the foreground (``-f``) with ``--exit-with-parent`` so it never
outlives us. On Linux that is ``PR_SET_PDEATHSIG``, which fires when the *thread* that
forked the child exits, not the process: so every nbdkit is forked from one long-lived
spawner thread, and an nbdkit started from a short-lived worker thread survives it. And ``start()`` returns only once it accepts connections (nbdkit writes
its pid file after it has bound its listening socket). Secrets (the vCenter password)
go through a pipe on stdin (``password=-``) or a 0600 file (``password=+FILE``) —
never in argv, which is visible in ``ps``.
"""
from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self
from urllib.parse import quote

__all__ = [
    "NbdkitError",
    "NbdkitServer",
    "PluginArgs",
    "file_plugin_args",
    "free_tcp_port",
    "nbdkit_binary",
    "tcp_uri",
    "unix_uri",
    "vddk_plugin_args",
]

DEFAULT_START_TIMEOUT = 15.0
DEFAULT_STOP_TIMEOUT = 5.0


def unix_uri(socket_path: str | os.PathLike, export: str = "") -> str:
    """``nbd+unix:///<export>?socket=<path>``."""
    return f"nbd+unix:///{quote(export, safe='')}?socket={quote(os.fspath(socket_path), safe='/')}"


def tcp_uri(host: str, port: int, export: str = "") -> str:
    """``nbd://host:port/<export>`` (IPv6 literals are bracketed)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"nbd://{host}:{port}/{quote(export, safe='')}"


class NbdkitError(RuntimeError):
    """nbdkit could not be started (message includes its stderr) or misbehaved."""


@dataclass
class PluginArgs:
    """A plugin, its ``key=value`` parameters, filters, and an optional stdin secret."""

    plugin: str
    params: list[tuple[str, str]] = field(default_factory=list)
    filters: list[str] = field(default_factory=list)
    filter_params: list[tuple[str, str]] = field(default_factory=list)
    readonly: bool = False
    stdin_secret: str | None = None  # written to nbdkit's stdin (``password=-``)
    env: dict[str, str] = field(default_factory=dict)

    def argv_tail(self) -> list[str]:
        out = [f"--filter={f}" for f in self.filters]
        out.append(self.plugin)
        out += [f"{k}={v}" for k, v in self.params]
        out += [f"{k}={v}" for k, v in self.filter_params]
        return out


class _Spawner:
    """Forks children from one daemon thread that lives as long as the process."""

    _lock = threading.Lock()
    _queue: queue.SimpleQueue | None = None
    _thread: threading.Thread | None = None

    @classmethod
    def popen(cls, argv: list[str], **kw) -> subprocess.Popen:
        with cls._lock:
            if cls._thread is None or not cls._thread.is_alive():
                cls._queue = queue.SimpleQueue()
                cls._thread = threading.Thread(target=cls._run, args=(cls._queue,), name="nbdkit-spawner",
                                               daemon=True)
                cls._thread.start()
            q = cls._queue
        fut: Future = Future()
        q.put((argv, kw, fut))
        return fut.result()

    @staticmethod
    def _run(q: queue.SimpleQueue) -> None:
        while True:
            argv, kw, fut = q.get()
            try:
                fut.set_result(subprocess.Popen(argv, **kw))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)


def nbdkit_binary() -> str:
    path = shutil.which("nbdkit")
    if not path:
        raise NbdkitError("nbdkit is not installed (not found on PATH)")
    return path


def file_plugin_args(path: str | os.PathLike, *, readonly: bool = False, cache: str | None = None,
                     fadvise: str | None = None, filters: Sequence[str] = (),
                     filter_params: Mapping[str, str] | None = None) -> PluginArgs:
    """``nbdkit file file=PATH`` (a raw image or a block device)."""
    params = [("file", os.fspath(path))]
    if cache:
        params.append(("cache", cache))
    if fadvise:
        params.append(("fadvise", fadvise))
    return PluginArgs("file", params, list(filters), list((filter_params or {}).items()), readonly)


def vddk_plugin_args(*, server: str, user: str, password: str | None = None,
                     password_file: str | os.PathLike | None = None, thumbprint: str,
                     vm_moref: str, disk_file: str, snapshot_moref: str | None = None,
                     libdir: str | os.PathLike | None = None, transports: Sequence[str] = (),
                     port: int | None = None, config: str | os.PathLike | None = None,
                     extra: Mapping[str, str] | None = None,
                     filters: Sequence[str] = ()) -> PluginArgs:
    """``nbdkit vddk`` reading one disk of a VM (snapshot) from vCenter/ESXi.

    Exactly one of ``password`` (sent over stdin, ``password=-``) or ``password_file``
    (``password=+FILE``; keep it mode 0600) must be given. The source is always
    served read-only.
    """
    if (password is None) == (password_file is None):
        raise ValueError("give exactly one of password or password_file")
    params: list[tuple[str, str]] = []
    if libdir:
        params.append(("libdir", os.fspath(libdir)))
    if config:
        params.append(("config", os.fspath(config)))
    params += [("server", server), ("user", user)]
    params.append(("password", "-" if password is not None else "+" + os.fspath(password_file)))
    if port:
        params.append(("port", str(port)))
    params.append(("thumbprint", thumbprint))
    params.append(("vm", f"moref={vm_moref}"))
    if snapshot_moref:
        params.append(("snapshot", snapshot_moref))
    if transports:
        params.append(("transports", ":".join(transports)))
    params += list((extra or {}).items())
    params.append(("file", disk_file))
    return PluginArgs("vddk", params, list(filters), [], readonly=True, stdin_secret=password)


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port (best effort: another process may take it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _remove_stale_socket(path: str) -> None:
    """nbdkit refuses to bind over an existing path; a socket nobody listens on (left by a
    killed server) is removed, anything else is left for nbdkit to complain about."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except OSError:
        return
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except ConnectionRefusedError:
            Path(path).unlink(missing_ok=True)
        except OSError:
            pass


class NbdkitServer:
    """One nbdkit process on a unix socket (default: in a private temp dir) or TCP port."""

    def __init__(self, plugin: PluginArgs, *, socket_path: str | os.PathLike | None = None,
                 tcp_host: str | None = None, tcp_port: int | None = None, export_name: str = "",
                 threads: int | None = None, extra_args: Sequence[str] = (),
                 start_timeout: float = DEFAULT_START_TIMEOUT, nbdkit: str | None = None,
                 log: str = "stderr", exit_with_parent: bool = True):
        if socket_path is not None and (tcp_host or tcp_port):
            raise ValueError("use either a unix socket or a TCP port")
        self.plugin = plugin
        self.export_name = export_name
        self.start_timeout = start_timeout
        self._nbdkit = nbdkit
        self._tcp = tcp_host is not None or tcp_port is not None
        self._tmpdir: str | None = None
        self.socket_path: str | None = os.fspath(socket_path) if socket_path is not None else None
        self.tcp_host = tcp_host or ("127.0.0.1" if self._tcp else None)
        self.tcp_port = tcp_port
        self._threads = threads
        self._extra = list(extra_args)
        self._log = log
        self._exit_with_parent = exit_with_parent
        self.proc: subprocess.Popen | None = None
        self._stderr_path: str | None = None
        self._pidfile: str | None = None

    # --------------------------------------------------------------- build
    def argv(self) -> list[str]:
        """The exact command line (secrets never appear in it)."""
        argv = [self._nbdkit or nbdkit_binary(), "-f"]
        if self._exit_with_parent:
            argv.append("--exit-with-parent")
        argv.append(f"--log={self._log}")
        if self.plugin.readonly:
            argv.append("-r")
        if self._pidfile:
            argv += ["-P", self._pidfile]
        if self._tcp:
            argv += ["-i", self.tcp_host, "-p", str(self.tcp_port)]
        else:
            argv += ["-U", self.socket_path]
        if self.export_name:
            argv += ["-e", self.export_name]
        if self._threads:
            argv += ["-t", str(self._threads)]
        argv += self._extra
        argv += self.plugin.argv_tail()
        return argv

    @property
    def uri(self) -> str:
        if self._tcp:
            return tcp_uri(self.tcp_host, self.tcp_port, self.export_name)
        return unix_uri(self.socket_path, self.export_name)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # ---------------------------------------------------------- lifecycle
    def start(self) -> str:
        """Start nbdkit and wait until it listens. Returns the NBD URI."""
        if self.proc is not None:
            raise NbdkitError("already started")
        self._tmpdir = tempfile.mkdtemp(prefix="nbdkit-")
        # Removed on stop(), or at the latest when this object goes away / at exit.
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
        if not self._tcp and self.socket_path is None:
            self.socket_path = os.path.join(self._tmpdir, "nbd.sock")
        elif not self._tcp:
            _remove_stale_socket(self.socket_path)
        if self._tcp and not self.tcp_port:
            self.tcp_port = free_tcp_port(self.tcp_host)
        self._pidfile = os.path.join(self._tmpdir, "nbdkit.pid")
        self._stderr_path = os.path.join(self._tmpdir, "stderr")
        env = dict(os.environ, **self.plugin.env) if self.plugin.env else None
        with open(self._stderr_path, "wb") as err:
            spawn = _Spawner.popen if self._exit_with_parent else subprocess.Popen
            self.proc = spawn(
                self.argv(), stdin=subprocess.PIPE if self.plugin.stdin_secret is not None else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, env=env, close_fds=True,
                start_new_session=True,  # our Ctrl-C does not reach it; stop() does
            )
        try:
            if self.plugin.stdin_secret is not None:
                try:
                    self.proc.stdin.write(self.plugin.stdin_secret.encode() + b"\n")
                    self.proc.stdin.close()
                except BrokenPipeError:
                    pass
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.uri

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        delay = 0.002
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise NbdkitError(f"nbdkit exited with status {rc} during start-up: {self.stderr().strip()}")
            if os.path.exists(self._pidfile) and os.path.getsize(self._pidfile) > 0:
                return  # nbdkit writes the pid file after binding its socket
            if time.monotonic() > deadline:
                raise NbdkitError(f"nbdkit did not start listening within {self.start_timeout:.0f} s: "
                                  f"{self.stderr().strip()}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def stderr(self) -> str:
        """What nbdkit wrote to stderr so far (start-up errors, plugin messages)."""
        try:
            with open(self._stderr_path, errors="replace") as f:
                return f.read()[-8000:]
        except (OSError, TypeError):
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (for tests simulating a crashed server)."""
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; removes the socket and temp files. Idempotent."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                except ProcessLookupError:
                    pass
            if proc.stdin and not proc.stdin.closed:
                proc.stdin.close()
        if self._tmpdir:
            self._finalizer()
            self._tmpdir = None
        if not self._tcp and self.socket_path:
            try:
                Path(self.socket_path).unlink(missing_ok=True)
            except OSError:
                pass

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
