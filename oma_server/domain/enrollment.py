"""VMA enrollment: pairing codes, the enroll → verify → approve state machine, tunnel access and its audit
trail (docs/design/enrollment.md).

The shape follows from what the original got wrong (E-1…E-13):

* Pairing codes are stored only as keyed hashes (HMAC-SHA256 under a sub-key of the encryption key, see
  :func:`code_hash`): a copy of the database does not reveal an unused code. The code itself is returned
  once, to the operator who generated it.
* A pairing code is consumed by a conditional update (unused and unexpired) in the same transaction as the
  enrollment insert, so one code admits exactly one VMA however many try at once (E-13).
* The VMA proves it holds the private key: an Ed25519 signature of the raw bytes of a base64 challenge
  (E-1, E-3). Failed attempts are counted on the enrollment row; the fifth rejects the enrollment.
* Fingerprints are computed here from the key blob, never taken from the client (E-2); a key that already
  belongs to a live enrollment is refused.
* Each transition is allowed only from its source states and writes a ``vma_connection_audit`` row with the
  actor and source address (E-1, E-4). Challenge nonces and pairing codes never leave this module, except a
  new code returned once to the operator (E-11).
* Approval installs the key and records the connection in one step: if the key cannot be installed nothing
  is committed, and if the commit fails the key is taken out again (E-5, E-6). Revocation removes the key
  first and fails if it cannot.
* Each approved VMA gets its own OMA-side reverse-forward port (E-10). The schema has no column for it
  yet, so the port is recorded in the approval's audit details and read back from there.
* Verification and approval windows expire: an overdue enrollment reads as ``expired`` at once, and the
  sweep (:func:`expire_overdue`) writes the transition (E-11).
"""
from __future__ import annotations

import base64
import binascii
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, NoReturn

from peewee import IntegrityError

from oma_server.db.database import database_proxy as db
from oma_server.db.database import db_for_update
from oma_server.db.models import (
    ENROLLMENT_EXPIRABLE_STATUSES,
    AuditEventType,
    ConnectionStatus,
    EnrollmentStatus,
    VmaActiveConnection,
    VmaConnectionAudit,
    VmaEnrollment,
    VmaPairingCode,
    new_uuid,
    utcnow,
)
from oma_server.db.transactions import retry_on_write_conflict, run_transaction
from oma_server.domain.crypto import SecretBox
from oma_server.domain.paging import Page, paginate
from oma_server.domain.text_rules import quote
from oma_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
    require,
)
from oma_server.integrations import ssh_keys

log = logging.getLogger("oma_server.enrollment")

CODE_ALPHABET = "ABCDEFGHJKMNPQRSTVWXYZ23456789"  # no 0, 1, I, L, O, U
CODE_LENGTH = 12
VALID_FOR_DEFAULT, VALID_FOR_MIN, VALID_FOR_MAX = 600, 60, 86400
CHALLENGE_BYTES = 32
MAX_VERIFICATION_FAILURES = 5
AUDIT_PAGE_DEFAULT, AUDIT_PAGE_MAX = 50, 200
SYSTEM = "system"
_CODE_ATTEMPTS = 5
_CODE_REFUSED = "Pairing code not found, expired, or already used"
_MAX_PUBLIC_KEY_LENGTH = 1024

_STATUS_MESSAGES = {
    EnrollmentStatus.PENDING_VERIFICATION: "Waiting for the signed challenge",
    EnrollmentStatus.AWAITING_APPROVAL: "Waiting for the operator's approval",
    EnrollmentStatus.APPROVED: "Enrollment approved",
    EnrollmentStatus.REJECTED: "Enrollment rejected",
    EnrollmentStatus.EXPIRED: "Enrollment expired; ask the operator for a new pairing code",
}


@dataclass(frozen=True)
class Caller:
    """Who caused an event and from where: the audit row's actor, source address and user agent."""

    actor: str
    source_ip: str | None = None
    user_agent: str | None = None

    def as_actor(self, actor: str) -> Caller:
        return Caller(actor, self.source_ip, self.user_agent)


@dataclass(frozen=True)
class Tunnel:
    """What an approval grants (the tunnel account, its port, the OMA host key to pin, a reverse port
    from ``reverse_ports``), the key file it changes, and how a revocation ends a live session
    (``end_sessions(reverse_port)`` → the ended session pids and the problems met)."""

    keys: ssh_keys.AuthorizedKeys
    host_key_hash: str
    ssh_user: str
    ssh_port: int
    reverse_ports: range
    end_sessions: Callable[[int], Any] | None = None


