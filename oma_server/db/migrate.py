"""Versioned schema migrations (Peewee's built-in ``playhouse.migrations`` runner) and the model/schema drift check.

Migrations are the numbered files in ``migrations/`` (``0001_initial.py`` = the v1 schema and views), applied in
order and recorded in the ``schema_migration`` table, so :func:`migrate` is idempotent.  Each file is a frozen
copy of the schema change: it must not import the application models, which keep evolving.

Changing the schema:
1. edit ``models.py``;
2. ``python -m oma_server.db.migrate sqlite:///dev.db generate <name>`` (against a database migrated to the
   current head) writes the next numbered file for new tables, columns and indexes; changes of type, nullability,
   default, CHECK vocabulary, foreign key or view are written by hand with the ``playhouse.migrate`` operations
   (``alter_column_type``, ``add_not_null``, …) or SQL;
3. freeze it: replace imports of ``oma_server.db`` classes by the DDL-only copies used in ``0001_initial.py`` and give
   NOT NULL columns a SQL ``DEFAULT`` (``constraints=[SQL("DEFAULT …")]``);
4. run the tests: ``test_db_schema`` applies the migrations on SQLite and MariaDB and fails on any drift.

:func:`schema_drift` reports every difference between a migrated database and the models: tables, columns and
indexes (``playhouse.schema_diff.diff_models``) plus column types, nullability, SQL defaults, enum CHECK
vocabularies, foreign keys with their ON DELETE action, and the views.

Command line: ``python -m oma_server.db.migrate <database-url> status|up|drift|generate <name>``.
"""
from __future__ import annotations

import argparse
import re
import sys
import threading
from pathlib import Path
from typing import Any

from peewee import Database, DatabaseProxy, Field, ForeignKeyField, MySQLDatabase
from playhouse.migrations import Migration, Runner, template
from playhouse.schema_diff import diff_models

from oma_server.db.database import connect
from oma_server.db.fields import EnumField, server_default_sql
from oma_server.db.models import ALL_MODELS
from oma_server.db.views import VIEW_NAMES

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
HISTORY_TABLE = "schema_migration"


def _runner(database: Database | DatabaseProxy) -> Runner:
    if isinstance(database, DatabaseProxy):
        database = database.obj
    return Runner(database, str(MIGRATIONS_DIR), table_name=HISTORY_TABLE)


_secrets_lock = threading.Lock()
_secrets: Any = None


def migration_secrets() -> Any:
    """The ``SecretBox`` handed to :func:`migrate` (None without one), for migrations that rewrite
    encrypted or hashed values (0008). Such a migration fails with a clear message when it has rows to
    rewrite and no key: ``oma-server migrate`` and the server's start always hand the key in."""
    return _secrets


def migrate(database: Database | DatabaseProxy, secrets: Any = None) -> list[str]:
    """Apply the pending migrations in order; returns their names (empty when the schema is current).
    ``secrets``: the server's ``SecretBox`` (needed when existing secrets must be re-encrypted)."""
    global _secrets
    with _secrets_lock:
        _secrets = secrets
        try:
            return _runner(database).up()
        finally:
            _secrets = None


def status(database: Database | DatabaseProxy) -> list[Migration]:
    """Every known migration as ``(idx, name, path, applied)``; ``applied`` is None while pending."""
    return _runner(database).status()


# ---------------------------------------------------------------------------------------------------------------
# Drift check
# ---------------------------------------------------------------------------------------------------------------

_MYSQL_TYPE_ALIASES = {"integer": "int", "bool": "tinyint(1)", "double precision": "double", "json": "longtext",
                       "numeric": "decimal"}
_CHECK_IN = re.compile(r"CHECK\s*\(\s*[`\"]?(\w+)[`\"]?\s+IN\s*\(([^)]*)\)", re.IGNORECASE)
_QUOTED = re.compile(r"'((?:[^']|'')*)'")


def _model_type(field: Field, ctx) -> str:
    return field.ddl_datatype(ctx).sql


def _canonical_type(type_sql: str, mysql: bool) -> str:
    """One spelling for a model's DDL type and the type the backend reports (MariaDB ``column_type``, SQLite's
    declared type), so the two can be compared."""
    if not mysql:
        return type_sql.upper()
    text = type_sql.lower().replace(" auto_increment", "").replace(", ", ",")
    base, _, rest = text.partition("(")
    text = _MYSQL_TYPE_ALIASES.get(base, base) + ("(" + rest if rest else "")
    # Display widths of integer types carry no meaning (and MySQL 8 omits them).
    return re.sub(r"^(int|bigint|smallint|mediumint)\(\d+\)", r"\1", text)


def _canonical_default(default: Any) -> Any:
    """Compare defaults as values: quoted text → the string, numbers → float, nothing/NULL → None."""
    if default is None:
        return None
    text = str(default).strip()
    if text.upper() == "NULL":
        return None
    quoted = _QUOTED.fullmatch(text)
    if quoted:
        return quoted.group(1).replace("''", "'")
    try:
        return float(text)
    except ValueError:
        return text


