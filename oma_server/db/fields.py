"""Column types shared by every OMA model.

Why these exist instead of plain Peewee fields:

* ``UtcDateTimeField`` — every timestamp is stored in UTC (docs/design/data-model.md#timestamps).  The convention here is **naive UTC
  datetimes** with microsecond precision: columns are ``DATETIME(6)`` on both backends (at least the precision
  of the original ``timestamp``/``datetime(3)``/``datetime(6)`` columns, and identical round-trips on SQLite and
  MariaDB); timezone-aware values are converted to UTC and stored naive, so callers may pass either.
  Use :func:`utcnow` for "now".
* ``EnumField`` — the original ENUM columns (and the closed vocabularies of some varchar columns,
  docs/design/data-model.md#tables-and-constraints) become a ``VARCHAR`` whose writes are validated in Python: any write path (``save()``, ``create()``,
  ``insert()``, bulk ``update()``) and any comparison with a literal raises ``ValueError`` naming the column and
  the allowed values.  Columns that were ENUMs in the original schema additionally get a ``CHECK (col IN …)``
  constraint so raw SQL cannot bypass the vocabulary either.  (Pattern matching, e.g. ``.contains()``, is not
  supported on enum columns: the pattern would be validated as a value.)
* ``ValidatedJSONField`` — JSON columns round-trip dicts/lists on both backends (Peewee's core ``JSONField``:
  ``JSON`` = ``LONGTEXT`` + ``json_valid`` on MariaDB, ``TEXT`` on SQLite).  Values are serialised strictly
  (no NaN/Infinity, which MariaDB's ``json_valid`` rejects) and a non-serialisable value raises ``ValueError``
  naming the column; a ``CHECK (col IS NULL OR json_valid(col))`` guards raw SQL writes on both backends
  (SQLite's ``json_valid(NULL)`` is 0, not NULL).
* ``LongTextField`` — ``LONGTEXT`` where the original schema has ``longtext`` (SQLite treats it as ``TEXT``).

``server_default_sql`` renders a literal Python default as a SQL ``DEFAULT`` clause: Peewee defaults are
Python-side only, and rows written by other tools (or columns added later) need the database to know them.
"""
from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any

from peewee import (
    SQL,
    CharField,
    DateTimeField,
    Entity,
    JSONField,
    Node,
    NodeList,
    TextField,
)

_strict_json_dumps = partial(json.dumps, allow_nan=False, separators=(",", ":"))


def utcnow() -> datetime:
    """The current time as a naive UTC datetime — the storage convention of every timestamp column."""
    return datetime.now(UTC).replace(tzinfo=None)


def new_uuid() -> str:
    """A random UUID string, the Python-side replacement for the original ``DEFAULT uuid()`` columns."""
    return str(uuid.uuid4())


def _sql_string_literal(value: str) -> str:
    escaped = value.replace("'", "''")
    return f"'{escaped}'"


def server_default_sql(default: Any) -> SQL | None:
    """``SQL('DEFAULT …')`` for a literal (str/bool/int/float/Decimal) default, else ``None`` (callables such as
    :func:`utcnow` or :func:`new_uuid` stay Python-side)."""
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(default, bool):
        return SQL(f"DEFAULT {int(default)}")
    if isinstance(default, (int, float, Decimal)):
        return SQL(f"DEFAULT {default}")
    if isinstance(default, str):
        return SQL(f"DEFAULT {_sql_string_literal(default)}")
    return None


def attach_server_defaults(models) -> None:
    """Give every field with a literal Python default the matching SQL ``DEFAULT`` (call once per model)."""
    for model in models:
        for field in model._meta.sorted_fields:
            clause = server_default_sql(field.default)
            if clause is not None:
                field.constraints = [*(field.constraints or ()), clause]


def _column_label(field) -> str:
    model = getattr(field, "model", None)
    table = model._meta.table_name if model is not None else "?"
    return f"{table}.{field.column_name}"


class LongTextField(TextField):
    field_type = "LONGTEXT"


class UtcDateTimeField(DateTimeField):
    """``DATETIME(6)`` holding naive UTC; aware datetimes are converted to UTC on write."""

    def get_modifiers(self):
        return [6]

    def db_value(self, value):
        if isinstance(value, datetime) and value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return super().db_value(value)


class EnumField(CharField):
    """A varchar restricted to ``allowed`` values (validated on write; ``check=True`` adds a SQL CHECK)."""

    def __init__(self, allowed: Iterable[str], *, check: bool, max_length: int = 32, **kwargs):
        self.allowed = tuple(str(v.value if isinstance(v, enum.Enum) else v) for v in allowed)
        self.check = check
        if max(len(v) for v in self.allowed) > max_length:
            raise ValueError(f"an allowed value is longer than max_length={max_length}")
        super().__init__(max_length=max_length, **kwargs)

    def db_value(self, value):
        if value is not None and not isinstance(value, Node) and value not in self.allowed:
            allowed = ", ".join(self.allowed)
            raise ValueError(f"{_column_label(self)}: {value!r} is not an allowed value (allowed: {allowed})")
        return super().db_value(value)

    def ddl(self, ctx):
        node = super().ddl(ctx)
        if self.check:
            values = ", ".join(_sql_string_literal(v) for v in self.allowed)
            node.nodes.append(NodeList((SQL("CHECK ("), Entity(self.column_name), SQL(f"IN ({values}))"))))
        return node


class ValidatedJSONField(JSONField):
    """JSON column: dicts/lists/scalars round-trip; invalid values raise ``ValueError`` before reaching SQL."""

    def __init__(self, **kwargs):
        super().__init__(dumps=_strict_json_dumps, **kwargs)

    def db_value(self, value):
        try:
            return super().db_value(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{_column_label(self)}: value is not valid JSON ({exc})") from exc

    def ddl(self, ctx):
        node = super().ddl(ctx)
        column = Entity(self.column_name)
        node.nodes.append(NodeList((SQL("CHECK ("), column, SQL("IS NULL OR json_valid("), column, SQL("))"))))
        return node
