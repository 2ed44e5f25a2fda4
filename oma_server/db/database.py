"""Database connection setup for the OMA: one ``DatabaseProxy`` the models bind to, initialised from a URL.

Two backends, chosen by URL:

* ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (one slash is the separator, as in SQLAlchemy and
  ``playhouse.db_url``) — the embedded deployment.  Pragmas: ``foreign_keys=1`` (without it cascades and SET NULL
  silently do nothing), ``journal_mode=wal`` (readers do not block the writer), ``busy_timeout``,
  ``synchronous=normal``.  The file is private: created 0600 before SQLite opens it, and an existing file and
  its ``-wal``/``-shm``/``-journal`` companions are set to 0600 (SQLite gives the companions it creates the
  database file's mode); it holds password hashes and encrypted secrets.  Transactions start with ``BEGIN IMMEDIATE`` so two writers queue on the busy timeout
  instead of failing with "database is locked" when a read transaction upgrades to a write.
  ``sqlite:///:memory:`` gives a private in-memory database shared by every connection of the returned object (so
  ``connection_context()`` per call and other threads see the same data) for quick unit use; it is not meant for
  concurrent writers (SQLite shared-cache locks are not covered by the busy timeout).
* ``mysql://user:password@host:port/dbname`` or ``mariadb://…`` — production MariaDB through pymysql with a
  connection pool (``PooledMySQLDatabase``): ``mariadb=True`` (Peewee's JSON handling differs from MySQL's),
  ``utf8mb4``, a strict ``sql_mode`` (bad values are errors, not silent truncation) and the session time zone set
  to UTC so ``NOW()``/``CURRENT_TIMESTAMP`` agree with the naive-UTC timestamps the application stores.
  ``stale_timeout`` (default 300 s) must stay below the server's ``wait_timeout`` (MariaDB default 28800 s) so the
  pool recycles connections before the server drops them.

The MariaDB pool is Peewee's with two checks made local (:class:`MariaDBPool`): Peewee pings every connection
it hands out and, because PyMySQL connections do not expose ``in_transaction``, sends a ``ROLLBACK`` for every
connection given back — two round trips per RPC, both while holding the pool's global lock, so 32 concurrent reads
queued behind each other (``GetVMContext`` at 0.03-0.06x of an echo server). Here a connection given back is rolled
back only when the server's last status flags say a transaction is open, and a connection is pinged before reuse
only after it sat idle for ``ping_after_idle_seconds`` (default 10 s): a connection used moments ago is alive, and
one the server dropped while idle (``wait_timeout``, a restart) is still caught before use
(docs/design/reads.md#connections).

Usage per RPC: ``with db.connection_context(): …`` (``db`` is ``database_proxy``) takes a connection for the
calling thread and gives it back afterwards. Both backends pool: opening and closing an SQLite file per call
cost about a third of a read RPC (the open re-runs the pragmas, the close of the last connection checkpoints the
WAL), so a file database is a ``PooledSqliteDatabase`` too — without a limit (one connection per thread that uses
the database at once; SQLite connections are cheap and the thread pools bound their number) and opened with
``check_same_thread=False`` (a pooled connection is handed to whichever thread asks next, never to two at once).
"""
from __future__ import annotations

import heapq
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

from peewee import (
    Database,
    DatabaseProxy,
    ModelSelect,
    MySQLDatabase,
    OperationalError,
    SqliteDatabase,
    __exception_wrapper__,
)
from playhouse.pool import (
    MaxConnectionsExceeded,
    PoolConnection,
    PooledDatabase,
    PooledMySQLDatabase,
    PooledSqliteDatabase,
)
from pymysql.constants import SERVER_STATUS

#: The database every model binds to; initialised by :func:`init_database` (or by tests).
database_proxy = DatabaseProxy()
#: Short name for the same proxy (``with db.connection_context(): …`` in the RPC layer).
db = database_proxy

DEFAULT_POOL_SIZE = 20
MYSQL_SQL_MODE = "STRICT_ALL_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ZERO_DATE,NO_ZERO_IN_DATE,NO_ENGINE_SUBSTITUTION"


def _sqlite_pragmas(busy_timeout_ms: int) -> dict[str, object]:
    return {"foreign_keys": 1, "journal_mode": "wal", "busy_timeout": busy_timeout_ms, "synchronous": "normal"}


class SharedMemorySqliteDatabase(SqliteDatabase):
    """An in-memory SQLite database that outlives its connections.

    A plain ``:memory:`` database exists per connection and vanishes when ``connection_context()`` closes it.
    This one uses a uniquely named shared-cache memory URI and keeps one anchor connection open for the lifetime
    of the object, so every thread and every short-lived connection sees the same schema and data.
    """

    def __init__(self, busy_timeout_ms: int):
        uri = f"file:oma-memory-{uuid.uuid4().hex}?mode=memory&cache=shared"
        super().__init__(uri, uri=True, pragmas=_sqlite_pragmas(busy_timeout_ms), timeout=busy_timeout_ms / 1000,
                         lock_type="IMMEDIATE")
        self._anchor = sqlite3.connect(uri, uri=True, check_same_thread=False)