def _database_checks(database: Database, table: str) -> dict[str, set[str]]:
    """``column -> allowed values`` of the ``CHECK (col IN (...))`` constraints on ``table``."""
    if isinstance(database, MySQLDatabase):
        clauses = [row[0] for row in database.execute_sql(
            "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS "
            "WHERE CONSTRAINT_SCHEMA = DATABASE() AND TABLE_NAME = %s", (table,))]
        clauses = [f"CHECK ({clause})" for clause in clauses]
    else:
        clauses = [row[0] for row in database.execute_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,))]
    checks = {}
    for clause in clauses:
        for column, values in _CHECK_IN.findall(clause):
            checks[column] = {v.replace("''", "'") for v in _QUOTED.findall(values)}
    return checks


def _normalized_on_delete(action: str | None) -> str:
    action = (action or "NO ACTION").upper()
    return "NO ACTION" if action == "RESTRICT" else action


def _table_drift(database: Database, model) -> list[str]:
    mysql = isinstance(database, MySQLDatabase)
    ctx = database.get_sql_context()
    table = model._meta.table_name
    columns = {column.name: column for column in database.get_columns(table)}
    checks = _database_checks(database, table)
    problems = []
    for field in model._meta.sorted_fields:
        column = columns.get(field.column_name)
        if column is None:
            continue  # reported by diff_models
        where = f"{table}.{field.column_name}"
        expected_type = _canonical_type(_model_type(field, ctx), mysql)
        actual_type = _canonical_type(column.full_type if mysql else column.data_type or "", mysql)
        if expected_type != actual_type:
            problems.append(f"{where}: type {actual_type} in the database, {expected_type} in the model")
        if column.null != bool(field.null):
            actual, expected = ("NULL" if nullable else "NOT NULL" for nullable in (column.null, bool(field.null)))
            problems.append(f"{where}: {actual} in the database, {expected} in the model")
        clause = server_default_sql(field.default)
        expected_default = _canonical_default(clause.sql.split(" ", 1)[1]) if clause is not None else None
        actual_default = _canonical_default(column.default)
        if expected_default != actual_default:
            problems.append(
                f"{where}: default {actual_default!r} in the database, {expected_default!r} in the model")
        expected_check = set(field.allowed) if isinstance(field, EnumField) and field.check else None
        actual_check = checks.get(field.column_name)
        if actual_check != expected_check:
            problems.append(f"{where}: CHECK values {sorted(actual_check or ())} in the database, "
                            f"{sorted(expected_check or ())} in the model")

    expected_fks = {
        (f.column_name, f.rel_model._meta.table_name, f.rel_field.column_name, _normalized_on_delete(f.on_delete))
        for f in model._meta.sorted_fields if isinstance(f, ForeignKeyField)}
    actual_fks = {(fk.column, fk.dest_table, fk.dest_column, _normalized_on_delete(fk.on_delete))
                  for fk in database.get_foreign_keys(table)}
    for column, dest_table, dest_column, on_delete in sorted(expected_fks - actual_fks):
        problems.append(f"{table}.{column}: foreign key → {dest_table}.{dest_column} ON DELETE {on_delete} "
                        "missing in the database")
    for column, dest_table, dest_column, on_delete in sorted(actual_fks - expected_fks):
        problems.append(f"{table}.{column}: foreign key → {dest_table}.{dest_column} ON DELETE {on_delete} "
                        "not in the model")
    return problems


def schema_drift(database: Database | DatabaseProxy) -> list[str]:
    """Human-readable differences between the database schema and the models (empty list = in sync)."""
    if isinstance(database, DatabaseProxy):
        database = database.obj
    problems = [line for line in str(diff_models(database, list(ALL_MODELS))).splitlines() if line]
    tables = set(database.get_tables())
    for model in ALL_MODELS:
        if model._meta.table_name in tables:
            problems.extend(_table_drift(database, model))
    views = {view.name for view in database.get_views()}
    problems.extend(f"view {name} missing" for name in VIEW_NAMES if name not in views)
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oma_server.db.migrate", description=__doc__.split("\n")[0])
    parser.add_argument("url", help="database URL (sqlite:///path.db or mysql://user:pass@host:port/db)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="list migrations; exit status 1 while some are pending")
    commands.add_parser("up", help="apply pending migrations")
    commands.add_parser("drift", help="compare the schema with the models; exit status 1 on differences")
    generate = commands.add_parser("generate", help="write the next migration from the model/schema diff")
    generate.add_argument("name")
    args = parser.parse_args(argv)

    database = connect(args.url)
    try:
        if args.command == "status":
            rows = status(database)
            for row in rows:
                print(f"[x] {row.name}  {row.applied}" if row.applied else f"[ ] {row.name}")
            return int(any(not row.applied for row in rows))
        if args.command == "up":
            applied = migrate(database)
            print("\n".join(f"applied: {name}" for name in applied) or "nothing to do.")
            return 0
        if args.command == "drift":
            problems = schema_drift(database)
            print("\n".join(problems) or "schema matches models.")
            return int(bool(problems))
        diff = diff_models(database, list(ALL_MODELS))
        if not diff:
            print("schema matches models; nothing to generate.")
            return 0
        print(_runner(database).create(args.name, body=template(diff)))
        return 0
    finally:
        database.close()


if __name__ == "__main__":
    sys.exit(main())
