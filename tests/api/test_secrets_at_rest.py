"""Secrets at rest (issue 9, items 9 and 10): private file modes of the data dir and the SQLite files,
AES-GCM ciphertexts bound to their table/row/column, migration 0008 (re-encryption and hashed pairing
codes, on SQLite and MariaDB) and the key rotation command."""
from __future__ import annotations

import base64
import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from oma.v1 import discovery_pb2
from playhouse.migrations import Runner

from oma_server.db import models
from oma_server.db.database import connect, database_proxy, secure_data_dir
from oma_server.db.migrate import HISTORY_TABLE, MIGRATIONS_DIR, migrate
from oma_server.domain import cloudstack_config, credentials, enrollment, secrets_at_rest
from oma_server.domain.crypto import SecretBox, SecretSlot, SecretUnreadable, slot_of
from omaclient.client import OmaClient
from tests import factories
from tests.fixtures.databases import fresh_database_url
from tests.fixtures.servers import ADMIN_PASSWORD

OMA_SERVER = str(Path(sys.executable).with_name("oma-server"))
MIGRATION_0008 = "0008_secrets_bound_to_rows"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def unbound_v1(key: bytes, plaintext: str) -> str:
    """A secret as the server wrote it before 0008: enc:v1 without associated data."""
    nonce = os.urandom(12)
    return "enc:v1:" + base64.b64encode(nonce + AESGCM(key).encrypt(nonce, plaintext.encode(), None)).decode()


# --- file modes ---------------------------------------------------------------------------------------------