_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def tunnel_for(settings: Any, *, end_sessions: Callable[[int], Any] | None = None) -> Tunnel:
    """The tunnel of the OMA's settings: host key, authorized_keys of the tunnel account, whose keys may
    reach exactly the OMA's NBD export ports and reverse-forward one port each from the reverse range."""
    try:
        host_key = ssh_keys.load_host_key(settings.tunnel_host_key, settings.data_dir)
    except ssh_keys.SshKeyError as exc:
        raise FailedPrecondition(f"the OMA's SSH host key is not usable: {exc}") from None
    nbd_host = "127.0.0.1" if settings.nbd_bind_host in _WILDCARD_HOSTS else settings.nbd_bind_host
    try:
        keys = ssh_keys.AuthorizedKeys(
            settings.tunnel_authorized_keys or settings.data_dir / "tunnel" / "authorized_keys",
            forced_command=settings.tunnel_forced_command,
            permit_open=[f"{nbd_host}:{port}" for port in range(settings.nbd_port_min, settings.nbd_port_max + 1)])
    except ValueError as exc:
        raise FailedPrecondition(f"OMA_TUNNEL_FORCED_COMMAND: {exc}") from None
    return Tunnel(keys=keys, host_key_hash=host_key.fingerprint, ssh_user=settings.tunnel_ssh_user,
                  ssh_port=settings.tunnel_ssh_port,
                  reverse_ports=range(settings.tunnel_reverse_port_min, settings.tunnel_reverse_port_max + 1),
                  end_sessions=end_sessions)


@dataclass(frozen=True)
class Revocation:
    """A revoked connection, the live tunnel sessions that were ended, and what to tell the operator."""

    connection: VmaActiveConnection
    sessions_ended: list[int]
    message: str


@dataclass(frozen=True)
class Windows:
    """How long a new enrollment may take to verify, and a verified one to be approved."""

    verify: timedelta
    approval: timedelta


@dataclass(frozen=True)
class Result:
    """What a VMA learns about its enrollment; the tunnel parameters only while access is granted."""

    enrollment: VmaEnrollment
    status: str
    message: str
    connection: VmaActiveConnection | None = None
    reverse_tunnel_port: int | None = None
    access_revoked: bool = False


def effective_status(enrollment: VmaEnrollment, now: datetime | None = None) -> str:
    """The status, with an overdue pending/awaiting enrollment reading ``expired`` before the sweep writes it."""
    if enrollment.status in ENROLLMENT_EXPIRABLE_STATUSES and enrollment.expires_at <= (now or utcnow()):
        return EnrollmentStatus.EXPIRED
    return EnrollmentStatus(enrollment.status)


def _text(value: str, name: str, max_length: int = 255) -> str:
    value = value.strip()
    require(len(value) <= max_length, f"{name} is longer than {max_length} characters")
    require(value.isprintable(), f"{name} must not contain control characters")
    return value


def _audit(event_type: AuditEventType, caller: Caller, enrollment: VmaEnrollment | None = None,
           **details: object) -> VmaConnectionAudit:
    return VmaConnectionAudit.create(
        enrollment=enrollment.id if enrollment is not None else None, event_type=event_type,
        vma_fingerprint=enrollment.vma_fingerprint if enrollment is not None else None,
        source_ip=caller.source_ip, user_agent=caller.user_agent, approved_by=caller.actor,
        event_details={k: v for k, v in details.items() if v is not None},
    )


def _get(enrollment_id: str, *, for_update: bool = False) -> VmaEnrollment:
    require(enrollment_id, "enrollment_id is required")
    query = VmaEnrollment.select().where(VmaEnrollment.id == enrollment_id)
    enrollment = (db_for_update(query) if for_update else query).first()
    if enrollment is None:
        raise NotFound(f"no enrollment with id {quote(enrollment_id)}")
    return enrollment


def _key(enrollment: VmaEnrollment) -> ssh_keys.Ed25519PublicKey:
    return ssh_keys.parse_public_key(enrollment.vma_public_key)[0]


