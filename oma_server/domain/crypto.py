"""Secrets at rest: AES-256-GCM for vCenter passwords and CloudStack keys, and the key files.

Stored form: ``enc:v1:`` + base64(nonce(12) || ciphertext || tag(16)). The tag makes encrypted values
recognisable, so legacy rows of the original system (untagged base64 of the same layout, or
``TEMP_PLAINTEXT_<value>``) can still be read and re-encrypted, and plaintext never passes as
ciphertext.
"""
from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from oma_server.errors import FailedPrecondition, InvalidArgument

PREFIX = "enc:v1:"
LEGACY_PLAINTEXT_PREFIX = "TEMP_PLAINTEXT_"
_NONCE_BYTES = 12


class SecretBox:
    """Encrypts and decrypts short secrets with one AES-256-GCM key."""

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ValueError("the encryption key must be exactly 32 bytes (AES-256)")
        self._aead = AESGCM(key)

    def encrypt(self, plaintext: str) -> str:
        if not plaintext:
            raise InvalidArgument("an empty secret cannot be stored")
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), None)
        return PREFIX + base64.b64encode(nonce + sealed).decode()

    def decrypt(self, stored: str) -> str:
        if stored.startswith(LEGACY_PLAINTEXT_PREFIX):
            return stored[len(LEGACY_PLAINTEXT_PREFIX):]
        blob_b64 = stored[len(PREFIX):] if stored.startswith(PREFIX) else stored
        try:
            blob = base64.b64decode(blob_b64, validate=True)
        except (binascii.Error, ValueError):
            raise FailedPrecondition("a stored secret is not valid ciphertext; set it again") from None
        if len(blob) < _NONCE_BYTES + 16:
            raise FailedPrecondition("a stored secret is too short to be ciphertext; set it again")
        try:
            return self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], None).decode()
        except InvalidTag:
            raise FailedPrecondition(
                "a stored secret cannot be decrypted with the configured encryption key "
                "(was the key changed?); set the secret again"
            ) from None


def load_or_create_key_file(path: Path, n_bytes: int = 32) -> bytes:
    """Read a base64 key file, creating it (mode 0600) with random bytes on first use."""
    if path.exists():
        return base64.b64decode(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(n_bytes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(key).decode() + "\n")
    return key


def decode_key(value: str) -> bytes:
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the encryption key must be base64 of 32 bytes") from None
    if len(key) != 32:
        raise ValueError(f"the encryption key must be 32 bytes, got {len(key)}")
    return key
