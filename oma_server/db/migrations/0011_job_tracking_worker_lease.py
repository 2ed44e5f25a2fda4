"""job_tracking: the same worker lease replication_jobs has (worker, worker_heartbeat_at), so failover,
test-end, rollback and cleanup jobs are leased exactly like replications (docs/design/workflows.md):
a job's process and its heartbeat in two columns, taken over with one conditional update."""
from peewee import CharField, DateTimeField


class DateTime6Field(DateTimeField):
    """DATETIME(6), as every timestamp of the schema (frozen copy of 0001's definition)."""

    def get_modifiers(self):
        return [6]


def up(migrator, db):
    migrator.migrate(
        migrator.add_column('job_tracking', 'worker', CharField(max_length=255, null=True)),
        migrator.add_column('job_tracking', 'worker_heartbeat_at', DateTime6Field(null=True)),
        migrator.add_index('job_tracking', ('worker',), False),
    )


def down(migrator, db):
    migrator.migrate(
        migrator.drop_index('job_tracking', 'job_tracking_worker'),
        migrator.drop_column('job_tracking', 'worker_heartbeat_at'),
        migrator.drop_column('job_tracking', 'worker'),
    )