def test_sqlite_file_and_its_wal_and_shm_are_private_even_with_a_permissive_umask(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    secure_data_dir(data_dir)
    assert mode(data_dir) == 0o700
    path = data_dir / "oma.db"
    previous = os.umask(0o022)
    try:
        database = connect(f"sqlite:///{path}")
        database.connect()
        database.execute_sql("CREATE TABLE t (x TEXT)")
        database.execute_sql("INSERT INTO t VALUES ('written')")
        files = {p.name: mode(p) for p in data_dir.iterdir()}
        database.close()
    finally:
        os.umask(previous)
    # While a connection is open in WAL mode SQLite keeps -wal and -shm beside the file.
    assert files == {"oma.db": 0o600, "oma.db-wal": 0o600, "oma.db-shm": 0o600}

    # Files left readable by an older version are closed up on the next start.
    for name in ("oma.db", "oma.db-wal", "oma.db-shm"):
        (data_dir / name).touch()
        (data_dir / name).chmod(0o644)
    connect(f"sqlite:///{path}")
    assert {p.name: mode(p) for p in data_dir.iterdir()} == {"oma.db": 0o600, "oma.db-wal": 0o600,
                                                             "oma.db-shm": 0o600}


def test_oma_server_migrate_creates_a_private_data_dir_database_and_key(tmp_path):
    data_dir = tmp_path / "state"
    env = {**os.environ, "OMA_DATA_DIR": str(data_dir), "OMA_ADMIN_PASSWORD": "x" * 16}
    env.pop("OMA_DB_URL", None)
    done = subprocess.run([OMA_SERVER, "migrate"], env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: os.umask(0o022))
    assert done.returncode == 0, done.stderr
    assert mode(data_dir) == 0o700
    assert {p.name: mode(p) for p in data_dir.iterdir() if p.name.startswith(("oma.db", "encryption"))} == {
        "oma.db": 0o600, "encryption.key": 0o600} | {
        p.name: 0o600 for p in data_dir.iterdir() if p.name.startswith("oma.db-")}


# --- ciphertexts bound to their slot ------------------------------------------------------------------------


def test_a_ciphertext_only_opens_in_its_own_row_and_column():
    box = SecretBox(secrets.token_bytes(32))
    slot = SecretSlot("vmware_credentials", 7, "password_encrypted")
    sealed = box.encrypt("vc-password", slot)
    assert sealed.startswith("enc:v2:") and box.decrypt(sealed, slot) == "vc-password"
    for elsewhere in (SecretSlot("vmware_credentials", 8, "password_encrypted"),
                      SecretSlot("ossea_configs", 7, "secret_key"),
                      SecretSlot("ossea_configs", 7, "password_encrypted")):
        with pytest.raises(SecretUnreadable, match="not written for this row and column"):
            box.decrypt(sealed, elsewhere)
    with pytest.raises(SecretUnreadable, match="with another encryption key"):
        SecretBox(secrets.token_bytes(32)).decrypt(sealed, slot)
    # The unbound forms of before migration 0008 are refused by the running server.
    with pytest.raises(SecretUnreadable, match="oma-server migrate"):
        box.decrypt("TEMP_PLAINTEXT_vc-password", slot)


def test_a_secret_copied_to_another_row_or_column_is_refused_with_a_clear_status(oma_factory):
    server = oma_factory(vma_address="127.0.0.1:9", vma_retries=0)
    box = server.runtime.secrets
    victim = credentials.create(box, credential_name="prod", vcenter_host="vc.prod", username="u",
                                password="prod-password", datacenter="DC0", created_by="t")
    attacker = credentials.create(box, credential_name="evil", vcenter_host="vc.attacker", username="u",
                                  password="whatever", datacenter="DC0", created_by="t")
    # Every encrypted column is known to the rotation.
    assert {f"{f.model._meta.table_name}.{f.column_name}" for f in secrets_at_rest.ENCRYPTED_FIELDS} == {
        "vmware_credentials.password_encrypted", "ossea_configs.api_key", "ossea_configs.secret_key"}
    models.VmwareCredential.update(password_encrypted=victim.password_encrypted).where(
        models.VmwareCredential.id == attacker.id).execute()
    with OmaClient(f"127.0.0.1:{server.port}", token="") as client:
        client.login("admin", ADMIN_PASSWORD)
        before = factories.db_snapshot()
        with pytest.raises(grpc.RpcError) as err:
            client.discovery.PreviewDiscovery(discovery_pb2.PreviewDiscoveryRequest(
                source=discovery_pb2.VCenterSource(credential_id=attacker.id)), timeout=30)
        assert factories.db_snapshot() == before
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "vmware_credentials.password_encrypted of row" in err.value.details()
    assert "not written for this row and column" in err.value.details()
    assert "prod-password" not in err.value.details()
    # The victim's own row still opens.
    assert credentials.login_for(box, victim.id).password == "prod-password"


# --- migration 0008 -----------------------------------------------------------------------------------------


def test_migration_0008_binds_existing_secrets_and_hashes_pairing_codes(db_url, request):
    kind = "sqlite" if db_url.startswith("sqlite") else "mariadb"
    server = request.getfixturevalue("mariadb_test_server") if kind == "mariadb" else None
    key = secrets.token_bytes(32)
    box = SecretBox(key)
    with fresh_database_url(kind, server) as url:
        database = connect(url)
        previous = database_proxy.obj
        try:
            runner = Runner(database, str(MIGRATIONS_DIR), table_name=HISTORY_TABLE)
            names = [m.name for m in runner.status()]
            runner.up(target=names[names.index(MIGRATION_0008) - 1])
            p = database.param
            stamp, future = "2026-01-01 00:00:00", "2099-01-01 00:00:00"
            database.execute_sql(
                "INSERT INTO vmware_credentials (credential_name, vcenter_host, username, password_encrypted, "
                f"datacenter, created_at, updated_at) VALUES ('old', 'vc', 'u', {p}, 'DC0', {p}, {p}), "
                f"('legacy', 'vc', 'u', {p}, 'DC0', {p}, {p})",
                (unbound_v1(key, "v1-password"), stamp, stamp, "TEMP_PLAINTEXT_plain-password", stamp, stamp))
            database.execute_sql(
                f"INSERT INTO ossea_configs (name, api_url, api_key, secret_key, zone) VALUES ('cs', 'http://cs', "
                f"{p}, {p}, 'z')", (unbound_v1(key, "cs-api-key"), unbound_v1(key, "cs-secret-key")))
            database.execute_sql(
                "INSERT INTO vma_enrollments (id, pairing_code, vma_public_key, expires_at, created_at, updated_at) "
                f"VALUES ('e1', 'USED-CODE-2345', 'ssh-ed25519 AAAA', {p}, {p}, {p})", (future, stamp, stamp))
            database.execute_sql(
                "INSERT INTO vma_pairing_codes (id, pairing_code, generated_by, used_by_enrollment_id, expires_at, "
                f"used_at, created_at) VALUES ('c1', 'USED-CODE-2345', 'a', 'e1', {p}, {p}, {p}), "
                f"('c2', 'FREE-CDE2-3456', 'a', NULL, {p}, NULL, {p}), ('c3', 'odd code', 'a', NULL, {p}, NULL, {p})",
                (future, stamp, stamp, future, stamp, future, stamp))

            # Without the key the migration refuses, and leaves everything as it was.
            with pytest.raises(RuntimeError, match="needs the encryption key"):
                migrate(database)
            assert MIGRATION_0008 not in {m.name for m in runner.status() if m.applied}

            assert MIGRATION_0008 in migrate(database, box)
            database_proxy.initialize(database)
            with database.connection_context():
                by_name = {c.credential_name: c for c in models.VmwareCredential.select()}
                assert {name: credentials.login_for(box, c.id).password for name, c in by_name.items()} == {
                    "old": "v1-password", "legacy": "plain-password"}
                config = models.OsseaConfig.get()
                assert box.decrypt(config.secret_key, slot_of(models.OsseaConfig.secret_key, config.id)) == \
                    "cs-secret-key"
                assert box.decrypt(config.api_key, slot_of(models.OsseaConfig.api_key, config.id)) == "cs-api-key"
                # Re-encrypted, bound to the row: copied to the other credential it does not open.
                with pytest.raises(SecretUnreadable):
                    box.decrypt(by_name["old"].password_encrypted,
                                slot_of(models.VmwareCredential.password_encrypted, by_name["legacy"].id))

                codes = {c.id: c for c in models.VmaPairingCode.select()}
                assert codes["c1"].pairing_code == enrollment.code_hash(box, "USED-CODE-2345")
                assert models.VmaEnrollment.get_by_id("e1").pairing_code == codes["c1"].pairing_code
                assert codes["c2"].pairing_code == enrollment.code_hash(box, "FREE-CDE2-3456")
                assert codes["c2"].expires_at > models.utcnow()  # a well-formed unused code stays usable
                assert codes["c3"].expires_at <= models.utcnow()  # one that could never be typed is expired
                assert all("CODE" not in c.pairing_code for c in codes.values())
            assert migrate(database, box) == []
        finally:
            database_proxy.initialize(previous)
            database.close()


# --- rotation -----------------------------------------------------------------------------------------------


def test_rotation_reencrypts_every_secret_in_one_transaction(db):
    old, new = SecretBox(secrets.token_bytes(32)), SecretBox(secrets.token_bytes(32))
    cred = credentials.create(old, credential_name="c", vcenter_host="vc", username="u", password="pw",
                              datacenter="DC0", created_by="t")
    config = cloudstack_config.create(old, {"name": "cs", "api_url": "http://cs/client/api", "api_key": "ak",
                                            "secret_key": "sk", "zone": "z"})
    code_row, code, _ = enrollment.generate_pairing_code(old, enrollment.Caller("t"), "t", 600)

    rotation = secrets_at_rest.rotate(old, new)
    assert rotation.reencrypted == {"vmware_credentials.password_encrypted": 1, "ossea_configs.api_key": 1,
                                    "ossea_configs.secret_key": 1}
    assert rotation.pairing_codes_expired == 1
    assert credentials.login_for(new, cred.id).password == "pw"
    with pytest.raises(SecretUnreadable):
        credentials.login_for(old, cred.id)
    assert cloudstack_config.api_key_hint(cloudstack_config.get(config.id), new) == "…"  # "ak" decrypts
    cloudstack_config.client(cloudstack_config.get(config.id), new)
    assert models.VmaPairingCode.get_by_id(code_row.id).expires_at <= models.utcnow()

    # One unreadable secret: nothing at all changes.
    models.VmwareCredential.update(password_encrypted=models.OsseaConfig.get_by_id(config.id).secret_key).where(
        models.VmwareCredential.id == cred.id).execute()
    before = factories.db_snapshot()
    with pytest.raises(SecretUnreadable):
        secrets_at_rest.rotate(new, SecretBox(secrets.token_bytes(32)))
    assert factories.db_snapshot() == before


def test_rotation_is_refused_while_a_replication_is_active(db):
    old = SecretBox(secrets.token_bytes(32))
    factories.replication_job(factories.context(), status="replicating")
    before = factories.db_snapshot()
    with pytest.raises(Exception, match="replication job"):
        secrets_at_rest.rotate(old, SecretBox(secrets.token_bytes(32)))
    assert factories.db_snapshot() == before


def test_rotate_encryption_key_command_replaces_the_development_key_file(tmp_path):
    data_dir = tmp_path / "state"
    env = {**os.environ, "OMA_DATA_DIR": str(data_dir), "OMA_ADMIN_PASSWORD": "x" * 16}
    for name in ("OMA_DB_URL", "OMA_ENCRYPTION_KEY", "MIGRATEKIT_CRED_ENCRYPTION_KEY"):
        env.pop(name, None)
    assert subprocess.run([OMA_SERVER, "migrate"], env=env, capture_output=True, timeout=120).returncode == 0
    old_key = base64.b64decode((data_dir / "encryption.key").read_text())
    database = connect(f"sqlite:///{data_dir / 'oma.db'}")
    previous = database_proxy.obj
    database_proxy.initialize(database)
    try:
        with database.connection_context():
            cred = credentials.create(SecretBox(old_key), credential_name="c", vcenter_host="vc", username="u",
                                      password="pw", datacenter="DC0", created_by="t")
        new_key = secrets.token_bytes(32)
        key_file = tmp_path / "new.key"
        key_file.write_text(base64.b64encode(new_key).decode() + "\n")

        done = subprocess.run([OMA_SERVER, "rotate-encryption-key", "--new-key-file", str(key_file)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "vmware_credentials.password_encrypted: 1" in done.stdout
        assert base64.b64encode(new_key).decode() not in done.stdout + done.stderr  # the key is never printed
        assert base64.b64decode((data_dir / "encryption.key").read_text()) == new_key
        assert mode(data_dir / "encryption.key") == 0o600
        with database.connection_context():
            assert credentials.login_for(SecretBox(new_key), cred.id).password == "pw"

        bad = tmp_path / "bad.key"
        bad.write_text("not a key")
        refused = subprocess.run([OMA_SERVER, "rotate-encryption-key", "--new-key-file", str(bad)], env=env,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "base64 of 32 bytes" in refused.stderr
        assert base64.b64decode((data_dir / "encryption.key").read_text()) == new_key
    finally:
        database_proxy.initialize(previous)
        database.close()
