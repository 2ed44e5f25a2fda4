"""One vCenter login: :class:`Session` and :func:`connect`.

A session logs in with the TLS mode of its :class:`~.types.VCenterParams` (:mod:`.tls`), logs in
again once when vCenter answers NotAuthenticated (session expired), and can keep itself alive
(:meth:`Session.start_keepalive`). Every call runs through :meth:`Session._run`, which turns
vCenter, network and TLS failures into :mod:`vma_agent.errors` exceptions (:func:`.faults.agent_error`)
without the password in any message. The operations themselves live with their subject -
:mod:`.inventory`, :mod:`.power`, :mod:`.snapshots` - and are mixed into :class:`Session`, so
callers hold one object.
"""
from __future__ import annotations

import contextlib
import http.client
import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pyVmomi import SoapAdapter, VmomiSupport, vim

from vma_agent import errors
from vma_agent.integrations.vsphere.faults import agent_error, scrub
from vma_agent.integrations.vsphere.inventory import MAX_PARALLEL_READS, InventoryReads
from vma_agent.integrations.vsphere.power import PowerControl
from vma_agent.integrations.vsphere.snapshots import SnapshotsAndCBT
from vma_agent.integrations.vsphere.soap import Connection
from vma_agent.integrations.vsphere.tls import PinnedTLSContext, probe_certificate, tls_context
from vma_agent.integrations.vsphere.types import DatacenterInfo, Fingerprints, ServerInfo, VCenterParams

log = logging.getLogger(__name__)

T = TypeVar("T")

_FALLBACK_VERSION = "vim.version.version9"  # vSphere 5.5: every vCenter still speaks it


class Session(InventoryReads, PowerControl, SnapshotsAndCBT):
    """One vCenter login. Thread-safe: calls may run concurrently (pyVmomi pools connections)."""

    def __init__(self, params: VCenterParams):
        self.params = params
        self.host = params.label
        self.username = params.username
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._generation = 0
        self._ctx: PinnedTLSContext | None = None
        self._about: Any = None
        self._datacenters: tuple[float, dict[str, DatacenterInfo]] | None = None
        self._keepalive_stop = threading.Event()
        self._keepalive_thread: threading.Thread | None = None
        self.closed = False
        self.fast_parse = True  # False: parse every answer with ElementTree (reference path)
        self.logins = 0
        self.last_used = time.monotonic()
        with self._translate():
            self._login()

    def __repr__(self) -> str:
        return f"Session(host={self.host!r}, user={self.username!r}, logins={self.logins})"

    # -- login

    def _negotiate_version(self, name: str, port: int) -> str:
        conn = http.client.HTTPSConnection(name, port, context=self._ctx, timeout=self.params.timeout)
        try:
            conn.request("GET", "/sdk/vimServiceVersions.xml")
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            return _FALLBACK_VERSION
        try:
            root = ET.fromstring(data)
        except ET.ParseError:
            return _FALLBACK_VERSION
        offered = set()
        for ns in root.iter("namespace"):
            if (ns.findtext("name") or "") != "urn:vim25":
                continue
            offered.update(v.text for v in ns.iter("version") if v.text)
        from pyVim.connect import GetServiceVersions

        for version in GetServiceVersions("vim25"):
            if VmomiSupport.versionIdMap.get(version) in offered:
                return version
        return _FALLBACK_VERSION

    def _login(self) -> None:
        name, port = self.params.address()
        self._ctx = tls_context(self.params)
        version = self._negotiate_version(name, port)
        stub = SoapAdapter.SoapStubAdapter(
            host=name, port=port, version=version, path="/sdk", sslContext=self._ctx,
            httpConnectionTimeout=self.params.timeout, poolSize=MAX_PARALLEL_READS + 4,
        )
        si = vim.ServiceInstance("ServiceInstance", stub)
        content = si.RetrieveContent()
        try:
            content.sessionManager.Login(self.params.username, self.params.password, None)
        except BaseException:
            stub.DropConnections()
            raise
        self._about = content.about
        self._generation += 1
        self._conn = Connection(stub, content, self._generation)
        self.logins += 1
        log.info("logged in to vCenter %s as %s (API %s)", self.host, self.username, version)

    def _relogin(self, failed_generation: int) -> None:
        with self._lock:
            if self._conn is not None and self._conn.generation != failed_generation:
                return  # another thread logged in again already
            log.info("vCenter %s session of %s expired; logging in again", self.host, self.username)
            old = self._conn
            self._login()
            if old is not None:
                old.stub.DropConnections()

    # -- plumbing

    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except errors.AgentError as exc:
            exc.message = scrub(exc.message, self.params.password)
            exc.args = (exc.message,)
            raise
        except Exception as exc:
            translated = agent_error(exc, host=self.host, user=self.username, password=self.params.password,
                                     certificate_hint=self._certificate_hint)
            if translated is None:
                raise
            raise translated from None

    def _certificate_hint(self) -> str:
        """How to trust the certificate vCenter presented (after the handshake refused it)."""
        with contextlib.suppress(errors.AgentError):
            name, port = self.params.address()
            fp = probe_certificate(name, port, min(self.params.timeout, 10.0))
            return f"; pin its thumbprint (SHA-1 {fp.sha1}) or provide its CA bundle after checking it"
        return ""

    def _run(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` with the current connection; log in again once if the session expired."""
        if self.closed:
            raise errors.FailedPrecondition(f"the session to vCenter {self.host} is closed")
        self.last_used = time.monotonic()
        with self._translate():
            conn = self._conn
            assert conn is not None
            try:
                return fn(conn)
            except vim.fault.NotAuthenticated:
                self._relogin(conn.generation)
                assert self._conn is not None
                return fn(self._conn)

    # -- keep-alive / close

    def start_keepalive(self, interval: float = 300.0) -> None:
        """Touch the session every ``interval`` seconds until :meth:`close` (long data copies)."""
        if self._keepalive_thread is not None:
            return

        def loop() -> None:
            while not self._keepalive_stop.wait(interval):
                try:
                    self._run(lambda c: c.content.sessionManager.currentSession)
                except errors.AgentError as exc:
                    log.warning("keep-alive of the vCenter %s session failed: %s", self.host, exc.message)

        self._keepalive_thread = threading.Thread(target=loop, name=f"vsphere-keepalive-{self.host}", daemon=True)
        self._keepalive_thread.start()

    def close(self, logout: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        self._keepalive_stop.set()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if logout:
            with contextlib.suppress(Exception):
                conn.content.sessionManager.Logout()
        with contextlib.suppress(Exception):
            conn.stub.DropConnections()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- server

    def server_info(self) -> ServerInfo:
        a = self._about
        der = self._ctx.peer_der if self._ctx else None
        return ServerInfo(self.host, a.fullName or "", a.version or "", a.build or "", a.apiType or "",
                          a.apiVersion or "", a.instanceUuid or "", Fingerprints.of(der) if der else None)



def connect(params: VCenterParams) -> Session:
    """A new session (log in now). Use :class:`SessionCache` to share logins between calls."""
    if not params.host.strip():
        raise errors.InvalidArgument("connection.host is required")
    if not params.username:
        raise errors.InvalidArgument("connection.username is required")
    if not params.password:
        raise errors.InvalidArgument("connection.password is required")
    params.address()
    params.tls_mode()
    return Session(params)
