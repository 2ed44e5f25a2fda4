"""Saved vCenter credentials (vmware_credentials).

Passwords are encrypted with the server's SecretBox before they reach the database and are only
decrypted by :func:`login_for` (for a vCenter call); :func:`record_use` records ``last_used``/``usage_count``
once that call reached vCenter; admin reads have no side effects. At most one active credential is the default, switched in one
transaction.

A saved password is bound to the vCenter host and TLS pin it was saved with (docs/security/
credentials.md): changing ``vcenter_host``, ``tls_thumbprint`` or ``tls_insecure`` needs the password
again in the same request, so a caller who may edit a credential cannot redirect its stored password
to a host of their choosing; every use (:func:`login_for`) takes host and pin from the same row.
"""
from __future__ import annotations

from typing import Any

from peewee import IntegrityError, fn

from oma_server.db.database import database_proxy as db
from oma_server.db.models import VmReplicationContext, VmwareCredential, utcnow
from oma_server.db.prepared import PreparedSelect
from oma_server.domain import text_rules
from oma_server.domain.crypto import SecretBox, slot_of
from oma_server.domain.text_rules import quote
from oma_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, require
from oma_server.integrations.vcenter_login import VCenterLogin

_REQUIRED = ("credential_name", "vcenter_host", "username", "datacenter")
# What decides where the stored password is sent: changing any of them needs the password again.
_PASSWORD_TARGET = ("vcenter_host", "tls_thumbprint", "tls_insecure")


def _checked(name: str, value: str) -> str:
    """A required text field, stripped and checked against its column (and, for the host, parsed)."""
    value = text_rules.name(value, getattr(VmwareCredential, name))
    if name == "vcenter_host" and value:
        text_rules.host_port(value, "vcenter_host")
    return value


def _validate_thumbprint(value: str) -> str:
    value = text_rules.name(value, VmwareCredential.tls_thumbprint)
    if value:
        hex_part = value.replace(":", "")
        if len(hex_part) not in (40, 64) or any(c not in "0123456789abcdefABCDEF" for c in hex_part):
            raise InvalidArgument("tls_thumbprint must be a SHA-1 or SHA-256 fingerprint in hex (colons allowed)")
    return value


def _with_context_count():
    """Credentials with ``context_count`` (how many VM contexts use each) in one statement."""
    users = VmReplicationContext.alias()
    count = (users.select(fn.COUNT(users.context_id)).where(users.credential == VmwareCredential.id))
    return VmwareCredential.select(VmwareCredential, count.alias("context_count"))


_BY_ID = PreparedSelect(lambda cid: VmwareCredential.select().where(VmwareCredential.id == cid).limit(1), int)
_BY_ID_COUNTED = PreparedSelect(lambda cid: _with_context_count().where(VmwareCredential.id == cid).limit(1), int)
_ALL_COUNTED = PreparedSelect(lambda: _with_context_count().order_by(VmwareCredential.credential_name))
_ACTIVE_COUNTED = PreparedSelect(
    lambda: _with_context_count().where(VmwareCredential.is_active == True)  # noqa: E712 - peewee expression
    .order_by(VmwareCredential.credential_name))


def _seal(box: SecretBox, credential_id: int, password: str) -> str:
    return box.encrypt(password, slot_of(VmwareCredential.password_encrypted, credential_id))


def get(credential_id: int) -> VmwareCredential:
    require(credential_id > 0, "id is required")
    cred = _BY_ID.first(credential_id)
    if cred is None:
        raise NotFound(f"no VMware credential with id {credential_id}")
    return cred


def get_counted(credential_id: int) -> VmwareCredential:
    """:func:`get` with ``context_count`` set, in one statement (the read RPCs' form)."""
    require(credential_id > 0, "id is required")
    cred = _BY_ID_COUNTED.first(credential_id)
    if cred is None:
        raise NotFound(f"no VMware credential with id {credential_id}")
    return cred


def context_counts(ids: list[int]) -> dict[int, int]:
    if not ids:
        return {}
    rows = (
        VmReplicationContext.select(VmReplicationContext.credential, fn.COUNT(VmReplicationContext.context_id))
        .where(VmReplicationContext.credential.in_(ids))
        .group_by(VmReplicationContext.credential)
        .tuples()
    )
    return {cid: n for cid, n in rows}


def list_credentials(active_only: bool = False) -> list[VmwareCredential]:
    """By name, each with ``context_count``; one statement."""
    return (_ACTIVE_COUNTED if active_only else _ALL_COUNTED).rows()


def _clear_default_except(credential_id: int) -> None:
    VmwareCredential.update(is_default=False).where(
        VmwareCredential.is_default == True, VmwareCredential.id != credential_id  # noqa: E712
    ).execute()


def create(box: SecretBox, *, credential_name: str, vcenter_host: str, username: str, password: str,
           datacenter: str, is_active: bool = True, is_default: bool = False, tls_thumbprint: str = "",
           tls_insecure: bool = False, created_by: str) -> VmwareCredential:
    fields = {"credential_name": _checked("credential_name", credential_name),
              "vcenter_host": _checked("vcenter_host", vcenter_host),
              "username": _checked("username", username), "datacenter": _checked("datacenter", datacenter)}
    missing = [name for name in _REQUIRED if not fields[name]]
    if not password:
        missing.append("password")
    if missing:
        raise InvalidArgument(f"missing required fields: {', '.join(missing)}")
    if is_default and not is_active:
        raise InvalidArgument("an inactive credential cannot be the default")
    thumbprint = _validate_thumbprint(tls_thumbprint)
    if VmwareCredential.select().where(VmwareCredential.credential_name == fields["credential_name"]).exists():
        raise AlreadyExists(f"a credential named {quote(fields['credential_name'])} already exists")
    try:
        with db.atomic():
            # The ciphertext is bound to the row id, known only after the insert: the empty value never
            # leaves this transaction.
            cred = VmwareCredential.create(
                **fields, password_encrypted="", is_active=is_active, is_default=is_default,
                tls_thumbprint=thumbprint, tls_insecure=tls_insecure, created_by=created_by,
            )
            VmwareCredential.update(password_encrypted=_seal(box, cred.id, password)).where(
                VmwareCredential.id == cred.id).execute()
            if is_default:
                _clear_default_except(cred.id)
    except IntegrityError:
        raise AlreadyExists(f"a credential named {quote(fields['credential_name'])} already exists") from None
    return get(cred.id)


