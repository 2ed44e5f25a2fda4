"""Every secret the OMA stores, and the rotation of the key that protects them (``oma-server
rotate-encryption-key``; design in docs/security/data.md).

Rotation re-encrypts every encrypted column with the new key inside ONE transaction: either every
secret is readable with the new key, or (on any failure) nothing changed and the old key still reads
everything. Values derived from the key cannot be carried over: unused pairing codes (stored as keyed
hashes) are expired, and the TLS pre-shared keys of NBD exports are derived per job, so a rotation is
refused while a replication is active.
"""
from __future__ import annotations

from dataclasses import dataclass

from oma_server.db.database import database_proxy as db
from oma_server.db.database import db_for_update
from oma_server.db.models import (
    REPLICATION_ACTIVE_STATUSES,
    OsseaConfig,
    ReplicationJob,
    VmaPairingCode,
    VmwareCredential,
    utcnow,
)
from oma_server.domain.crypto import SecretBox, slot_of
from oma_server.errors import FailedPrecondition

#: Every encrypted column (AES-GCM, bound to table/row/column). A new one must be added here.
ENCRYPTED_FIELDS = (VmwareCredential.password_encrypted, OsseaConfig.api_key, OsseaConfig.secret_key)


@dataclass(frozen=True)
class Rotation:
    """What a rotation rewrote: re-encrypted values per ``table.column``, and expired pairing codes."""

    reencrypted: dict[str, int]
    pairing_codes_expired: int


def rotate(old: SecretBox, new: SecretBox) -> Rotation:
    """Re-encrypt every secret from ``old`` to ``new`` in one transaction (see the module docstring)."""
    counts: dict[str, int] = {}
    with db.atomic():
        active = ReplicationJob.select().where(ReplicationJob.status.in_(REPLICATION_ACTIVE_STATUSES)).count()
        if active:
            raise FailedPrecondition(
                f"{active} replication job(s) are active; their NBD exports use keys derived from the current "
                "encryption key. Let them end (or cancel them), stop every OMA process, then rotate")
        for field in ENCRYPTED_FIELDS:
            model = field.model
            name = f"{model._meta.table_name}.{field.column_name}"
            counts[name] = 0
            rows = db_for_update(model.select(model._meta.primary_key, field)).tuples()
            for row_id, stored in list(rows):
                if not stored:
                    continue
                slot = slot_of(field, row_id)
                model.update({field: new.encrypt(old.decrypt(stored, slot), slot)}).where(
                    model._meta.primary_key == row_id).execute()
                counts[name] += 1
        now = utcnow()
        expired = VmaPairingCode.update(expires_at=now).where(
            VmaPairingCode.used_at.is_null(), VmaPairingCode.expires_at > now).execute()
    return Rotation(counts, expired)
