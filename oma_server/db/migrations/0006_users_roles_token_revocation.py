"""Users, roles and ending bearer tokens: ``api_users.role`` (``admin`` | ``operator``; existing users were all
full-power, so they become ``admin``), ``api_users.tokens_valid_after`` (tokens issued earlier are refused) and the
``api_revoked_tokens`` table (single tokens ended by Logout, kept until they would have expired anyway)."""
from peewee import SQL, CharField, DateTimeField, ForeignKeyField, Model, MySQLDatabase

MYSQL_TABLE_SETTINGS = ("ENGINE=InnoDB", "DEFAULT CHARSET=utf8mb4", "COLLATE=utf8mb4_bin")


class DateTime6Field(DateTimeField):
    """DATETIME(6), as every timestamp of the schema (frozen copy of 0001's definition)."""

    def get_modifiers(self):
        return [6]


def _tables(db):
    mysql = isinstance(db, MySQLDatabase)

    class BaseModel(Model):
        class Meta:
            database = db
            table_settings = MYSQL_TABLE_SETTINGS if mysql else None

    class ApiUser(BaseModel):
        class Meta:
            table_name = "api_users"

    class ApiRevokedToken(BaseModel):
        jti = CharField(64, primary_key=True)
        user = ForeignKeyField(ApiUser, on_delete="CASCADE")
        expires_at = DateTime6Field(index=True)
        revoked_at = DateTime6Field()

        class Meta:
            table_name = "api_revoked_tokens"

    return ApiRevokedToken


def up(migrator, db):
    migrator.migrate(
        migrator.add_column('api_users', 'role',
                            CharField(max_length=16, default='admin', constraints=[SQL("DEFAULT 'admin'")])),
        migrator.add_column('api_users', 'tokens_valid_after', DateTime6Field(null=True)),
    )
    if isinstance(db, MySQLDatabase):
        # MariaDB: the migrator adds NOT NULL columns in steps that drop the DEFAULT clause.
        db.execute_sql("ALTER TABLE api_users ALTER COLUMN role SET DEFAULT 'admin'")
    db.create_tables([_tables(db)], safe=False)


def down(migrator, db):
    db.drop_tables([_tables(db)], safe=False)
    migrator.migrate(
        migrator.drop_column('api_users', 'tokens_valid_after'),
        migrator.drop_column('api_users', 'role'),
    )
