"""A three-node MariaDB Galera cluster on loopback ports in a temporary folder, for the tests and the lab.

Production HA runs the OMAs on Galera; this harness gives the tests the real thing: three ``mariadbd`` processes
with the ``wsrep`` provider from Debian's ``galera-4`` package, each with its own datadir, socket, client port,
group-communication (gcomm) port, IST port and SST port, all on 127.0.0.1.

How it starts (20-30 s on a busy 2-core machine, most of it the two rsync state transfers):

1. ``mariadb-install-db`` once, into node 1's datadir; nodes 2 and 3 get a copy of it (cheaper than running the
   installer three times; the copy is overwritten by the state transfer anyway).
2. Node 1 bootstraps a new cluster (``--wsrep-new-cluster``); nodes 2 and 3 join it one after the other (a donor
   serves one state snapshot transfer at a time) with ``wsrep_sst_method=rsync``, which works offline and as
   root with nothing but ``rsync`` (``mariabackup`` would need the ``mariadb-backup`` package and a user).
3. It waits until every node reports ``wsrep_cluster_size=3`` and ``wsrep_local_state_comment=Synced``.

Failure detection is shortened (``evs.suspect_timeout`` 2 s, ``evs.inactive_timeout`` 4 s) so a test that kills a
node sees the remaining two form a primary component again within seconds instead of the default 15 s.

``python -m omalab.galera`` starts a cluster, prints each node's SQL port and waits for Ctrl-C (then stops it);
``OMA_GALERA_KEEP=1`` keeps the temporary folder (datadirs and each node's ``mysqld.err``) for a post-mortem.

Hand-written on the standard library: there is no maintained Python package that runs a local Galera cluster
(the MariaDB test framework ``mtr`` is Perl and tied to the server's source tree).
"""
from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pymysql

GALERA_PROVIDER_PATHS = ("/usr/lib/galera/libgalera_smm.so", "/usr/lib/libgalera_smm.so")
CLUSTER_NAME = "oma_test_cluster"
_START_TIMEOUT_S = 120


class GaleraError(RuntimeError):
    """The cluster could not be started or did not reach the expected state; the message says why."""


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1, below the kernel's ephemeral range.

    A node binds its SQL port only after its state transfer, seconds after the port was chosen; a port from the
    ephemeral range (what ``bind(("", 0))`` hands out) may be taken by any other process's socket in between, so
    the ports come from the range the kernel never hands out on its own.
    """
    low, _ = (int(value) for value in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    candidates = list(range(max(1024, low - 12000), low))
    random.shuffle(candidates)
    ports: list[int] = []
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise GaleraError(f"no {count} free ports below {low}")


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin")))
    if path is None:
        raise GaleraError(f"{name} is missing: install the Debian packages mariadb-server, galera-4 and rsync")
    return path


def _server_user() -> str:
    """The account ``mariadbd`` runs as: ``mysql`` when started as root, else the calling user.

    Not root, because the rsync state transfer runs an rsync daemon as the server's user, and an rsync daemon
    started by root switches to ``nobody``, which cannot write the joiner's datadir.
    """
    if os.getuid() == 0:
        try:
            return pwd.getpwnam("mysql").pw_name
        except KeyError:
            raise GaleraError("running as root needs the mysql account (Debian package mariadb-server)") from None
    return pwd.getpwuid(os.getuid()).pw_name


def galera_provider() -> str:
    for path in GALERA_PROVIDER_PATHS:
        if os.path.exists(path):
            return path
    raise GaleraError("the Galera provider libgalera_smm.so is missing: install the Debian package galera-4")


@dataclass
class GaleraNode:
    """One ``mariadbd`` of the cluster; ``port`` is its SQL port (root without password)."""
    index: int
    workdir: Path
    port: int
    gcomm_port: int
    ist_port: int
    sst_port: int
    process: subprocess.Popen | None = None

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    @property
    def error_log(self) -> Path:
        return self.workdir / "mysqld.err"

    def url(self, database: str, user: str = "root", password: str = "") -> str:
        """The ``mysql://`` URL of ``database`` through this node (the form ``oma_server.db.connect`` takes)."""
        credentials = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
        return f"mysql://{credentials}@127.0.0.1:{self.port}/{database}"

    def connect(self, **options) -> pymysql.Connection:
        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="", autocommit=True,
                               connect_timeout=5, **options)

    def status(self, name: str) -> str | None:
        """A ``SHOW STATUS`` value of this node, or None when it does not answer."""
        try:
            with contextlib.closing(self.connect()) as connection, connection.cursor() as cursor:
                cursor.execute("SHOW STATUS LIKE %s", (name,))
                row = cursor.fetchone()
        except pymysql.MySQLError:
            return None
        return None if row is None else str(row[1])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return self.error_log.read_text(errors="replace")[-characters:]
        except OSError:
            return ""


