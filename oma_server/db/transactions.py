"""Transactions that claim something, retried when the database reports a write conflict.

Why (docs/design/galera.md): on a MariaDB Galera cluster ``SELECT … FOR UPDATE`` locks rows on the node that runs
it only.  Two OMA processes writing through different nodes do not wait for each other; both transactions run,
and at commit Galera's certification lets the first one through and aborts the other with MariaDB error 1213
("Deadlock found when trying to get lock; try restarting transaction").  A local transaction can also be aborted
mid-way by a replicated one that touches the same rows (a "brute force abort"), with the same error on its next
statement.  On a single MariaDB server 1213 is an ordinary InnoDB deadlock.  In every case the whole transaction
was rolled back and the right answer is to run it again from the start — its reads included, because the
retried attempt must see what the winner committed.

So a claim is made in two parts:

* the claim is a *write* to the row (or unique key) that every competitor must also write — a conditional
  ``UPDATE … WHERE`` (compare-and-set), an insert into a unique index, or :func:`claim_row` — because Galera
  certifies writes, not locks; two transactions that only read-lock the same row both commit;
* the transaction runs in :func:`run_transaction` (or :func:`retry_on_write_conflict` when it has its own
  set-up around the transaction), which retries it on 1213 with jittered exponential backoff and a bound.  The
  retried attempt re-reads, sees the winner's write and answers as it would have had it come second on one server
  (typically FAILED_PRECONDITION "already …").

SQLite needs none of this (``BEGIN IMMEDIATE`` serialises writers and never reports 1213), and the helpers are
no-ops in effect there: they run the work once.

Hand-written: Peewee has no retry helper, and general retry libraries (tenacity) would still need the error
classification below, which is the whole point.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from peewee import Database, DatabaseError, DatabaseProxy, InterfaceError, Model

from oma_server.db.database import database_proxy
from oma_server.db.fields import utcnow
from oma_server.errors import Unavailable

log = logging.getLogger("oma_server.db.transactions")

T = TypeVar("T")

#: MariaDB error numbers meaning "this transaction was rolled back because of a conflicting writer; run it again".
#: 1213 ER_LOCK_DEADLOCK: InnoDB deadlock, Galera certification failure and Galera brute-force abort alike.
WRITE_CONFLICT_ERRORS = frozenset({1213})

#: Attempts before giving up (the first one included).  Conflicts are between a handful of OMA processes, so a
#: transaction that lost eight times in a row is under a storm that the caller should see rather than wait out.
DEFAULT_ATTEMPTS = 8
_BASE_DELAY_S = 0.01
_MAX_DELAY_S = 0.5


def mysql_error_numbers(exc: BaseException) -> set[int]:
    """Every MariaDB error number behind ``exc``: Peewee wraps the driver's exception, and the error that reaches
    the caller may be a consequence of the one that matters — after a deadlock inside a nested ``atomic()``
    (a savepoint) the rollback to the savepoint fails with 1305 "SAVEPOINT … does not exist", because the
    deadlock already rolled the whole transaction back; the 1213 is in that error's context."""
    numbers: set[int] = set()
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for arg in current.args[:2]:
            if isinstance(arg, int):
                numbers.add(arg)
                break
            if isinstance(arg, BaseException):  # Peewee: DatabaseError(original, *original.args)
                pending.append(arg)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return numbers


def is_write_conflict(exc: BaseException) -> bool:
    """True when ``exc`` means the whole transaction was rolled back by a conflicting writer (retry it)."""
    return isinstance(exc, DatabaseError) and bool(mysql_error_numbers(exc) & WRITE_CONFLICT_ERRORS)


#: MariaDB/driver error numbers meaning "this database node cannot serve us now": the client lost or could not open
#: its connection (2002, 2003, 2006, 2013), or the node left the cluster's primary component (1047 "WSREP has not
#: yet prepared node for application use").
UNAVAILABLE_ERRORS = frozenset({1047, 2002, 2003, 2006, 2013})


def is_database_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means the database (this node of it) is unreachable or not serving, not a bug."""
    if isinstance(exc, InterfaceError):
        return True
    return isinstance(exc, DatabaseError) and bool(mysql_error_numbers(exc) & UNAVAILABLE_ERRORS)


def _database(database: Database | DatabaseProxy | None) -> Database | DatabaseProxy:
    return database_proxy if database is None else database


def retry_on_write_conflict(work: Callable[[], T], *, database: Database | DatabaseProxy | None = None,
                            attempts: int = DEFAULT_ATTEMPTS, what: str = "the change") -> T:
    """Call ``work`` and call it again (after a short random pause) while it fails with a write conflict.

    ``work`` must open and finish its own transaction, so that each call is one complete attempt.  Inside an
    already open transaction ``work`` is called once: only the owner of the outermost transaction can retry (a
    conflict aborts the whole transaction, not a savepoint).  After ``attempts`` conflicts the caller gets
    UNAVAILABLE with a message saying to try again; nothing of the attempts was committed.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    if _database(database).in_transaction():
        return work()
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except DatabaseError as exc:
            if not is_write_conflict(exc):
                raise
            if attempt == attempts:
                log.warning("%s lost %d write conflicts in a row; giving up", what, attempts)
                raise Unavailable(f"{what} kept conflicting with concurrent changes from other OMA processes "
                                  f"({attempts} attempts); nothing was changed, try again") from exc
            delay = random.uniform(0, min(_MAX_DELAY_S, _BASE_DELAY_S * 2 ** attempt))
            log.info("%s: write conflict (attempt %d of %d), retrying in %.0f ms", what, attempt, attempts,
                     delay * 1000)
            time.sleep(delay)
    raise AssertionError("unreachable")


def run_transaction(work: Callable[[], T], *, database: Database | DatabaseProxy | None = None,
                    attempts: int = DEFAULT_ATTEMPTS, what: str = "the change") -> T:
    """Run ``work`` in a transaction, retrying the whole transaction on write conflicts (see the module doc).

    ``work`` may raise a domain error to refuse (the transaction rolls back, nothing is retried); its return
    value is returned once the transaction committed.
    """
    database = _database(database)

    def attempt() -> T:
        with database.atomic():
            return work()

    return retry_on_write_conflict(attempt, database=database, attempts=attempts, what=what)


def claim_row(model: type[Model], key: object) -> int:
    """Write-lock one row in a way every node of a Galera cluster respects; returns the rows matched (0 or 1).

    ``SELECT … FOR UPDATE`` would lock the row on this node only.  Writing the row's ``updated_at`` puts the row
    into this transaction's write set, so a concurrent transaction on another node that claims the same row fails
    certification (and is retried by :func:`run_transaction`).  On one server it takes the same exclusive row lock
    as ``FOR UPDATE``.  The model must have an ``updated_at`` column (the write must change the row: a write that
    changes nothing is not replicated, so it is not certified either).
    """
    updated_at = model._meta.fields.get("updated_at")
    if updated_at is None:
        raise TypeError(f"{model.__name__} has no updated_at column to claim its rows with")
    return model.update({updated_at: utcnow()}).where(model._meta.primary_key == key).execute()
