"""Secrets at rest bound to their row and column, pairing codes stored as keyed hashes (issue 9, items 9/10).

* Every encrypted column (vmware_credentials.password_encrypted, ossea_configs.api_key/secret_key) is
  re-encrypted as ``enc:v2:`` with the table, row id and column as AES-GCM associated data. Earlier forms
  (``enc:v1:``, untagged base64, ``TEMP_PLAINTEXT_``) are read one last time here.
* Every pairing code (vma_pairing_codes and the copy in vma_enrollments) is replaced by its keyed hash.
  All codes this system ever stored can be hashed (they are kept normalised), so unused codes stay valid;
  a stored value that is not a well-formed code could never have been entered, and an unused one is
  expired on the spot.

No schema change. The key comes from ``oma_server.db.migrate.migration_secrets()`` (``oma-server migrate``
and the server's start hand it in); on a database with nothing to rewrite none is needed. The value
formats are those of ``oma_server.domain.crypto`` and ``enrollment.code_hash`` (stable stored formats,
unlike the models this file must not import). ``down`` keeps the new values: restoring plaintext codes
or unbound ciphertexts would undo the protection, and older code cannot read them.
"""
from datetime import datetime, timezone

from oma_server.db.migrate import migration_secrets
from oma_server.domain.crypto import PREFIX, SecretSlot

ENCRYPTED_COLUMNS = (("vmware_credentials", "password_encrypted"), ("ossea_configs", "api_key"),
                     ("ossea_configs", "secret_key"))
CODE_TABLES = ("vma_pairing_codes", "vma_enrollments")
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTVWXYZ23456789"
HASH_LENGTH = 20


def _is_code(value):
    parts = value.split("-")
    return len(parts) == 3 and all(len(p) == 4 and all(c in CODE_ALPHABET for c in p) for p in parts)


def up(migrator, db):
    p = db.param
    secrets = [(table, column, row_id, value)
               for table, column in ENCRYPTED_COLUMNS
               for row_id, value in db.execute_sql(f"SELECT id, {column} FROM {table}").fetchall()
               if value and not value.startswith(PREFIX)]
    codes = [(table, row_id, value) for table in CODE_TABLES
             for row_id, value in db.execute_sql(f"SELECT id, pairing_code FROM {table}").fetchall()
             if len(value) != HASH_LENGTH]
    if not secrets and not codes:
        return
    box = migration_secrets()
    if box is None:
        raise RuntimeError("migration 0008 re-encrypts stored secrets and hashes pairing codes, which needs the "
                           "encryption key: run `oma-server migrate` (it reads OMA_ENCRYPTION_KEY) instead")
    for table, column, row_id, value in secrets:
        sealed = box.encrypt(box.decrypt_unbound(value), SecretSlot(table, row_id, column))
        db.execute_sql(f"UPDATE {table} SET {column} = {p} WHERE id = {p}", (sealed, row_id))
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    for table, row_id, value in codes:
        db.execute_sql(f"UPDATE {table} SET pairing_code = {p} WHERE id = {p}",
                       (box.keyed_hash("pairing-code", value), row_id))
        if table == "vma_pairing_codes" and not _is_code(value):
            db.execute_sql(f"UPDATE vma_pairing_codes SET expires_at = {p} WHERE id = {p} AND used_at IS NULL "
                           f"AND expires_at > {p}", (now, row_id, now))


def down(migrator, db):
    pass
