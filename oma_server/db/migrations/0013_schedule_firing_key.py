"""schedule_executions: ``firing_key``, unique, set for clock firings only (``<schedule id>@<fire time>``).

Several OMA schedulers watch the same schedules and all try to fire each tick. The unique index makes the firing
itself the claim: the second insert of a key is a duplicate on one server, and a certification conflict between
the nodes of a Galera cluster (where the schedule row's ``FOR UPDATE`` lock is not seen by the other nodes).
Manual and chain firings leave it NULL (a unique index allows any number of NULLs)."""
from peewee import CharField


def up(migrator, db):
    migrator.migrate(
        migrator.add_column('schedule_executions', 'firing_key', CharField(max_length=128, null=True)),
        migrator.add_index('schedule_executions', ('firing_key',), True),
    )


def down(migrator, db):
    migrator.migrate(
        migrator.drop_index('schedule_executions', 'schedule_executions_firing_key'),
        migrator.drop_column('schedule_executions', 'firing_key'),
    )
