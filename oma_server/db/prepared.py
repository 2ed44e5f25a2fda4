"""Fixed-shape reads compiled to SQL once per database, then run with new parameter values.

Why this is hand-written: under load, most of a read RPC's time went into Peewee turning the same query objects
into SQL again on every call (about 140 small ``__sql__`` calls per select over a 35-column table: ~70 % of
``GetVMContext``'s server time, measured with cProfile; the database itself answered in a tenth of that). Peewee
has no statement cache and the DB-API drivers have no prepared statements we could use through it, so
:class:`PreparedSelect` keeps the text Peewee produced the first time and reuses it.

How: the query is built once with *slot* values (unique sentinels of the declared Python types), compiled by the
database's own SQL context, and the positions of the sentinels in the parameter list are remembered. A call
substitutes its values at those positions, executes the stored SQL and reads the rows through the query's own
Peewee cursor wrapper, so models, joins, ``.dicts()``/``.tuples()`` and field conversions behave exactly as for an
ordinary ``list(query)``. Compiled forms are kept per database object (the test suite switches between SQLite
and MariaDB in one process, and their SQL differs in quoting and placeholders).

Only for queries whose shape does not depend on the values (no ``IN`` lists of varying length, no optional
filters): a slot that Peewee did not pass through as exactly one parameter is an error at first use.
Design note: docs/design/reads.md#statements-compiled-once.
"""
from __future__ import annotations

import secrets
import threading
import weakref
from typing import Any, Callable

from peewee import Database

from oma_server.db.database import _unwrap


def _sentinel(kind: type, index: int) -> Any:
    if kind is str:
        return f"\x00slot{index}-{secrets.token_hex(8)}"
    if kind is int:
        # Far outside any id or count the OMA stores, and distinct per slot.
        return -(1 << 61) - secrets.randbits(40) * 64 - index
    raise TypeError(f"slot type must be str or int, not {kind.__name__}")


class PreparedSelect:
    """``PreparedSelect(lambda ctx_id: Model.select().where(Model.id == ctx_id), str)`` then ``.rows("x")``."""

    def __init__(self, build: Callable[..., Any], *slot_types: type):
        self._build = build
        self._slot_types = slot_types
        self._compiled: weakref.WeakKeyDictionary[Database, tuple[Any, str, list[Any], list[int]]] = (
            weakref.WeakKeyDictionary())
        self._lock = threading.Lock()

    def _compile(self, database: Database) -> tuple[Any, str, list[Any], list[int]]:
        compiled = self._compiled.get(database)
        if compiled is not None:
            return compiled
        with self._lock:
            sentinels = [_sentinel(kind, i) for i, kind in enumerate(self._slot_types)]
            query = self._build(*sentinels)
            sql, params = database.get_sql_context().parse(query)
            positions = []
            for sentinel in sentinels:
                found = [i for i, p in enumerate(params) if type(p) is type(sentinel) and p == sentinel]
                if len(found) != 1:
                    raise ValueError(f"prepared query {sql!r}: a slot appears {len(found)} times in its parameters")
                positions.append(found[0])
            compiled = (query, sql, list(params), positions)
            self._compiled[database] = compiled
            return compiled

    def rows(self, *values: Any) -> list[Any]:
        """Run the query with ``values`` in its slots; the rows as the query would give them."""
        if len(values) != len(self._slot_types):
            raise TypeError(f"expected {len(self._slot_types)} values, got {len(values)}")
        database = _unwrap(None)
        query, sql, template, positions = self._compile(database)
        params = list(template)
        for position, kind, value in zip(positions, self._slot_types, values, strict=True):
            params[position] = kind(value)
        cursor = database.execute_sql(sql, params)
        # The query's own wrapper maps columns to fields and converts values (Peewee does the same in execute()).
        return list(query._get_cursor_wrapper(cursor))

    def first(self, *values: Any) -> Any | None:
        found = self.rows(*values)
        return found[0] if found else None
