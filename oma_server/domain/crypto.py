"""Secrets at rest: AES-256-GCM for vCenter passwords and CloudStack keys, keyed hashes, derived keys,
and the key files.

Stored form: ``enc:v2:`` + base64(nonce(12) || ciphertext || tag(16)). Every ciphertext is bound to
where it is stored: the AES-GCM associated data is the table, the row id and the column
(:class:`SecretSlot`), so a ciphertext copied into another row or column — e.g. a CloudStack secret key
pasted over the vCenter password of a credential whose host an attacker controls — fails its tag
check instead of being decrypted and sent somewhere. Values without a slot (``enc:v1:``, untagged
base64 of the same layout, or the original system's ``TEMP_PLAINTEXT_<value>``) are only read by
:meth:`SecretBox.decrypt_unbound`, which migration 0008 uses to re-encrypt them; the running server
refuses them.

The same key also yields, through HKDF-SHA256 with a purpose label, independent sub-keys: one for the
keyed hash of pairing codes (:meth:`SecretBox.keyed_hash`) and one per replication job for the
TLS pre-shared key of its NBD exports (:meth:`SecretBox.derive`). Nothing is hand-rolled: AES-GCM,
HMAC and HKDF come from ``cryptography``/the standard library.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from oma_server.errors import FailedPrecondition, InvalidArgument
from server_kit.private_files import write_private

PREFIX = "enc:v2:"
UNBOUND_PREFIX = "enc:v1:"
LEGACY_PLAINTEXT_PREFIX = "TEMP_PLAINTEXT_"
_NONCE_BYTES = 12
_TAG_BYTES = 16


class SecretUnreadable(FailedPrecondition):
    """A stored secret cannot be decrypted for its slot (wrong key, moved ciphertext, damaged value)."""


@dataclass(frozen=True)
class SecretSlot:
    """Where a secret is stored: table, row id and column. Its bytes are the AES-GCM associated data."""

    table: str
    row_id: int | str
    column: str

    def associated_data(self) -> bytes:
        # NUL separators: no table/column name or id contains one, so two slots never give the same bytes.
        return f"oma-secret\0{self.table}\0{self.row_id}\0{self.column}".encode()

    def __str__(self) -> str:
        return f"{self.table}.{self.column} of row {self.row_id}"


def slot_of(field: Any, row_id: int | str) -> SecretSlot:
    """The slot of a Peewee model field (``VmwareCredential.password_encrypted``) in row ``row_id``."""
    return SecretSlot(field.model._meta.table_name, row_id, field.column_name)


class SecretBox:
    """Encrypts and decrypts short secrets with one AES-256-GCM key, and derives sub-keys from it."""

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ValueError("the encryption key must be exactly 32 bytes (AES-256)")
        self._key = key
        self._aead = AESGCM(key)

    def encrypt(self, plaintext: str, slot: SecretSlot) -> str:
        if not plaintext:
            raise InvalidArgument("an empty secret cannot be stored")
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), slot.associated_data())
        return PREFIX + base64.b64encode(nonce + sealed).decode()

    def decrypt(self, stored: str, slot: SecretSlot) -> str:
        if not stored.startswith(PREFIX):
            raise SecretUnreadable(
                f"the secret in {slot} is not in the current stored form (enc:v2); run `oma-server migrate` "
                "or set the secret again")
        try:
            return self._open(stored[len(PREFIX):], slot.associated_data())
        except InvalidTag:
            raise SecretUnreadable(
                f"the secret in {slot} cannot be decrypted: it was not written for this row and column, or "
                "with another encryption key (was OMA_ENCRYPTION_KEY changed?); set the secret again") from None

    def decrypt_unbound(self, stored: str) -> str:
        """A value written before secrets were bound to their slot (``enc:v1:``, untagged base64,
        ``TEMP_PLAINTEXT_``): for migration 0008 only."""
        if stored.startswith(LEGACY_PLAINTEXT_PREFIX):
            return stored[len(LEGACY_PLAINTEXT_PREFIX):]
        blob_b64 = stored[len(UNBOUND_PREFIX):] if stored.startswith(UNBOUND_PREFIX) else stored
        try:
            return self._open(blob_b64, None)
        except InvalidTag:
            raise SecretUnreadable("a stored secret cannot be decrypted with the configured encryption key "
                                   "(was the key changed?)") from None

    def _open(self, blob_b64: str, associated_data: bytes | None) -> str:
        try:
            blob = base64.b64decode(blob_b64, validate=True)
        except (binascii.Error, ValueError):
            raise SecretUnreadable("a stored secret is not valid ciphertext; set it again") from None
        if len(blob) < _NONCE_BYTES + _TAG_BYTES:
            raise SecretUnreadable("a stored secret is too short to be ciphertext; set it again")
        return self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], associated_data).decode()

    def derive(self, purpose: str, context: str = "", length: int = 32) -> bytes:
        """A sub-key for ``purpose`` (and ``context``, e.g. a job id): HKDF-SHA256 of the key. The same
        key gives the same sub-key in every OMA process, so nothing derived needs to be stored."""
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                    info=f"oma\0{purpose}\0{context}".encode()).derive(self._key)

    def keyed_hash(self, purpose: str, value: str, length: int = 20) -> str:
        """HMAC-SHA256 of ``value`` under the ``purpose`` sub-key, base64url without padding, cut to
        ``length`` characters (20 = 120 bits). Deterministic, so a stored hash can be looked up."""
        digest = hmac.new(self.derive(f"keyed-hash:{purpose}"), value.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")[:length]


def load_or_create_key_file(path: Path, n_bytes: int = 32) -> bytes:
    """Read a base64 key file, creating it (mode 0600) with random bytes on first use. Two processes
    starting at once on a new data dir end up with the same key: the file is created exclusively and the
    process that loses the race reads the winner's."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            write_private(path, base64.b64encode(secrets.token_bytes(n_bytes)).decode() + "\n", exclusive=True)
    return base64.b64decode(path.read_text().strip())


def write_key_file(path: Path, key: bytes) -> None:
    """Replace a key file atomically (a 0600 temporary file renamed over it)."""
    write_private(path, base64.b64encode(key).decode() + "\n")


def decode_key(value: str) -> bytes:
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the encryption key must be base64 of 32 bytes") from None
    if len(key) != 32:
        raise ValueError(f"the encryption key must be 32 bytes, got {len(key)}")
    return key