def _require_status(enrollment: VmaEnrollment, allowed: tuple[EnrollmentStatus, ...], action: str) -> None:
    status = effective_status(enrollment)
    if status not in allowed:
        raise FailedPrecondition(
            f"enrollment {enrollment.id} is {status}; only {' or '.join(allowed)} enrollments can be {action}")


# --- pairing codes ------------------------------------------------------------------------------------------


def _new_code() -> str:
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
    return "-".join(raw[i:i + 4] for i in range(0, CODE_LENGTH, 4))


def normalise_code(text: str) -> str | None:
    """``XXXX-XXXX-XXXX`` from what a person typed (any case, with or without dashes/spaces), or None."""
    compact = "".join(text.split()).replace("-", "").upper()
    if len(compact) != CODE_LENGTH or any(c not in CODE_ALPHABET for c in compact):
        return None
    return "-".join(compact[i:i + 4] for i in range(0, CODE_LENGTH, 4))


PAIRING_CODE_HASH_PURPOSE = "pairing-code"


def code_hash(box: SecretBox, code: str) -> str:
    """What the database stores for a (normalised) pairing code: 20 characters of base64url HMAC-SHA256
    (120 bits; it fits the columns' 20 characters). Keyed, so nobody without the encryption key can
    test guesses against a copied database, and deterministic, so the code is found by its hash."""
    return box.keyed_hash(PAIRING_CODE_HASH_PURPOSE, code)


def _code_taken(hashed: str) -> bool:
    return (VmaPairingCode.select().where(VmaPairingCode.pairing_code == hashed).exists()
            or VmaEnrollment.select().where(VmaEnrollment.pairing_code == hashed).exists())


def generate_pairing_code(box: SecretBox, caller: Caller, generated_by: str,
                          valid_for: int | None) -> tuple[VmaPairingCode, str, int]:
    """A new one-time code valid for ``valid_for`` seconds (default 600, capped to 60–86400): the row
    (which holds only the code's hash), the code itself (to show once) and the validity."""
    generated_by = _text(generated_by, "generated_by") or caller.actor
    if valid_for is None:
        valid_for = VALID_FOR_DEFAULT
    require(valid_for > 0, "valid_for must be a positive number of seconds")
    valid_for = min(max(valid_for, VALID_FOR_MIN), VALID_FOR_MAX)
    for _ in range(_CODE_ATTEMPTS):
        code = _new_code()
        hashed = code_hash(box, code)
        if _code_taken(hashed):
            continue
        now = utcnow()
        expires_at = now + timedelta(seconds=valid_for)
        try:
            with db.atomic():
                row = VmaPairingCode.create(pairing_code=hashed, generated_by=generated_by, expires_at=expires_at,
                                            created_at=now)
                _audit(AuditEventType.ENROLLMENT, caller, action="pairing_code_generated", pairing_code_id=row.id,
                       generated_by=generated_by, expires_at=expires_at.isoformat() + "Z", valid_for=valid_for)
        except IntegrityError:  # drawn concurrently by another call
            continue
        log.info("pairing code %s generated by %s, valid for %d s", row.id, generated_by, valid_for)
        return row, code, valid_for
    raise Unavailable("could not draw an unused pairing code; try again")


# --- the VMA's side: enroll, verify, result -----------------------------------------------------------------


def _key_in_use(key: ssh_keys.Ed25519PublicKey, now: datetime) -> bool:
    """True when an enrollment with this exact key is pending, awaiting approval, or approved and not revoked."""
    for other in VmaEnrollment.select().where(VmaEnrollment.vma_fingerprint == key.fingerprint):
        if _key(other).blob != key.blob:
            continue
        status = effective_status(other, now)
        if status in ENROLLMENT_EXPIRABLE_STATUSES:
            return True
        if status == EnrollmentStatus.APPROVED and not VmaActiveConnection.select().where(
                VmaActiveConnection.enrollment == other.id,
                VmaActiveConnection.connection_status == ConnectionStatus.REVOKED).exists():
            return True
    return False


def _refused(source: Caller, vma_name: str) -> NoReturn:
    """Refuse an enrollment for its pairing code (logged with the address, never with the code)."""
    log.warning("enrollment of VMA %r from %s refused: pairing code not found, expired or used", vma_name,
                source.source_ip)
    raise Unauthenticated(_CODE_REFUSED)