class MariaDBPool(PooledMySQLDatabase):
    """Peewee's MariaDB pool without a round trip per check-out and check-in (see the module docstring)."""

    def __init__(self, *args, ping_after_idle_seconds: float = 10.0, **kwargs):
        self._ping_after_idle = ping_after_idle_seconds
        self._returned_at: dict[int, float] = {}  # id(connection) -> time.monotonic() of its last check-in
        self._returned_lock = threading.Lock()
        self._opening = 0  # connections being opened right now (they count against max_connections)
        super().__init__(*args, **kwargs)

    def connect(self, reuse_if_open: bool = False) -> bool:
        """Take a pooled connection for this thread, waiting up to the pool timeout for a free one.

        Peewee's version holds the database-wide lock while it checks a connection out, so opening a new
        connection (a TCP handshake, authentication, the session settings) or pinging an idle one stalled every
        other thread's check-out and check-in: with a cold pool and 32 calls in flight the first second of calls
        queued behind 32 handshakes (GetVMContext p99 1.8-3.7 s). Its wait also re-checked the pool outside the
        lock its waiters sleep on, so a connection given back in between woke nobody and the caller slept a full
        second. Here only the pool's bookkeeping is under the lock, and the check and the wait share it.
        """
        if not self._state.closed:  # thread-local state: no lock needed
            if reuse_if_open:
                return False
            raise OperationalError("Connection already opened.")
        deadline = time.monotonic() + (self._wait_timeout or 0)
        while True:
            try:
                conn = self._connect()
                break
            except MaxConnectionsExceeded:
                with self._pool_available:
                    if self._connections or len(self._in_use) + self._opening < self._max_connections:
                        continue  # one came back since: try again now
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise MaxConnectionsExceeded(
                            f"all {self._max_connections} database connections stayed busy for "
                            f"{self._wait_timeout} s") from None
                    self._pool_available.wait(timeout=remaining)
        self._state.reset()
        self._state.set_connection(conn)
        if self.server_version is None:
            self._set_server_version(conn)
        self._initialize_connection(conn)  # a no-op for MySQL in Peewee; kept so the hook works as documented
        return True

    def _connect(self):
        """An idle connection (checked outside the lock) or a new one (opened outside the lock)."""
        while True:
            with self._pool_lock:
                if self._connections:
                    created, _, conn = heapq.heappop(self._connections)
                    self._in_use[self.conn_key(conn)] = PoolConnection(created, conn, time.time())
                    reused = True
                elif self._max_connections and len(self._in_use) + self._opening >= self._max_connections:
                    raise MaxConnectionsExceeded("Exceeded maximum connections.")
                else:
                    self._opening += 1
                    reused = False
            if reused:
                if not self._is_closed(conn) and not (self._stale_timeout and self._is_stale(created)):
                    return conn
                with self._pool_lock:
                    self._in_use.pop(self.conn_key(conn), None)
                    self._pool_available.notify()
                self._close_raw(conn)
                continue
            try:
                with __exception_wrapper__:  # driver errors as Peewee's (OperationalError, ...)
                    conn = super(PooledDatabase, self)._connect()  # MySQLDatabase: a new connection
            finally:
                with self._pool_lock:
                    self._opening -= 1
                    self._pool_available.notify()
            with self._pool_lock:
                self._in_use[self.conn_key(conn)] = PoolConnection(time.time(), conn, time.time())
            return conn

    def open_idle(self, count: int) -> None:
        """Open up to ``count`` connections now and leave them idle in the pool, so the first calls after a start
        do not each wait for a handshake of their own (32 at once took seconds on a busy server)."""
        opened = []
        try:
            for _ in range(min(count, self._max_connections or count)):
                opened.append(self._connect())
        finally:
            for conn in opened:
                self._close(conn)

    def _is_closed(self, conn) -> bool:
        if not conn.open:
            return True
        with self._returned_lock:
            returned = self._returned_at.get(id(conn))
        if returned is not None and time.monotonic() - returned < self._ping_after_idle:
            return False
        return super()._is_closed(conn)  # ping without reconnecting

    def _can_reuse(self, conn) -> bool:
        try:
            if conn.server_status & SERVER_STATUS.SERVER_STATUS_IN_TRANS:
                conn.rollback()
        except Exception:  # noqa: BLE001 - a connection that cannot roll back is not reused (Peewee closes it)
            return False
        with self._returned_lock:
            self._returned_at[id(conn)] = time.monotonic()
        return True

    def _close_raw(self, conn):
        with self._returned_lock:
            self._returned_at.pop(id(conn), None)
        return super()._close_raw(conn)


