"""Operator authentication: the api_users table, password hashes and signed bearer tokens.

Tokens are HS256 JWTs (PyJWT) signed with a server secret, so they stay valid across restarts and
across several OMA servers sharing the secret, and expire after a configured lifetime. Passwords are
hashed with scrypt (stdlib) and a per-user salt.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import jwt

from oma_server.db import models
from oma_server.errors import InvalidArgument, Unauthenticated

ADMIN_USERNAME = "admin"
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_ISSUER = "oma-server"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return "scrypt${n}${r}${p}${salt}${digest}".format(
        salt=base64.b64encode(salt).decode(), digest=base64.b64encode(digest).decode(), **_SCRYPT
    )


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    digest = hashlib.scrypt(
        password.encode(), salt=base64.b64decode(salt_b64), dklen=32, n=int(n), r=int(r), p=int(p)
    )
    return hmac.compare_digest(digest, base64.b64decode(digest_b64))


def ensure_admin_user(configured_password: str) -> str | None:
    """Create the admin user on first start. Returns the generated password when one was made
    (the caller prints it once), else None. An existing admin is left as it is."""
    if models.ApiUser.select().where(models.ApiUser.username == ADMIN_USERNAME).exists():
        return None
    password = configured_password or secrets.token_urlsafe(18)
    models.ApiUser.create(username=ADMIN_USERNAME, password_hash=hash_password(password))
    return None if configured_password else password


@dataclass(frozen=True)
class IssuedToken:
    token: str
    username: str
    expires_at: datetime


@dataclass(frozen=True)
class Identity:
    username: str
    token_id: str


class TokenAuthority:
    """Issues and verifies bearer tokens."""

    def __init__(self, secret: bytes, ttl_seconds: int):
        self._secret = secret
        self._ttl = timedelta(seconds=ttl_seconds)

    def login(self, username: str, password: str) -> IssuedToken:
        if not username or not password:
            raise InvalidArgument("username and password are required")
        user = models.ApiUser.get_or_none(models.ApiUser.username == username)
        # Same answer for an unknown user and a wrong password (no user enumeration).
        if user is None or not user.is_active or not verify_password(password, user.password_hash):
            raise Unauthenticated("invalid username or password")
        return self.issue(username)  # no database write: the mapping says Login only issues tokens

    def issue(self, username: str) -> IssuedToken:
        now = datetime.now(timezone.utc)
        expires = now + self._ttl
        claims = {"sub": username, "iat": now, "exp": expires, "iss": _ISSUER, "jti": uuid.uuid4().hex}
        return IssuedToken(jwt.encode(claims, self._secret, algorithm="HS256"), username, expires)

    def verify(self, token: str) -> Identity:
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=["HS256"], issuer=_ISSUER,
                options={"require": ["exp", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired; log in again") from None
        except jwt.InvalidTokenError:
            raise Unauthenticated("the token is not valid") from None
        return Identity(username=claims["sub"], token_id=claims.get("jti", ""))