def enroll(box: SecretBox, source: Caller, windows: Windows, *, pairing_code: str, public_key: str, vma_name: str,
           vma_version: str, client_fingerprint: str) -> VmaEnrollment:
    """Consume the pairing code and create a ``pending_verification`` enrollment with a fresh challenge."""
    require(pairing_code.strip(), "pairing_code is required")
    require(public_key.strip(), "vma_public_key is required")
    require(len(public_key) <= _MAX_PUBLIC_KEY_LENGTH, f"vma_public_key is longer than {_MAX_PUBLIC_KEY_LENGTH}")
    try:
        key, comment = ssh_keys.parse_public_key(public_key)
    except ssh_keys.SshKeyError as exc:
        raise InvalidArgument(f"vma_public_key: {exc}") from None
    comment = _text(comment, "the public key's comment")
    name, version = _text(vma_name, "vma_name"), _text(vma_version, "vma_version")
    if client_fingerprint and client_fingerprint != key.fingerprint:
        log.warning("VMA %r sent fingerprint %r but its key's is %s; the computed one is used",
                    name, client_fingerprint[:80], key.fingerprint)
    code = normalise_code(pairing_code)
    if code is None:
        _refused(source, name)
    hashed = code_hash(box, code)
    enrollment_id = new_uuid()
    name = name or f"vma-{enrollment_id[:8]}"
    caller = source.as_actor(f"vma:{name}")
    now = utcnow()
    try:
        with db.atomic():
            # Found by its keyed hash (an index lookup cannot leak anything useful: nobody can aim a
            # guess at a hash prefix without the key); the match is confirmed in constant time.
            row = VmaPairingCode.get_or_none(VmaPairingCode.pairing_code == hashed)
            if row is None or not hmac.compare_digest(row.pairing_code.encode(), hashed.encode()):
                _refused(source, name)
            consumed = VmaPairingCode.update(used_at=now).where(
                VmaPairingCode.id == row.id, VmaPairingCode.used_at.is_null(),
                VmaPairingCode.expires_at > now).execute()
            if consumed != 1:
                _refused(source, name)
            if _key_in_use(key, now):
                raise AlreadyExists("this public key already belongs to a live enrollment; generate a new key")
            enrollment = VmaEnrollment.create(
                id=enrollment_id, pairing_code=hashed, vma_public_key=key.openssh(comment), vma_name=name,
                vma_version=version or None, vma_fingerprint=key.fingerprint, vma_ip_address=caller.source_ip,
                challenge_nonce=base64.b64encode(secrets.token_bytes(CHALLENGE_BYTES)).decode(),
                status=EnrollmentStatus.PENDING_VERIFICATION, expires_at=now + windows.verify,
                created_at=now, updated_at=now)
            VmaPairingCode.update(used_by_enrollment=enrollment_id).where(VmaPairingCode.id == row.id).execute()
            _audit(AuditEventType.ENROLLMENT, caller, enrollment, action="enrolled", vma_name=name,
                   vma_version=version or None)
    except IntegrityError:  # the code's enrollment was written concurrently
        _refused(source, name)
    log.info("VMA %r enrolled from %s (enrollment %s, key %s)", name, caller.source_ip, enrollment_id,
             key.fingerprint)
    return enrollment


def _decode_signature(signature: str) -> bytes:
    try:
        return base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b""


def verify(source: Caller, windows: Windows, enrollment_id: str, signature: str) -> tuple[VmaEnrollment, str]:
    """Check the signature of the challenge: success → ``awaiting_approval`` (nonce cleared, approval
    window starts); failure → counted, the fifth → ``rejected``. Both outcomes are answers, not errors."""
    require(signature.strip(), "signature is required")

    def check() -> tuple[VmaEnrollment, str, str]:
        enrollment = _get(enrollment_id, for_update=True)
        _require_status(enrollment, (EnrollmentStatus.PENDING_VERIFICATION,), "verified")
        caller = source.as_actor(f"vma:{enrollment.vma_name}")
        challenge = base64.b64decode(enrollment.challenge_nonce)
        if _key(enrollment).verify(_decode_signature(signature), challenge):
            enrollment.status = EnrollmentStatus.AWAITING_APPROVAL
            enrollment.challenge_nonce = None
            enrollment.expires_at = utcnow() + windows.approval
            enrollment.save()
            _audit(AuditEventType.VERIFICATION, caller, enrollment, success=True)
            return enrollment, "Signature verified; waiting for the operator's approval", ""
        failures = enrollment.verification_attempts + 1
        enrollment.verification_attempts = failures
        enrollment.save()
        _audit(AuditEventType.VERIFICATION, caller, enrollment, success=False, failed_attempts=failures)
        if failures < MAX_VERIFICATION_FAILURES:
            return enrollment, f"Signature verification failed ({failures} of {MAX_VERIFICATION_FAILURES} attempts)", ""
        enrollment.status = EnrollmentStatus.REJECTED
        enrollment.challenge_nonce = None
        enrollment.save()
        reason = f"{MAX_VERIFICATION_FAILURES} failed signature verifications"
        _audit(AuditEventType.REJECTION, caller.as_actor(SYSTEM), enrollment, reason=reason)
        return enrollment, "", reason

    enrollment, answer, reason = run_transaction(check, what=f"verifying enrollment {enrollment_id}")
    if answer:
        return enrollment, answer
    log.warning("enrollment %s of VMA %r rejected after %s", enrollment.id, enrollment.vma_name, reason)
    return enrollment, f"Enrollment rejected after {reason}"


