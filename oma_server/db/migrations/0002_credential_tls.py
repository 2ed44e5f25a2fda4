"""vmware_credentials: how the vCenter certificate is verified (pinned thumbprint or explicitly
insecure), so discovery with a saved credential needs no TLS details from the caller."""
from peewee import SQL, BooleanField, CharField, MySQLDatabase


def up(migrator, db):
    migrator.migrate(
        migrator.add_column('vmware_credentials', 'tls_thumbprint',
                            CharField(max_length=255, default='', constraints=[SQL("DEFAULT ''")])),
        migrator.add_column('vmware_credentials', 'tls_insecure',
                            BooleanField(default=False, constraints=[SQL("DEFAULT 0")])),
    )
    if isinstance(db, MySQLDatabase):
        # MariaDB: the migrator adds NOT NULL columns in steps that drop the DEFAULT clause.
        db.execute_sql("ALTER TABLE vmware_credentials ALTER COLUMN tls_thumbprint SET DEFAULT ''")
        db.execute_sql("ALTER TABLE vmware_credentials ALTER COLUMN tls_insecure SET DEFAULT 0")


def down(migrator, db):
    migrator.migrate(
        migrator.drop_column('vmware_credentials', 'tls_insecure'),
        migrator.drop_column('vmware_credentials', 'tls_thumbprint'),
    )
