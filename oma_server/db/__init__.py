"""The OMA server's database layer: connection setup, models, view readers and versioned migrations.

Start-up: ``database = init_database(url)`` then ``oma_server.db.migrate.migrate(database)``; per RPC:
``with db.connection_context(): …``.  See ``database.py`` (URLs, pooling, pragmas), ``models.py`` (tables, status
vocabularies, timestamp and ``updated_at`` conventions), ``views.py`` and ``migrate.py`` (migrations, drift check,
command line).  ``migrate`` is deliberately not re-exported here: the function would shadow the module.
"""
from oma_server.db.database import (
    connect,
    database_proxy,
    db,
    db_for_update,
    init_database,
    is_mysql,
)
from oma_server.db.fields import new_uuid, utcnow

__all__ = [
    "connect",
    "database_proxy",
    "db",
    "db_for_update",
    "init_database",
    "is_mysql",
    "new_uuid",
    "utcnow",
]
