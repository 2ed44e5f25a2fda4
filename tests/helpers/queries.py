"""Count the SQL statements a running OMA sends while serving calls (both backends).

``count_statements(database)`` installs a Peewee query hook (``Database.query_hooks``, called on the thread that ran
the statement) for the duration of a ``with`` block and records, per statement, the thread's name and the database
connection it used. The OMA serves RPCs on its gRPC worker threads (``rpc_…``): ``rpc_statements`` are the ones a
call caused; everything else (the health watch, monitors, the log sink) runs on other threads and is left out.

``mariadb_questions(database)`` reads ``SHOW SESSION STATUS LIKE 'Questions'`` — MariaDB's own count of statements
received on a connection — on the connection the calling thread holds.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator

from peewee import Database

RPC_THREAD_PREFIX = "rpc"  # oma_server.server: ThreadPoolExecutor(thread_name_prefix="rpc")


@dataclass
class Statement:
    sql: str
    params: tuple
    thread: str
    connection: int  # id() of the DB-API connection that ran it


@dataclass
class StatementLog:
    statements: list[Statement] = field(default_factory=list)

    @property
    def rpc_statements(self) -> list[str]:
        return [s.sql for s in self.statements if s.thread.startswith(RPC_THREAD_PREFIX)]

    def clear(self) -> None:
        self.statements.clear()


@contextlib.contextmanager
def count_statements(database: Database) -> Iterator[StatementLog]:
    log = StatementLog()
    lock = threading.Lock()

    def hook(event) -> None:
        connection = getattr(database._state, "conn", None)  # thread-local: the connection of this thread
        with lock:
            log.statements.append(Statement(event.sql, tuple(event.params or ()), threading.current_thread().name, id(connection)))

    database.query_hooks.append(hook)
    try:
        yield log
    finally:
        database.query_hooks.remove(hook)


def mariadb_questions(database: Database) -> int:
    """MariaDB's ``Questions`` session counter of the connection this thread holds (the SHOW itself counts)."""
    (_, value), = database.execute_sql("SHOW SESSION STATUS LIKE 'Questions'").fetchall()
    return int(value)
