"""replication_jobs: a worker lease (worker, worker_heartbeat_at), so several OMA processes on one
database never drive the same replication and a surviving one takes over an orphaned job."""
from peewee import CharField, DateTimeField


class DateTime6Field(DateTimeField):
    """DATETIME(6), as every timestamp of the schema (frozen copy of 0001's definition)."""

    def get_modifiers(self):
        return [6]


def up(migrator, db):
    migrator.migrate(
        migrator.add_column('replication_jobs', 'worker', CharField(max_length=255, null=True)),
        migrator.add_column('replication_jobs', 'worker_heartbeat_at', DateTime6Field(null=True)),
        migrator.add_index('replication_jobs', ('worker',), False),
    )


def down(migrator, db):
    migrator.migrate(
        migrator.drop_index('replication_jobs', 'replication_jobs_worker'),
        migrator.drop_column('replication_jobs', 'worker_heartbeat_at'),
        migrator.drop_column('replication_jobs', 'worker'),
    )
