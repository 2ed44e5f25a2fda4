"""oma_server.db.transactions on both backends: what counts as a write conflict, and that a refused or finished
transaction runs exactly once.  The retry under real conflicts is shown on a Galera cluster (test_galera.py)."""
from __future__ import annotations

import pymysql
import pytest
from peewee import IntegrityError, InterfaceError, OperationalError

from oma_server.db import models
from oma_server.db.transactions import (
    claim_row,
    is_database_unavailable,
    is_write_conflict,
    mysql_error_numbers,
    retry_on_write_conflict,
    run_transaction,
)
from oma_server.errors import FailedPrecondition
from tests import factories


def peewee_error(number: int, message: str) -> OperationalError:
    """What Peewee raises for a driver error: its own class wrapping the driver's exception."""
    original = pymysql.err.OperationalError(number, message)
    try:
        try:
            raise original
        except pymysql.err.OperationalError as exc:
            raise OperationalError(exc, *exc.args) from exc
    except OperationalError as wrapped:
        return wrapped


def test_a_deadlock_or_certification_failure_is_a_write_conflict():
    deadlock = peewee_error(1213, "Deadlock found when trying to get lock; try restarting transaction")
    assert mysql_error_numbers(deadlock) == {1213}
    assert is_write_conflict(deadlock)
    assert not is_database_unavailable(deadlock)


def test_a_savepoint_error_caused_by_a_deadlock_is_a_write_conflict():
    """A deadlock inside a nested atomic() surfaces as 1305 (the savepoint went with the whole transaction)."""
    deadlock = peewee_error(1213, "Deadlock found when trying to get lock; try restarting transaction")
    try:
        try:
            raise deadlock
        except OperationalError:
            raise peewee_error(1305, "SAVEPOINT s1 does not exist")  # noqa: B904 - the chain is the point
    except OperationalError as savepoint_error:
        assert mysql_error_numbers(savepoint_error) == {1213, 1305}
        assert is_write_conflict(savepoint_error)


def test_other_errors_are_not_retried():
    assert not is_write_conflict(peewee_error(1205, "Lock wait timeout exceeded"))
    assert not is_write_conflict(IntegrityError(pymysql.err.IntegrityError(1062, "Duplicate entry")))
    assert not is_write_conflict(ValueError(1213))


def test_a_lost_connection_or_a_node_outside_the_primary_component_is_unavailable():
    assert is_database_unavailable(peewee_error(2013, "Lost connection to MySQL server during query"))
    assert is_database_unavailable(peewee_error(1047, "WSREP has not yet prepared node for application use"))
    assert is_database_unavailable(InterfaceError(0, ""))
    assert not is_database_unavailable(peewee_error(1054, "Unknown column"))


def test_a_refusal_runs_once_and_writes_nothing(db):
    calls = []

    def refuse():
        calls.append(1)
        factories.context(vm_name="refused")
        raise FailedPrecondition("no")

    with pytest.raises(FailedPrecondition):
        run_transaction(refuse)
    assert calls == [1]
    assert not models.VmReplicationContext.select().exists()


def test_a_committed_transaction_returns_its_value_once(db):
    calls = []

    def work():
        calls.append(1)
        return factories.context(vm_name="kept").context_id

    context_id = run_transaction(work)
    assert calls == [1]
    assert models.VmReplicationContext.get_by_id(context_id).vm_name == "kept"


def test_claim_row_writes_the_row_so_every_node_certifies_it(db):
    ctx = factories.context()
    before = models.VmReplicationContext.get_by_id(ctx.context_id).updated_at
    assert run_transaction(lambda: claim_row(models.VmReplicationContext, ctx.context_id)) == 1
    assert models.VmReplicationContext.get_by_id(ctx.context_id).updated_at > before
    assert claim_row(models.VmReplicationContext, "no-such-context") == 0
    with pytest.raises(TypeError):
        claim_row(models.VmGroupMembership, 1)  # no updated_at column to write


def test_inside_an_open_transaction_the_work_runs_once_without_its_own_retry(db):
    with db.atomic():
        assert retry_on_write_conflict(lambda: 42, attempts=3) == 42
    with pytest.raises(ValueError):
        retry_on_write_conflict(lambda: 1, attempts=0)