SQLITE_COMPANION_SUFFIXES = ("-wal", "-shm", "-journal")
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def secure_data_dir(path: Path) -> Path:
    """Create the OMA's data dir (the SQLite file, key files, generated certificates) as 0700, or
    restrict an existing one to 0700."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != PRIVATE_DIR_MODE:
        path.chmod(PRIVATE_DIR_MODE)
    return path


def secure_sqlite_files(path: str | os.PathLike) -> None:
    """Create the database file 0600 when it does not exist yet, and set it and its companions to 0600."""
    database = Path(path)
    if database.parent.is_dir():
        os.close(os.open(database, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE))
    for candidate in (database, *(Path(f"{database}{suffix}") for suffix in SQLITE_COMPANION_SUFFIXES)):
        try:
            if candidate.stat().st_mode & 0o777 != PRIVATE_FILE_MODE:
                candidate.chmod(PRIVATE_FILE_MODE)
        except FileNotFoundError:
            continue


def connect(url: str, *, pool_size: int = DEFAULT_POOL_SIZE, stale_timeout: int = 300, pool_timeout: int = 10,
            connect_timeout: int = 10, busy_timeout_ms: int = 5000) -> Database:
    """Build (but do not bind) the database described by ``url``.

    MariaDB: ``pool_size`` = maximum pooled connections (size it to the RPC worker threads), ``stale_timeout`` =
    seconds after which an idle connection is recycled, ``pool_timeout`` = seconds to wait for a free connection
    before raising, ``connect_timeout``.  SQLite: ``busy_timeout_ms``.
    """
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(f"database URL must not carry query parameters or a fragment: {url!r}")
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        if parts.netloc:
            raise ValueError(f"sqlite URL must look like sqlite:///path (got {url!r})")
        path = parts.path[1:]
        if not path:
            raise ValueError(f"sqlite URL has no path: {url!r}")
        if path == ":memory:":
            return SharedMemorySqliteDatabase(busy_timeout_ms)
        secure_sqlite_files(path)
        # No pool ``timeout``/``max_connections``: the pool never makes a thread wait (``busy_timeout`` is the
        # pragma that makes writers queue).
        return PooledSqliteDatabase(path, pragmas=_sqlite_pragmas(busy_timeout_ms), lock_type="IMMEDIATE",
                                    max_connections=0, check_same_thread=False)
    if scheme in ("mysql", "mariadb"):
        name = parts.path.lstrip("/")
        if not name or not parts.hostname:
            raise ValueError(f"MariaDB URL must look like mysql://user:password@host:port/dbname (got {url!r})")
        if stale_timeout <= 0 or pool_size <= 0:
            raise ValueError("stale_timeout and pool_size must be positive")
        return MariaDBPool(
            name,
            host=parts.hostname,
            port=parts.port or 3306,
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            mariadb=True,
            charset="utf8mb4",
            sql_mode=MYSQL_SQL_MODE,
            init_command="SET time_zone = '+00:00'",
            connect_timeout=connect_timeout,
            max_connections=pool_size,
            stale_timeout=stale_timeout,
            timeout=pool_timeout,
        )
    raise ValueError(f"unsupported database URL scheme {parts.scheme!r} (use sqlite, mysql or mariadb)")


def init_database(url: str, **options) -> Database:
    """Build the database for ``url`` (options as :func:`connect`) and bind the models to it. A MariaDB pool
    is filled before the server takes calls (:meth:`MariaDBPool.open_idle`)."""
    database = connect(url, **options)
    database_proxy.initialize(database)
    if isinstance(database, MariaDBPool):
        database.open_idle(options.get("pool_size", DEFAULT_POOL_SIZE))
    return database


def _unwrap(database: Database | DatabaseProxy | None) -> Database:
    database = database_proxy if database is None else database
    if isinstance(database, DatabaseProxy):
        if database.obj is None:
            raise RuntimeError("the OMA database is not initialised (call init_database first)")
        return database.obj
    return database


def is_mysql(database: Database | DatabaseProxy | None = None) -> bool:
    """True when ``database`` (default: the bound one) is MariaDB/MySQL."""
    return isinstance(_unwrap(database), MySQLDatabase)


def db_for_update(query: ModelSelect) -> ModelSelect:
    """``query`` with ``FOR UPDATE`` where the backend supports row locks (MariaDB).

    SQLite has no row locks and Peewee raises on ``for_update()`` there; its writers are serialised by
    ``BEGIN IMMEDIATE`` instead, so inside ``atomic()`` the select is already protected.
    """
    return query.for_update() if _unwrap(query.model._meta.database).for_update else query