def result(enrollment_id: str) -> Result:
    enrollment = _get(enrollment_id)
    status = effective_status(enrollment)
    if status != EnrollmentStatus.APPROVED:
        return Result(enrollment, status, _STATUS_MESSAGES[status])
    connection = VmaActiveConnection.get_or_none(VmaActiveConnection.enrollment == enrollment.id)
    if connection is None or connection.connection_status == ConnectionStatus.REVOKED:
        return Result(enrollment, status, "Enrollment approved; tunnel access has been revoked",
                      access_revoked=True)
    return Result(enrollment, status, _STATUS_MESSAGES[status], connection,
                  reverse_ports_of([enrollment.id]).get(enrollment.id))


# --- the operator's side: approve, reject, revoke -----------------------------------------------------------


def reverse_ports_of(enrollment_ids: list[str]) -> dict[str, int]:
    """Reverse tunnel port of each enrollment whose tunnel access is live."""
    rows = VmaActiveConnection.select(VmaActiveConnection.enrollment, VmaActiveConnection.reverse_tunnel_port).where(
        VmaActiveConnection.enrollment.in_(enrollment_ids), VmaActiveConnection.reverse_tunnel_port.is_null(False))
    return {row.enrollment_id: row.reverse_tunnel_port for row in rows}


def _free_reverse_port(ports: range) -> int:
    used = {row.reverse_tunnel_port for row in VmaActiveConnection.select(VmaActiveConnection.reverse_tunnel_port)
            .where(VmaActiveConnection.reverse_tunnel_port.is_null(False))}
    for port in ports:
        if port not in used:
            return port
    raise FailedPrecondition(
        f"every reverse tunnel port ({ports.start}–{ports.stop - 1}) is taken; revoke unused VMAs or widen "
        "OMA_TUNNEL_REVERSE_PORT_MIN/MAX")


def approve(tunnel: Tunnel, caller: Caller, enrollment_id: str, approved_by: str,
            notes: str) -> tuple[VmaEnrollment, VmaActiveConnection, int]:
    """``awaiting_approval`` → ``approved``: key installed, connection row created, audit written — all or
    nothing."""
    approved_by = _text(approved_by, "approved_by") or caller.actor
    notes = _text(notes, "notes", 2000)

    def attempt() -> tuple[VmaEnrollment, VmaActiveConnection, int]:
        installed: ssh_keys.Ed25519PublicKey | None = None
        try:
            with tunnel.keys.locked(), db.atomic():
                enrollment = _get(enrollment_id, for_update=True)
                _require_status(enrollment, (EnrollmentStatus.AWAITING_APPROVAL,), "approved")
                port = _free_reverse_port(tunnel.reverse_ports)
                now = utcnow()
                enrollment.status = EnrollmentStatus.APPROVED
                enrollment.approved_by, enrollment.approved_at = approved_by, now
                enrollment.save()
                connection = VmaActiveConnection.create(
                    id=new_uuid(), enrollment=enrollment.id, vma_name=enrollment.vma_name,
                    vma_fingerprint=enrollment.vma_fingerprint, ssh_user=tunnel.ssh_user,
                    connection_status=ConnectionStatus.CONNECTED, reverse_tunnel_port=port, connected_at=now,
                    created_at=now, updated_at=now)
                _audit(AuditEventType.APPROVAL, caller, enrollment, approved_by=approved_by, notes=notes or None,
                       connection_id=connection.id, reverse_tunnel_port=port)
                key = _key(enrollment)
                tunnel.keys.add(key, port)  # last: if it fails, the transaction rolls back
                installed = key
        except Exception:
            if installed is not None:  # the commit failed after the key went in: take it out again
                _remove_quietly(tunnel, installed)
            raise
        return enrollment, connection, port

    # The enrollment row's status change is the claim (two approvals of one enrollment write the same row) and the
    # port's unique index reserves the port; on a Galera cluster a concurrent approval through another node fails
    # certification on either and is run again from the start (it then sees the approval or the taken port).
    try:
        enrollment, connection, port = retry_on_write_conflict(
            attempt, what=f"approving enrollment {enrollment_id}")
    except ssh_keys.SshKeyError as exc:
        raise FailedPrecondition(f"the VMA's key could not be installed for the tunnel, nothing was approved: "
                                 f"{exc}") from None
    except IntegrityError:  # another OMA process handed out the same port at the same moment (unique index)
        raise Unavailable("another approval took the same reverse tunnel port at the same moment; nothing was "
                          "approved, approve again") from None
    log.info("enrollment %s of VMA %r approved by %s (reverse port %d)", enrollment.id, enrollment.vma_name,
             approved_by, port)
    return enrollment, connection, port


