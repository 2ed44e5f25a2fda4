"""Operator authentication: password hashes, signed bearer tokens, their revocation, and who may call what.

Tokens are HS256 JWTs (PyJWT) signed with a server secret, so they stay valid across restarts and across several
OMA servers sharing the secret, and expire after a configured lifetime. Passwords are hashed with scrypt (stdlib)
and a per-user salt. The design (token lifecycle, roles, throttling, secret rotation) is in docs/security/auth.md.

A token carries its id (``jti``), its user's id (``uid``) and its issue time (``iat``, with microseconds). A
signed, unexpired token is still refused when its user no longer exists, is disabled, has been re-created under
the same name, was issued before the user's ``tokens_valid_after`` (ChangePassword, RevokeUserTokens, disabling),
or its ``jti`` is in ``api_revoked_tokens`` (Logout). These checks read a per-process snapshot of ``api_users``
and of the revoked ids, reloaded at most every ``cache_seconds`` (two small queries), so an authenticated call
costs no database round trip; changes made through this process drop the snapshot at once, those of other OMA
processes sharing the database are seen within ``cache_seconds``.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt
import peewee

from oma_server import metrics
from oma_server.db import models
from oma_server.db.database import db
from oma_server.db.fields import utcnow
from oma_server.db.models import UserRole
from oma_server.domain.login_throttle import LoginThrottle, ThrottlePolicy
from oma_server.domain.text_rules import quote
from oma_server.errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger("oma_server.auth")

ADMIN_USERNAME = "admin"
# scrypt's cost grows with the input; a password longer than this is refused before hashing.
MAX_PASSWORD_LENGTH = 1024
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_ISSUER = "oma-server"

# The one method → role table. Every method not listed here needs an authenticated user of any role
# (``operator`` or ``admin``); the public ones need none (``oma_server.rpc.PUBLIC_METHOD_PREFIXES``). Entries are
# full method names ("/pkg.Service/Method") or service prefixes ("/pkg.Service/").
ADMIN_ONLY_METHODS: tuple[str, ...] = (
    "/oma.v1.UserService/",
    "/oma.v1.EnrollmentAdminService/",
    "/oma.v1.AuthService/RevokeUserTokens",
)


def required_role(method: str) -> UserRole:
    return UserRole.ADMIN if method.startswith(ADMIN_ONLY_METHODS) else UserRole.OPERATOR


def check_role(identity: Identity, method: str) -> None:
    """PermissionDenied unless ``identity`` may call ``method``."""
    if required_role(method) == UserRole.ADMIN and identity.role != UserRole.ADMIN:
        service, _, rpc = method.rpartition("/")
        raise PermissionDenied(f"{service.lstrip('/')}.{rpc} needs the admin role; "
                               f"{quote(identity.username)} is an {identity.role}")


# --------------------------------------------------------------------------------------------------------------
# Passwords
# --------------------------------------------------------------------------------------------------------------


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


_dummy_hash: str | None = None
_dummy_lock = threading.Lock()


def _hash_for_unknown_user() -> str:
    """A real hash of a random password: checking against it costs what checking a real user's password costs,
    so the answer time does not tell whether a user exists."""
    global _dummy_hash
    with _dummy_lock:
        if _dummy_hash is None:
            _dummy_hash = hash_password(secrets.token_urlsafe(18))
        return _dummy_hash


def ensure_admin_user(configured_password: str) -> str | None:
    """Seed the ``admin`` user on the first start, when ``api_users`` is empty: with ``configured_password``
    (OMA_ADMIN_PASSWORD), else a generated one that is returned (the caller prints it once). Once any user exists
    this does nothing: passwords are changed with ChangePassword, and a deleted ``admin`` is not brought back."""
    if models.ApiUser.select().exists():
        if configured_password:
            log.info("OMA_ADMIN_PASSWORD is set but users exist: it only seeds the first start and is ignored "
                     "(change passwords with AuthService.ChangePassword / omactl passwd)")
        return None
    password = configured_password or secrets.token_urlsafe(18)
    now = utcnow()
    models.ApiUser.create(username=ADMIN_USERNAME, password_hash=hash_password(password), role=UserRole.ADMIN,
                          created_at=now, tokens_valid_after=now)
    return None if configured_password else password


# --------------------------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedToken:
    token: str
    username: str
    expires_at: datetime


@dataclass(frozen=True)
class Identity:
    username: str
    token_id: str
    role: UserRole = UserRole.OPERATOR
    user_id: int = 0
    expires_at: datetime | None = None


@dataclass(frozen=True)
class _UserState:
    id: int
    username: str
    role: UserRole
    active: bool
    valid_after: float  # epoch seconds; tokens with an earlier iat are refused


@dataclass(frozen=True)
class _Snapshot:
    by_id: dict[int, _UserState]
    by_name: dict[str, _UserState]
    revoked: frozenset[str]
    loaded_at: float  # monotonic, for the cache's age
    loaded_at_epoch: float  # wall clock when the reading started, to compare with a token's iat


def _epoch(value: datetime | None) -> float:
    if value is None:
        return 0.0
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


@contextlib.contextmanager
def _connection():
    """A database connection for the snapshot: the caller's if it holds one, else one for this read only
    (peewee's connection_context would close the caller's on exit)."""
    if db.is_closed():
        with db.connection_context():
            yield
    else:
        yield


#: Tokens whose verified claims are remembered (one per active session; cleared when full).
VERIFIED_TOKEN_CACHE_SIZE = 4096


class TokenAuthority:
    """Issues, verifies and revokes bearer tokens; checks passwords under the login throttle."""

    def __init__(self, secret: bytes, ttl_seconds: int, *, previous_secrets: tuple[bytes, ...] = (),
                 throttle: LoginThrottle | None = None, cache_seconds: float = 5.0):
        self._secret = secret
        # Verified but never used to sign: tokens of the secret being rotated out (docs/security/auth.md).
        self._verify_secrets = (secret, *previous_secrets)
        self._ttl = timedelta(seconds=ttl_seconds)
        self.throttle = throttle or LoginThrottle(ThrottlePolicy())
        self._cache_seconds = cache_seconds
        self._snapshot: _Snapshot | None = None
        self._snapshot_lock = threading.Lock()
        # Claims of tokens whose signature was already checked, by the exact token text
        # (docs/design/reads.md#token-check): a cached token is still refused once expired, and revocation is
        # checked on every call by verify(), so the cache only saves the signature and JSON work.
        self._verified: dict[str, dict] = {}
        self._verified_lock = threading.Lock()

    # --- passwords ------------------------------------------------------------------------------------------
    def check_password(self, username: str, password: str, peer: str) -> models.ApiUser:
        """The active user whose password this is, under the throttle; Unauthenticated (the same answer, after
        the same work, for an unknown user, a disabled one and a wrong password) or ResourceExhausted."""
        if not username or not password:
            raise InvalidArgument("username and password are required")
        if len(username) > 255 or len(password) > MAX_PASSWORD_LENGTH:
            raise InvalidArgument(f"username (at most 255 characters) or password (at most {MAX_PASSWORD_LENGTH}) "
                                  "is too long")
        try:
            attempt = self.throttle.begin(username, peer)
        except ResourceExhausted:
            metrics.LOGIN_FAILURES.labels(reason="throttled").inc()
            log.warning("password check for %r from %s refused: throttled after repeated failures",
                        username[:64], peer or "?")
            raise
        user = models.ApiUser.get_or_none(models.ApiUser.username == username)
        matches = verify_password(password, user.password_hash if user else _hash_for_unknown_user())
        if user is None or not user.is_active or not matches:
            metrics.LOGIN_FAILURES.labels(reason="invalid_credentials").inc()
            why = "unknown user" if user is None else "disabled user" if not user.is_active else "wrong password"
            log.warning("failed password check for %r from %s (%s; %d unsuccessful attempts for this name)",
                        username[:64], peer or "?", why, self.throttle.failures(username))
            raise Unauthenticated("invalid username or password")
        self.throttle.succeeded(attempt)
        return user

    def login(self, username: str, password: str, peer: str = "") -> IssuedToken:
        user = self.check_password(username, password, peer)
        return self.issue(user.username, user.id)  # no database write: the mapping says Login only issues tokens

    # --- tokens ---------------------------------------------------------------------------------------------
    def issue(self, username: str, user_id: int | None = None) -> IssuedToken:
        now = datetime.now(UTC)
        expires = now + self._ttl
        # iat with microseconds: a token issued right after a revocation must not look older than it.
        claims = {"sub": username, "iat": now.timestamp(), "exp": expires, "iss": _ISSUER, "jti": uuid.uuid4().hex}
        if user_id is not None:
            claims["uid"] = user_id
        return IssuedToken(jwt.encode(claims, self._secret, algorithm="HS256"), username, expires)

    def _decode(self, token: str) -> dict:
        with self._verified_lock:
            claims = self._verified.get(token)
        if claims is not None:
            if float(claims["exp"]) > time.time():
                return claims
            with self._verified_lock:
                self._verified.pop(token, None)
            raise Unauthenticated("the token has expired; log in again")
        claims = self._decode_uncached(token)
        with self._verified_lock:
            if len(self._verified) >= VERIFIED_TOKEN_CACHE_SIZE:
                self._verified.clear()  # bounded; the next calls verify again
            self._verified[token] = claims
        return claims

    def _decode_uncached(self, token: str) -> dict:
        expired = False
        for secret in self._verify_secrets:
            try:
                return jwt.decode(token, secret, algorithms=["HS256"], issuer=_ISSUER,
                                  options={"require": ["exp", "sub", "iss", "iat"]})
            except jwt.ExpiredSignatureError:
                expired = True  # the signature was good: no other secret will make it younger
                break
            except jwt.InvalidTokenError:
                continue
        if expired:
            raise Unauthenticated("the token has expired; log in again")
        raise Unauthenticated("the token is not valid")

    def verify(self, token: str) -> Identity:
        claims = self._decode(token)
        snapshot = self._current_snapshot()
        user = self._user_of(snapshot, claims)
        if user is None and float(claims["iat"]) >= snapshot.loaded_at_epoch:
            # A user created after the snapshot (e.g. by another OMA process): look once more, now.
            snapshot = self._current_snapshot(force=True)
            user = self._user_of(snapshot, claims)
        jti = str(claims.get("jti", ""))
        if user is None or user.username != claims["sub"] or not user.active:
            raise Unauthenticated("the token's user no longer exists or is disabled")
        if float(claims["iat"]) < user.valid_after or (jti and jti in snapshot.revoked):
            raise Unauthenticated("the token has been revoked; log in again")
        expires = datetime.fromtimestamp(float(claims["exp"]), UTC)
        return Identity(username=user.username, token_id=jti, role=user.role, user_id=user.id, expires_at=expires)

    @staticmethod
    def _user_of(snapshot: _Snapshot, claims: dict) -> _UserState | None:
        uid = claims.get("uid")
        return snapshot.by_id.get(uid) if isinstance(uid, int) else snapshot.by_name.get(claims["sub"])

    # --- revocation -----------------------------------------------------------------------------------------
    def logout(self, identity: Identity) -> None:
        """End the token of ``identity`` (caller holds a connection)."""
        if not identity.token_id:
            raise InvalidArgument("this token has no id and cannot be ended alone; use RevokeUserTokens")
        now = utcnow()
        expires = (identity.expires_at or datetime.now(UTC) + self._ttl).astimezone(UTC).replace(tzinfo=None)
        with db.atomic():
            models.ApiRevokedToken.delete().where(models.ApiRevokedToken.expires_at < now).execute()
            models.ApiRevokedToken.insert(jti=identity.token_id, user=identity.user_id, expires_at=expires,
                                          revoked_at=now).on_conflict_ignore().execute()
        self.invalidate()
        log.info("user %r logged out (token %s… ended)", identity.username, identity.token_id[:8])

    def invalidate(self) -> None:
        """Forget the snapshot: the next verification reloads users and revocations."""
        with self._snapshot_lock:
            self._snapshot = None

    def _current_snapshot(self, *, force: bool = False) -> _Snapshot:
        with self._snapshot_lock:
            snapshot = self._snapshot
            if not force and snapshot is not None and time.monotonic() - snapshot.loaded_at < self._cache_seconds:
                return snapshot
            loaded_at_epoch = time.time()
            try:
                users, revoked = self._read_users_and_revocations()
            except (peewee.OperationalError, peewee.InterfaceError) as exc:
                # Fail closed, with an answer a client can retry: no token is accepted unchecked.
                log.warning("cannot check tokens: the database is unreachable: %s", exc)
                raise Unavailable("cannot check the token: the database is unreachable; try again") from None
            snapshot = _Snapshot({u.id: u for u in users}, {u.username: u for u in users}, revoked,
                                 time.monotonic(), loaded_at_epoch)
            self._snapshot = snapshot
            return snapshot

    @staticmethod
    def _read_users_and_revocations() -> tuple[list[_UserState], frozenset[str]]:
        with _connection():
            rows = list(models.ApiUser.select(
                models.ApiUser.id, models.ApiUser.username, models.ApiUser.role, models.ApiUser.is_active,
                models.ApiUser.tokens_valid_after))
            revoked = frozenset(jti for (jti,) in models.ApiRevokedToken.select(models.ApiRevokedToken.jti)
                                .where(models.ApiRevokedToken.expires_at >= utcnow()).tuples())
        users = [_UserState(r.id, r.username, UserRole(r.role), bool(r.is_active), _epoch(r.tokens_valid_after))
                 for r in rows]
        return users, revoked
