"""The simulated vCenter: govmomi's vcsim, extended by the Go program in this folder, and its Python harness.

The simulator is govmomi's vcsim (Debian ``golang-github-vmware-govmomi-dev`` 0.24.2) with a
sized inventory, VM disks that are real sparse raw files in real datastore folders, and exact
Changed Block Tracking (``QueryChangedDiskAreas``).  See ``omalab/vcsim/main.go`` for the flags.

Use from anywhere (tests, the lab demo, ``bench/``)::

    from omalab.vcsim import VCSim
    with VCSim(vms=100, data_vms=2) as sim:
        si = sim.connect()                      # pyVmomi ServiceInstance
        path = sim.disk_file("vm-0000", 0)      # live raw image of the first disk (key 2000)

or ``python -m omalab.vcsim -vms 10`` (builds, runs, prints the JSON line).  The pytest fixtures
(``vcsim``, ``vcsim_factory``) are in ``tests/fixtures/vcsim.py``.

The binary is built once per state of the Go sources (cache key = hash of ``omalab/vcsim/*.go``,
the Go version and the govmomi package) into ``.gocache/vcsim-bin/<key>/vcsim``.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import selectors
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[2]
GO_SOURCES = Path(__file__).resolve().parent
GOPATH_DIR = REPO / ".gopath" / "vcsim"
GOCACHE_DIR = REPO / ".gocache"
BIN_CACHE = GOCACHE_DIR / "vcsim-bin"
SYSTEM_GOPATH = Path("/usr/share/gocode")
GOVMOMI = SYSTEM_GOPATH / "src" / "github.com" / "vmware" / "govmomi"

SETUP_HINT = "run scripts/setup (installs golang-go and golang-github-vmware-govmomi-dev)"

DEFAULT_USERNAME = "administrator@vsphere.local"
DEFAULT_PASSWORD = "VMware1!"


class VCSimError(RuntimeError):
    """The simulator could not be built or started."""


# --------------------------------------------------------------------------- build


def _go() -> str:
    go = shutil.which("go") or ("/usr/lib/go/bin/go" if Path("/usr/lib/go/bin/go").exists() else None)
    if not go:
        raise VCSimError(f"Go is not installed (no 'go' on PATH): {SETUP_HINT}")
    if not (GOVMOMI / "simulator").is_dir():
        raise VCSimError(f"govmomi simulator sources missing at {GOVMOMI}: {SETUP_HINT}")
    return go


def _build_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GO111MODULE="off",
        GOPATH=f"{GOPATH_DIR}:{SYSTEM_GOPATH}",
        GOFLAGS="",
        GOCACHE=str(GOCACHE_DIR),
    )
    return env


def _source_key(go: str) -> str:
    h = hashlib.sha256()
    for f in sorted(GO_SOURCES.glob("*.go")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    try:
        h.update(subprocess.run([go, "version"], capture_output=True, text=True, timeout=30, check=False).stdout.encode())
    except (OSError, subprocess.SubprocessError) as exc:
        raise VCSimError(f"cannot run {go}: {exc}; {SETUP_HINT}") from exc
    # the govmomi package version: the simulator directory listing (names, sizes, mtimes)
    for f in sorted((GOVMOMI / "simulator").glob("*.go")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def build_vcsim() -> Path:
    """Build the simulator binary unless a binary for the current sources exists; return it.

    Safe to call concurrently (pytest-xdist workers): a file lock serialises builds.
    Raises :class:`VCSimError` with a hint to run ``scripts/setup`` when Go or govmomi is missing.
    """
    go = _go()
    key = _source_key(go)
    out_dir = BIN_CACHE / key
    binary = out_dir / "vcsim"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    BIN_CACHE.mkdir(parents=True, exist_ok=True)
    GOPATH_DIR.mkdir(parents=True, exist_ok=True)
    with open(BIN_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file():
            return binary
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".vcsim.{os.getpid()}"
        t0 = time.monotonic()
        proc = subprocess.run(
            [go, "build", "-o", str(tmp), "./omalab/vcsim"],
            cwd=REPO, env=_build_env(), capture_output=True, text=True, timeout=900, check=False,
        )
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise VCSimError(
                f"building omalab/vcsim failed (exit {proc.returncode}) - if packages are missing, "
                f"{SETUP_HINT}:\n{proc.stdout}{proc.stderr}"
            )
        os.replace(tmp, binary)
        # drop binaries of older source states
        for old in BIN_CACHE.iterdir():
            if old.is_dir() and old.name != key:
                shutil.rmtree(old, ignore_errors=True)
        print(f"vcsim: built {binary} in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return binary


# --------------------------------------------------------------------------- process


def _default_root_parent() -> str | None:
    """tmpfs (/dev/shm) when usable: creating thousands of small files is much faster there."""
    env = os.environ.get("VCSIM_TMPDIR")
    if env:
        return env
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return str(shm)
    return None


def _duration(value: float | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return f"{float(value) * 1000:.3f}ms"
    return str(value)


class VCSim:
    """A running simulated vCenter (a child process).

    Keyword arguments map to the binary's flags (sizes: ``datacenters``, ``clusters``
    (per DC), ``hosts`` (per cluster), ``standalone_hosts``, ``datastores`` (per DC),
    ``networks`` (extra standard port groups per DC), ``dvpg`` (distributed port groups per
    DC), ``vms`` (total), ``disks`` (per VM), ``disk_size`` ("64MiB" or "64MiB,32MiB"),
    ``data_vms``; ``latency`` (seconds or a Go duration string), ``cbt_block``,
    ``cbt_max_areas``, ``cbt_max_length``, ``changeid_format`` ("vsphere"/"uuid"),
    ``shutdown_delay``, ``session_idle_timeout``: sessions idle that long are logged out);
    ``extra_args`` are passed verbatim.

    ``root``: folder for datastores and the CBT store (default: a new temp dir under
    $VCSIM_TMPDIR, else /dev/shm, else the system temp dir; removed by :meth:`stop`).
    """

    def __init__(
        self,
        *,
        datacenters: int = 1,
        clusters: int = 1,
        hosts: int = 2,
        standalone_hosts: int = 0,
        datastores: int = 1,
        networks: int = 1,
        dvpg: int = 1,
        vms: int = 10,
        disks: int = 2,
        disk_size: str | int = "64MiB",
        data_vms: int = 0,
        username: str = DEFAULT_USERNAME,
        password: str = DEFAULT_PASSWORD,
        latency: float | str | None = None,
        cbt_block: str | int | None = None,
        cbt_max_areas: int | None = None,
        cbt_max_length: str | int | None = None,
        changeid_format: str | None = None,
        shutdown_delay: float | str | None = None,
        session_idle_timeout: float | str | None = None,
        seed: int | None = None,
        root: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float = 180.0,
        stderr_to: str | os.PathLike[str] | None = None,
    ) -> None:
        self.username = username
        self.password = password
        self._args: list[str] = [
            f"-dc={datacenters}", f"-clusters={clusters}", f"-hosts={hosts}",
            f"-standalone-hosts={standalone_hosts}", f"-datastores={datastores}",
            f"-networks={networks}", f"-dvpg={dvpg}", f"-vms={vms}", f"-disks={disks}",
            f"-disk-size={disk_size}", f"-data-vms={data_vms}",
            f"-username={username}", f"-password={password}",
        ]
        opt = {
            "-latency": _duration(latency),
            "-cbt-block": cbt_block,
            "-cbt-max-areas": cbt_max_areas,
            "-cbt-max-length": cbt_max_length,
            "-changeid-format": changeid_format,
            "-shutdown-delay": _duration(shutdown_delay),
            "-session-idle-timeout": _duration(session_idle_timeout),
            "-seed": seed,
        }
        self._args += [f"{k}={v}" for k, v in opt.items() if v is not None]
        self._args += list(extra_args)
        self._root_arg = Path(root) if root is not None else None
        self._binary = Path(binary) if binary else None
        self._startup_timeout = startup_timeout
        self._stderr_to = Path(stderr_to) if stderr_to else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._own_root = False
        self.root: Path | None = None
        self.info: dict[str, Any] = {}
        self._manifest: dict[str, Any] | None = None
        self._vms: dict[str, dict[str, Any]] | None = None
        self.stderr_path: Path | None = None

    # -- lifecycle

    def start(self) -> VCSim:
        if self._proc is not None:
            return self
        binary = self._binary or build_vcsim()
        if self._root_arg is not None:
            self.root = self._root_arg
            self.root.mkdir(parents=True, exist_ok=True)
        else:
            self.root = Path(tempfile.mkdtemp(prefix="vcsim-", dir=_default_root_parent()))
            self._own_root = True
        self.stderr_path = self._stderr_to or (self.root / "vcsim.log")
        args = [str(binary), f"-dir={self.root}", "-exit-on-stdin-eof", *self._args]
        if self._own_root:
            args.append("-cleanup")
        with open(self.stderr_path, "ab") as stderr:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, close_fds=True,
            )
        try:
            line = self._read_start_line()
            self.info = json.loads(line)
        except BaseException:
            self.stop()
            raise
        return self

    def _read_start_line(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self._proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self._startup_timeout
        buf = b""
        fd = self._proc.stdout.fileno()
        try:
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VCSimError(f"vcsim did not start within {self._startup_timeout:.0f}s{self._log_tail()}")
                if not sel.select(timeout=min(left, 0.5)):
                    if self._proc.poll() is not None:
                        raise VCSimError(f"vcsim exited with {self._proc.returncode}{self._log_tail()}")
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    self._proc.wait(timeout=10)
                    raise VCSimError(f"vcsim exited with {self._proc.returncode}{self._log_tail()}")
                buf += chunk
        finally:
            sel.close()
        return buf.split(b"\n", 1)[0].decode()

    def _log_tail(self) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace") if self.stderr_path else ""
        except OSError:
            text = ""
        tail = "\n".join(text.splitlines()[-30:])
        return f":\n{tail}" if tail else ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                if proc.stdin:
                    proc.stdin.close()
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
            if proc.stdout:
                proc.stdout.close()
        if self._own_root and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- connection data

    @property
    def host(self) -> str:
        return self.info["host"]

    @property
    def port(self) -> int:
        return int(self.info["port"])

    @property
    def address(self) -> str:
        return self.info["address"]

    @property
    def url(self) -> str:
        return self.info["url"]

    @property
    def thumbprint_sha1(self) -> str:
        return self.info["thumbprint_sha1"]

    @property
    def thumbprint_sha256(self) -> str:
        return self.info["thumbprint_sha256"]

    @property
    def cert_file(self) -> Path:
        return Path(self.info["cert_file"])

    @property
    def datastores(self) -> dict[str, Path]:
        """Datastore name -> local folder."""
        return {k: Path(v) for k, v in self.info["datastores"].items()}

    @property
    def datacenters(self) -> list[str]:
        return list(self.info["datacenters"])

    @property
    def data_vms(self) -> list[str]:
        return list(self.info.get("data_vms") or [])

    @property
    def change_id_format(self) -> str:
        return self.info["change_id_format"]

    @property
    def cbt_block_size(self) -> int:
        return int(self.info["cbt_block_size"])

    # -- inventory manifest

    @property
    def manifest(self) -> dict[str, Any]:
        """The inventory as created at start (``<root>/inventory.json``)."""
        if self._manifest is None:
            self._manifest = json.loads(Path(self.info["manifest"]).read_text())
        return self._manifest

    def vm(self, name: str) -> dict[str, Any]:
        """Manifest entry of a VM: name, moref, datacenter, path, host, cluster, datastore,
        guest_id, guest_full_name, windows, tools, power_state (at start), ip, data,
        disks [{key, index, controller_key, unit_number, file_name, path, capacity, thin}], nics."""
        if self._vms is None:
            self._vms = {v["name"]: v for v in self.manifest["vms"]}
        try:
            return self._vms[name]
        except KeyError:
            raise KeyError(f"no VM named {name!r} in the simulator inventory") from None

    def vm_names(self) -> list[str]:
        return [v["name"] for v in self.manifest["vms"]]

    def _disk(self, vm_name: str, disk: int | str) -> dict[str, Any]:
        disks = self.vm(vm_name)["disks"]
        if isinstance(disk, str):
            disk = int(disk.removeprefix("disk-"))
        for d in disks:
            if (disk < 1000 and d["index"] == disk) or d["key"] == disk:
                return d
        raise KeyError(f"{vm_name} has no disk {disk!r} (disks: {[d['key'] for d in disks]})")

    def disk_file(self, vm_name: str, disk: int | str = 0) -> Path:
        """Live raw image of a VM disk; ``disk`` is an index (0, 1, ...), a device key
        (2000, 2001, ...) or a disk id ("disk-2000")."""
        return Path(self._disk(vm_name, disk)["path"])

    def disk_capacity(self, vm_name: str, disk: int | str = 0) -> int:
        return int(self._disk(vm_name, disk)["capacity"])

    def datastore_path(self, ds_path: str) -> Path:
        """Local file for a datastore path like ``[LocalDS_0] vm-0000/vm-0000-snap-1.vmdk``."""
        if not ds_path.startswith("["):
            raise ValueError(f"not a datastore path: {ds_path!r}")
        ds, _, rel = ds_path[1:].partition("]")
        return self.datastores[ds] / rel.strip()

    def guest_write(self, vm_name: str, disk: int | str, offset: int, data: bytes) -> None:
        """Simulate a guest write into the live disk (between snapshots)."""
        path = self.disk_file(vm_name, disk)
        if offset < 0 or offset + len(data) > self.disk_capacity(vm_name, disk):
            raise ValueError("write outside the disk")
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    # -- pyVmomi

    def connect(self, *, verify: bool = False, **kwargs: Any) -> Any:
        """``pyVim.connect.SmartConnect`` to the simulator (``verify=True`` checks the TLS
        certificate against :attr:`cert_file`)."""
        # local import: plain users (no pyVmomi) can still start the simulator
        from pyVim.connect import SmartConnect

        if verify:
            ctx = ssl.create_default_context(cafile=str(self.cert_file))
            ctx.check_hostname = False
            kwargs.setdefault("sslContext", ctx)
        else:
            kwargs.setdefault("disableSslCertValidation", True)
        return SmartConnect(host=self.host, port=self.port, user=self.username, pwd=self.password, **kwargs)

    def __repr__(self) -> str:
        return f"VCSim(url={self.info.get('url')!r}, vms={self.info.get('vm_count')})"
