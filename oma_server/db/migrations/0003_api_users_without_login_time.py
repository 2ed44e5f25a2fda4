"""api_users: drop last_login_at — Login issues tokens and writes nothing (the user's API mapping:
"POST /auth/login → issues tokens only; no schema writes")."""
from peewee import DateTimeField


def up(migrator, db):
    migrator.migrate(migrator.drop_column('api_users', 'last_login_at'))


def down(migrator, db):
    migrator.migrate(migrator.add_column('api_users', 'last_login_at', DateTimeField(null=True)))