def _remove_quietly(tunnel: Tunnel, key: ssh_keys.Ed25519PublicKey) -> None:
    try:
        tunnel.keys.remove(key)
    except ssh_keys.SshKeyError:
        log.exception("key %s stays in %s after a failed approval; remove it by hand", key.fingerprint,
                      tunnel.keys.path)


def reject(caller: Caller, enrollment_id: str, rejected_by: str, reason: str) -> VmaEnrollment:
    rejected_by = _text(rejected_by, "rejected_by") or caller.actor
    reason = _text(reason, "reason", 2000)

    def refuse() -> VmaEnrollment:
        enrollment = _get(enrollment_id, for_update=True)
        _require_status(enrollment, ENROLLMENT_EXPIRABLE_STATUSES, "rejected")
        enrollment.status = EnrollmentStatus.REJECTED
        enrollment.challenge_nonce = None
        enrollment.save()
        _audit(AuditEventType.REJECTION, caller, enrollment, rejected_by=rejected_by, reason=reason or None)
        return enrollment

    enrollment = run_transaction(refuse, what=f"rejecting enrollment {enrollment_id}")
    log.info("enrollment %s of VMA %r rejected by %s", enrollment.id, enrollment.vma_name, rejected_by)
    return enrollment


def revoke(tunnel: Tunnel, caller: Caller, enrollment_id: str, revoked_by: str, reason: str) -> Revocation:
    """Remove the VMA's key from the tunnel account (first; a failure changes nothing) and mark its
    connection ``revoked``; once that is committed, end its live tunnel session (sshd keeps the open
    sessions of a removed key) and add what was ended to the audit row."""
    revoked_by = _text(revoked_by, "revoked_by") or caller.actor
    reason = _text(reason, "reason", 2000)
    try:
        with tunnel.keys.locked(), db.atomic():
            enrollment = _get(enrollment_id)
            connection = db_for_update(VmaActiveConnection.select().where(
                VmaActiveConnection.enrollment == enrollment.id)).first()
            if connection is None:
                raise FailedPrecondition(f"enrollment {enrollment.id} is {effective_status(enrollment)}: it has no "
                                         "tunnel access to revoke")
            if connection.connection_status == ConnectionStatus.REVOKED:
                raise FailedPrecondition(f"the tunnel access of enrollment {enrollment.id} is already revoked")
            removed = tunnel.keys.remove(_key(enrollment))  # first: if it fails, nothing is revoked
            now = utcnow()
            connection.connection_status = ConnectionStatus.REVOKED
            connection.revoked_at, connection.revoked_by = now, revoked_by
            port = connection.reverse_tunnel_port
            connection.reverse_tunnel_port = None  # released for the next VMA; the audit row keeps it
            connection.save()
            audit = _audit(AuditEventType.REVOCATION, caller, enrollment, revoked_by=revoked_by,
                           reason=reason or None, connection_id=connection.id, keys_removed=removed,
                           reverse_tunnel_port=port)
    except ssh_keys.SshKeyError as exc:
        raise FailedPrecondition(f"the VMA's key could not be removed, nothing was revoked: {exc}") from None
    # Outside the transaction: ending a session may wait for the process to exit.
    ended = tunnel.end_sessions(port) if tunnel.end_sessions is not None and port is not None else None
    pids = ended.pids if ended else []
    if ended is not None:
        VmaConnectionAudit.update(event_details={**audit.event_details, "sessions_ended": pids,
                                                 **({"session_problems": ended.problems} if ended.problems else {})}
                                  ).where(VmaConnectionAudit.id == audit.id).execute()
    message = f"key removed from {tunnel.keys.path}; " + (
        f"{len(pids)} live tunnel session{'s' if len(pids) != 1 else ''} ended (pid {', '.join(map(str, pids))})"
        if pids else "no live tunnel session was open")
    if ended and ended.problems:
        message += "; " + "; ".join(ended.problems)
        log.warning("revoking VMA %r: %s", enrollment.vma_name, "; ".join(ended.problems))
    log.info("tunnel access of VMA %r (enrollment %s) revoked by %s: %s", enrollment.vma_name, enrollment.id,
             revoked_by, message)
    return Revocation(connection, pids, message)