def update(box: SecretBox, credential_id: int, changes: dict[str, Any]) -> VmwareCredential:
    """Partial update: only the keys present in ``changes`` are applied."""
    with db.atomic():
        cred = get(credential_id)
        values: dict[str, Any] = {}
        for name in _REQUIRED:
            if name in changes:
                value = _checked(name, str(changes[name]))
                if not value:
                    raise InvalidArgument(f"{name} cannot be empty")
                values[name] = value
        if "password" in changes:
            if not changes["password"]:
                raise InvalidArgument("password cannot be empty")
            values["password_encrypted"] = _seal(box, credential_id, changes["password"])
        if "tls_thumbprint" in changes:
            values["tls_thumbprint"] = _validate_thumbprint(changes["tls_thumbprint"])
        if "tls_insecure" in changes:
            values["tls_insecure"] = bool(changes["tls_insecure"])
        stored = {"vcenter_host": cred.vcenter_host, "tls_thumbprint": cred.tls_thumbprint or "",
                  "tls_insecure": bool(cred.tls_insecure)}
        retargeted = [name for name in _PASSWORD_TARGET if name in values and values[name] != stored[name]]
        if retargeted and "password_encrypted" not in values:
            raise FailedPrecondition(
                f"changing {', '.join(retargeted)} needs the vCenter password again in the same request: "
                "a saved password is only ever sent to the host and certificate it was saved with"
            )
        is_active = changes.get("is_active", cred.is_active)
        is_default = changes.get("is_default", cred.is_default)
        if "is_active" in changes:
            values["is_active"] = is_active
        if is_default and not is_active:
            if changes.get("is_default"):
                raise InvalidArgument("an inactive credential cannot be the default")
            is_default = False  # deactivating the default also removes the default flag
        if is_default != cred.is_default or "is_default" in changes:
            values["is_default"] = is_default
        if "credential_name" in values and values["credential_name"] != cred.credential_name:
            if VmwareCredential.select().where(
                VmwareCredential.credential_name == values["credential_name"]
            ).exists():
                raise AlreadyExists(f"a credential named {quote(values['credential_name'])} already exists")
        if values:
            VmwareCredential.update(values).where(VmwareCredential.id == credential_id).execute()
        if is_default:
            _clear_default_except(credential_id)
    return get(credential_id)


def delete(credential_id: int) -> None:
    with db.atomic():
        cred = get(credential_id)
        users = context_counts([credential_id]).get(credential_id, 0)
        if users:
            raise FailedPrecondition(
                f"credential {quote(cred.credential_name)} is used by {users} VM context(s); "
                "link them to another credential first"
            )
        other_active = VmwareCredential.select().where(
            VmwareCredential.is_active == True, VmwareCredential.id != credential_id  # noqa: E712
        ).count()
        if cred.is_active and other_active == 0:
            raise FailedPrecondition(
                f"credential {quote(cred.credential_name)} is the last active credential; add another first"
            )
        VmwareCredential.delete().where(VmwareCredential.id == credential_id).execute()


def set_default(credential_id: int) -> VmwareCredential:
    with db.atomic():
        cred = get(credential_id)
        if not cred.is_active:
            raise FailedPrecondition(f"credential {quote(cred.credential_name)} is inactive; activate it first")
        _clear_default_except(credential_id)
        VmwareCredential.update(is_default=True).where(VmwareCredential.id == credential_id).execute()
    return get(credential_id)


_DEFAULT_COUNTED = PreparedSelect(
    lambda: _with_context_count().where(
        VmwareCredential.is_default == True, VmwareCredential.is_active == True  # noqa: E712
    ).limit(1))


def get_default() -> VmwareCredential:
    """The active default credential, with ``context_count``; one statement."""
    cred = _DEFAULT_COUNTED.first()
    if cred is None:
        raise NotFound("no default VMware credential is set")
    return cred


def login_for(box: SecretBox, credential_id: int) -> VCenterLogin:
    """Decrypt a saved credential for a vCenter call (no write: see :func:`record_use`)."""
    cred = get(credential_id)
    if not cred.is_active:
        raise FailedPrecondition(f"credential {quote(cred.credential_name)} is inactive")
    password = box.decrypt(cred.password_encrypted, slot_of(VmwareCredential.password_encrypted, cred.id))
    return VCenterLogin(cred.id, cred.vcenter_host, cred.username, password, cred.datacenter,
                        cred.tls_thumbprint or "", bool(cred.tls_insecure))


def record_use(credential_id: int | None) -> None:
    """Bump last_used/usage_count once a call with the credential reached vCenter."""
    if credential_id:
        VmwareCredential.update(
            last_used=utcnow(), usage_count=VmwareCredential.usage_count + 1
        ).where(VmwareCredential.id == credential_id).execute()