@dataclass
class GaleraCluster:
    """The nodes of a running cluster; :func:`galera_cluster` starts and stops it."""
    workdir: Path
    nodes: list[GaleraNode] = field(default_factory=list)

    @property
    def gcomm_address(self) -> str:
        return "gcomm://" + ",".join(f"127.0.0.1:{node.gcomm_port}" for node in self.nodes)

    def _argv(self, node: GaleraNode, *, bootstrap: bool) -> list[str]:
        user = _server_user()
        provider_options = ";".join((
            f"base_port={node.gcomm_port}", f"gmcast.listen_addr=tcp://127.0.0.1:{node.gcomm_port}",
            f"ist.recv_addr=127.0.0.1:{node.ist_port}",
            "evs.keepalive_period=PT0.5S", "evs.suspect_timeout=PT2S", "evs.inactive_timeout=PT4S", "evs.install_timeout=PT4S",
            "gcache.size=32M",
        ))
        argv = [
            _tool("mariadbd"), "--no-defaults", f"--datadir={node.datadir}", f"--socket={node.workdir / 'mysqld.sock'}",
            f"--port={node.port}", "--bind-address=127.0.0.1", f"--user={user}",
            f"--pid-file={node.workdir / 'mysqld.pid'}", f"--log-error={node.error_log}",
            "--skip-name-resolve", "--skip-log-bin",
            # Galera's requirements: row-based replication events, InnoDB, interleaved auto-increment locks.
            "--binlog-format=ROW", "--default-storage-engine=InnoDB", "--innodb-autoinc-lock-mode=2",
            # The datadirs are thrown away: no durability, small buffers.
            "--innodb-buffer-pool-size=64M", "--innodb-flush-log-at-trx-commit=0", "--innodb-doublewrite=0",
            "--innodb-flush-method=nosync", "--innodb-fast-shutdown=2", "--skip-innodb-buffer-pool-dump-at-shutdown",
            "--innodb-log-file-size=16M",
            "--wsrep-on=ON", f"--wsrep-provider={galera_provider()}", f"--wsrep-cluster-name={CLUSTER_NAME}",
            f"--wsrep-cluster-address={self.gcomm_address}", f"--wsrep-node-name=node{node.index}",
            "--wsrep-node-address=127.0.0.1", f"--wsrep-node-incoming-address=127.0.0.1:{node.port}",
            f"--wsrep-sst-receive-address=127.0.0.1:{node.sst_port}", "--wsrep-sst-method=rsync",
            f"--wsrep-provider-options={provider_options}", "--wsrep-slave-threads=2",
        ]
        if bootstrap:
            argv.append("--wsrep-new-cluster")
        return argv

    def start_node(self, node: GaleraNode, *, bootstrap: bool = False) -> None:
        """Start ``node`` (bootstrapping a new cluster or joining the others) and wait until it is Synced."""
        node.process = subprocess.Popen(self._argv(node, bootstrap=bootstrap), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while node.status("wsrep_local_state_comment") != "Synced":
            if not node.running or time.monotonic() > deadline:
                raise GaleraError(f"Galera node {node.index} did not reach Synced:\n{node.log_tail()}")
            time.sleep(0.2)

    def kill_node(self, node: GaleraNode) -> None:
        """End ``node`` at once (SIGKILL), as a crash or a pulled cable would."""
        if node.process is not None and node.process.poll() is None:
            os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait()

    def stop_node(self, node: GaleraNode, timeout: float = 30.0) -> None:
        if node.process is None or node.process.poll() is not None:
            return
        node.process.terminate()
        try:
            node.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_node(node)

    def wait_for_size(self, size: int, timeout: float = 60.0) -> None:
        """Wait until every running node is Synced in a primary component of ``size`` nodes."""
        deadline = time.monotonic() + timeout
        while True:
            running = [node for node in self.nodes if node.running]
            states = [(node.status("wsrep_cluster_size"), node.status("wsrep_local_state_comment"),
                       node.status("wsrep_cluster_status")) for node in running]
            if len(running) == size and all(state == (str(size), "Synced", "Primary") for state in states):
                return
            if time.monotonic() > deadline:
                raise GaleraError(f"the cluster did not reach {size} synced nodes: {states}")
            time.sleep(0.2)

    def create_database(self, name: str) -> None:
        with contextlib.closing(self.nodes[0].connect()) as connection, connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")

    def drop_database(self, name: str) -> None:
        for node in self.nodes:
            if node.running:
                with contextlib.closing(node.connect()) as connection, connection.cursor() as cursor:
                    cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
                return


def _give_to(user: str, folder: Path) -> None:
    """Make ``folder`` and everything in it owned by ``user`` (the servers write there as that account)."""
    account = pwd.getpwnam(user)
    if account.pw_uid == os.getuid():
        return
    for path in (folder, *folder.rglob("*")):
        os.chown(path, account.pw_uid, account.pw_gid)


@contextlib.contextmanager
def galera_cluster(size: int = 3) -> Iterator[GaleraCluster]:
    """Start a ``size``-node Galera cluster in a temporary folder; stop it and remove the folder on exit."""
    install_db = _tool("mariadb-install-db")
    _tool("mariadbd")
    _tool("rsync")
    galera_provider()
    user = _server_user()
    cluster = GaleraCluster(Path(tempfile.mkdtemp(prefix="oma-galera-")))
    ports = _free_ports(4 * size)
    for index in range(size):
        workdir = cluster.workdir / f"node{index + 1}"
        workdir.mkdir()
        cluster.nodes.append(GaleraNode(index + 1, workdir, *ports[4 * index:4 * index + 4]))
    try:
        _give_to(user, cluster.workdir)
        first = cluster.nodes[0]
        subprocess.run([install_db, "--no-defaults", f"--datadir={first.datadir}", f"--user={user}",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True, timeout=_START_TIMEOUT_S)
        for node in cluster.nodes[1:]:
            shutil.copytree(first.datadir, node.datadir, symlinks=True)
        _give_to(user, cluster.workdir)
        cluster.start_node(first, bootstrap=True)
        for node in cluster.nodes[1:]:
            cluster.start_node(node)
        cluster.wait_for_size(size)
        yield cluster
    finally:
        for node in reversed(cluster.nodes):
            cluster.stop_node(node)
        if not os.environ.get("OMA_GALERA_KEEP"):
            shutil.rmtree(cluster.workdir, ignore_errors=True)


def main() -> int:
    with galera_cluster() as cluster:
        for node in cluster.nodes:
            print(f"node {node.index}: {node.url('<database>')}  (log {node.error_log})", flush=True)
        print("the cluster is up (3 nodes synced); Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
