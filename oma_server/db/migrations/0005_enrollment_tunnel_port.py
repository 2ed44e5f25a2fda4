"""VMA enrollment: each approved VMA's reverse tunnel port is a column with a unique index (two VMAs can
never be handed the same OMA-side port), and failed signature verifications are counted on the
enrollment row instead of being re-counted from the audit trail."""
from peewee import SQL, IntegerField, MySQLDatabase


def up(migrator, db):
    migrator.migrate(
        migrator.add_column('vma_active_connections', 'reverse_tunnel_port', IntegerField(null=True)),
        migrator.add_index('vma_active_connections', ('reverse_tunnel_port',), True),
        migrator.add_column('vma_enrollments', 'verification_attempts', IntegerField(default=0, constraints=[SQL("DEFAULT 0")])),
    )
    if isinstance(db, MySQLDatabase):
        # MariaDB: the migrator adds NOT NULL columns in steps that drop the DEFAULT clause.
        db.execute_sql("ALTER TABLE vma_enrollments ALTER COLUMN verification_attempts SET DEFAULT 0")


def down(migrator, db):
    migrator.migrate(
        migrator.drop_column('vma_enrollments', 'verification_attempts'),
        migrator.drop_index('vma_active_connections', 'vma_active_connections_reverse_tunnel_port'),
        migrator.drop_column('vma_active_connections', 'reverse_tunnel_port'),
    )