# --- lists --------------------------------------------------------------------------------------------------


def list_pending(page_size: int, page_token: str) -> Page:
    query = (VmaEnrollment.select()
             .where(VmaEnrollment.status == EnrollmentStatus.AWAITING_APPROVAL, VmaEnrollment.expires_at > utcnow())
             .order_by(VmaEnrollment.created_at.desc(), VmaEnrollment.id.desc()))
    return paginate(query, page_size, page_token)


def list_connections(include_disconnected: bool, include_revoked: bool, page_size: int, page_token: str) -> Page:
    statuses = [ConnectionStatus.CONNECTED]
    if include_disconnected:
        statuses.append(ConnectionStatus.DISCONNECTED)
    if include_revoked:
        statuses.append(ConnectionStatus.REVOKED)
    query = (VmaActiveConnection.select().where(VmaActiveConnection.connection_status.in_(statuses))
             .order_by(VmaActiveConnection.connected_at.desc(), VmaActiveConnection.id.desc()))
    return paginate(query, page_size, page_token)


def audit_log(*, event_type: str, enrollment_id: str, since: datetime | None, until: datetime | None,
              page_size: int, page_token: str) -> Page:
    require(page_size >= 0, "page_size cannot be negative")
    query = VmaConnectionAudit.select()
    if event_type:
        allowed = [e.value for e in AuditEventType]
        require(event_type in allowed, f"event_type must be one of {', '.join(allowed)}")
        query = query.where(VmaConnectionAudit.event_type == event_type)
    if enrollment_id:
        query = query.where(VmaConnectionAudit.enrollment == enrollment_id)
    if since is not None:
        query = query.where(VmaConnectionAudit.created_at >= since)
    if until is not None:
        query = query.where(VmaConnectionAudit.created_at < until)
    query = query.order_by(VmaConnectionAudit.created_at.desc(), VmaConnectionAudit.id.desc())
    return paginate(query, min(page_size or AUDIT_PAGE_DEFAULT, AUDIT_PAGE_MAX), page_token)


# --- expiry -------------------------------------------------------------------------------------------------


def expire_overdue(now: datetime | None = None) -> int:
    """Move pending/awaiting enrollments past ``expires_at`` to ``expired`` (one audit row each); returns how
    many. Each move is conditional, so a concurrent verify/approve of the same row wins or loses cleanly."""
    now = now or utcnow()
    overdue = list(VmaEnrollment.select().where(VmaEnrollment.status.in_(ENROLLMENT_EXPIRABLE_STATUSES),
                                                VmaEnrollment.expires_at <= now))
    expired = 0
    for enrollment in overdue:
        with db.atomic():
            moved = VmaEnrollment.update(status=EnrollmentStatus.EXPIRED, challenge_nonce=None).where(
                VmaEnrollment.id == enrollment.id, VmaEnrollment.status == enrollment.status,
                VmaEnrollment.expires_at <= now).execute()
            if moved:
                _audit(AuditEventType.ENROLLMENT, Caller(SYSTEM), enrollment, action="expired",
                       previous_status=enrollment.status)
                expired += moved
    if expired:
        log.info("%d enrollment(s) expired", expired)
    return expired
