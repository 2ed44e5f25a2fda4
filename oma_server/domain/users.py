"""Users of the OMA API (``api_users``): create, list, disable, delete, change a password, end all of a user's
tokens. Every change that must end live tokens moves the user's ``tokens_valid_after`` to now and drops the token
authority's snapshot, so this process refuses the old tokens at once (other OMA processes within their cache time).

Invariant: at least one active ``admin`` remains. Disabling or deleting checks it under a lock on the active admin
rows (``FOR UPDATE`` on MariaDB; SQLite's ``BEGIN IMMEDIATE`` serialises writers), so two admins removing each
other at the same moment cannot both succeed.
"""
from __future__ import annotations

import logging
import re

from oma_server.db import models
from oma_server.db.database import db, db_for_update
from oma_server.db.fields import utcnow
from oma_server.db.models import ApiUser, UserRole
from oma_server.domain.auth import (
    MAX_PASSWORD_LENGTH,
    Identity,
    IssuedToken,
    TokenAuthority,
    hash_password,
)
from oma_server.domain.text_rules import quote
from oma_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger("oma_server.auth")

USERNAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def _role(value: str) -> UserRole:
    try:
        return UserRole(value)
    except ValueError:
        raise InvalidArgument(f"role must be one of {', '.join(r.value for r in UserRole)}, not {quote(value)}") from None


def check_new_password(password: str, min_length: int) -> None:
    if len(password) < min_length:
        raise InvalidArgument(f"the new password must have at least {min_length} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise InvalidArgument(f"the new password must have at most {MAX_PASSWORD_LENGTH} characters")


def _require_name(username: str) -> None:
    if not username:
        raise InvalidArgument("username is required")


def get_user(username: str) -> ApiUser:
    _require_name(username)
    user = ApiUser.get_or_none(ApiUser.username == username)
    if user is None:
        raise NotFound(f"no user named {quote(username)}")
    return user


def create_user(username: str, password: str, role: str, tokens: TokenAuthority, *, min_password_length: int,
                actor: str) -> ApiUser:
    if not USERNAME_PATTERN.fullmatch(username or ""):
        raise InvalidArgument("username must be 1-64 characters: letters, digits and . _ @ - (not first)")
    role_value = _role(role)
    check_new_password(password, min_password_length)
    password_hash = hash_password(password)  # slow: outside the transaction
    now = utcnow()
    with db.atomic():
        if ApiUser.select().where(ApiUser.username == username).exists():
            raise AlreadyExists(f"a user named {quote(username)} already exists")
        user = ApiUser.create(username=username, password_hash=password_hash, role=role_value, is_active=True,
                              created_at=now, tokens_valid_after=now)
    tokens.invalidate()
    log.info("user %r (%s) created by %r", username, role_value, actor)
    return user


def list_users() -> list[ApiUser]:
    return list(ApiUser.select().order_by(ApiUser.username))


def _locked_target(username: str) -> tuple[ApiUser, list[int]]:
    """The user row and the ids of the active admins, all locked for this transaction. The admins are locked first
    and in id order, then the target, so concurrent changes take their locks in one order (no deadlock on MariaDB)."""
    admin_ids = [a.id for a in db_for_update(ApiUser.select(ApiUser.id).where(
        ApiUser.role == UserRole.ADMIN, ApiUser.is_active == True).order_by(ApiUser.id))]  # noqa: E712 - SQL
    user = db_for_update(ApiUser.select().where(ApiUser.username == username)).first()
    if user is None:
        raise NotFound(f"no user named {quote(username)}")
    return user, admin_ids


def _keep_an_active_admin(user: ApiUser, active_admin_ids: list[int], action: str) -> None:
    """FailedPrecondition when ``user`` is the last active admin."""
    if user.id in active_admin_ids and len(active_admin_ids) == 1:
        raise FailedPrecondition(f"cannot {action} {quote(user.username)}: it is the last active admin; create or "
                                 "enable another admin first")


def set_disabled(username: str, disabled: bool, tokens: TokenAuthority, *, actor: str) -> ApiUser:
    _require_name(username)
    with db.atomic():
        user, admin_ids = _locked_target(username)
        if disabled:
            _keep_an_active_admin(user, admin_ids, "disable")
            ApiUser.update(is_active=False, tokens_valid_after=utcnow()).where(ApiUser.id == user.id).execute()
        else:
            # Tokens issued before the user was disabled stay refused (tokens_valid_after is not moved back).
            ApiUser.update(is_active=True).where(ApiUser.id == user.id).execute()
    tokens.invalidate()
    log.info("user %r %s by %r", username, "disabled (its tokens ended)" if disabled else "enabled", actor)
    return ApiUser.get_by_id(user.id)


def delete_user(username: str, tokens: TokenAuthority, *, actor: str) -> None:
    _require_name(username)
    with db.atomic():
        user, admin_ids = _locked_target(username)
        _keep_an_active_admin(user, admin_ids, "delete")
        user.delete_instance()  # its revoked-token rows go with it (ON DELETE CASCADE)
    tokens.invalidate()
    log.info("user %r deleted by %r", username, actor)


def revoke_tokens(username: str, tokens: TokenAuthority, *, actor: str) -> ApiUser:
    """End every token issued to ``username`` so far."""
    _require_name(username)
    updated = ApiUser.update(tokens_valid_after=utcnow()).where(ApiUser.username == username).execute()
    if not updated:
        raise NotFound(f"no user named {quote(username)}")
    tokens.invalidate()
    log.info("all tokens of user %r ended by %r", username, actor)
    return get_user(username)


def change_password(identity: Identity, current_password: str, new_password: str, tokens: TokenAuthority, *,
                    peer: str, min_password_length: int) -> IssuedToken:
    """Change the caller's own password (the current one is checked, under the login throttle), end all of its
    tokens, and return a fresh token so the caller stays logged in."""
    check_new_password(new_password, min_password_length)
    if new_password == current_password:
        raise InvalidArgument("the new password must differ from the current one")
    user = tokens.check_password(identity.username, current_password, peer)
    new_hash = hash_password(new_password)
    updated = (models.ApiUser.update(password_hash=new_hash, tokens_valid_after=utcnow())
               .where(models.ApiUser.id == user.id, models.ApiUser.password_hash == user.password_hash).execute())
    if not updated:
        raise FailedPrecondition("the password was changed meanwhile by another call; log in again")
    tokens.invalidate()
    log.info("user %r changed its password (all its earlier tokens ended)", identity.username)
    return tokens.issue(user.username, user.id)
