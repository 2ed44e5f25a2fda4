"""EnrollmentAdminService (operator, authenticated) and EnrollmentService (public, called by a new VMA).

Thin servicers over ``oma_server.domain.enrollment``, plus what only the RPC layer knows: the caller's
address for the audit trail (the gRPC peer — a forwarded-for header is not trusted, anyone can send one;
the original recorded its proxy's address instead of the VMA's: E-11), a per-address rate limit on the
public RPCs (documented but absent in the original: E-7), and the background sweep that moves overdue
enrollments to ``expired`` (the original never expired anything: E-11).
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from urllib.parse import unquote

import grpc
from oma.v1 import enrollment_admin_pb2 as admin_pb
from oma.v1 import enrollment_admin_pb2_grpc, enrollment_pb2_grpc
from oma.v1 import enrollment_pb2 as pb

from oma_server.config import Settings
from oma_server.convert import fill, optional, struct, timestamp
from oma_server.db.database import db
from oma_server.domain import enrollment
from oma_server.integrations import tunnel_sessions
from oma_server.rpc import caller_name

log = logging.getLogger("oma_server.enrollment")



def source_address(context: grpc.ServicerContext) -> str | None:
    """The client's IP address from the gRPC peer (``ipv4:1.2.3.4:5678``, ``ipv6:[::1]:5678``)."""
    kind, _, rest = unquote(context.peer() or "").partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].strip("[]")[:45] or None
    return kind[:45] or None


def _user_agent(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata():
        if key == "user-agent":
            return value[:255]
    return None


class RateLimiter:
    """A token bucket per source address: ``per_minute`` calls, refilled continuously (0 = no limit)."""

    _MAX_TRACKED = 10_000

    def __init__(self, per_minute: int):
        self._capacity = float(per_minute)
        self._rate = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, address: str) -> bool:
        if self._capacity <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(address, (self._capacity, now))
            tokens = min(self._capacity, tokens + (now - last) * self._rate)
            allowed = tokens >= 1
            self._buckets[address] = (tokens - 1 if allowed else tokens, now)
            if len(self._buckets) > self._MAX_TRACKED:  # forget addresses whose bucket has refilled
                refill = self._capacity / self._rate
                self._buckets = {a: b for a, b in self._buckets.items() if now - b[1] < refill}
            return allowed


class TunnelConfig:
    """The tunnel as approvals need it, built on first use (so a misconfigured host key file fails the
    enrollment calls that need it, with the reason, instead of the whole server)."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._tunnel: enrollment.Tunnel | None = None
        self._lock = threading.Lock()

    def get(self) -> enrollment.Tunnel:
        with self._lock:
            if self._tunnel is None:
                self._tunnel = self._build()
            return self._tunnel

    def _build(self) -> enrollment.Tunnel:
        return enrollment.tunnel_for(self._settings, end_sessions=tunnel_sessions.end_sessions)


def _enrollment(row) -> admin_pb.VMAEnrollment:
    return fill(admin_pb.VMAEnrollment(), row, status=enrollment.effective_status(row))


def _connection(row, ports: dict[str, int]) -> admin_pb.VMAConnection:
    return fill(admin_pb.VMAConnection(), row, reverse_tunnel_port=ports.get(row.enrollment_id))


def _audit_event(row) -> admin_pb.VMAAuditEvent:
    return fill(admin_pb.VMAAuditEvent(), row, event_details=struct(row.event_details or {}, keep_empty=True))


class EnrollmentAdminServicer(enrollment_admin_pb2_grpc.EnrollmentAdminServiceServicer):

    def __init__(self, runtime, tunnel: TunnelConfig):
        self._tunnel = tunnel
        self._tls_fingerprint = runtime.tls_fingerprint
        self._secrets = runtime.secrets

    @staticmethod
    def _caller(context) -> enrollment.Caller:
        return enrollment.Caller(caller_name("admin"), source_address(context), _user_agent(context))

    def GeneratePairingCode(self, request, context):
        valid_for = optional(request, "valid_for")
        row, code, valid_for = enrollment.generate_pairing_code(self._secrets, self._caller(context),
                                                                request.generated_by, valid_for)
        return admin_pb.GeneratePairingCodeResponse(pairing_code=code, expires_at=timestamp(row.expires_at),
                                                    valid_for=valid_for, pairing_code_id=row.id,
                                                    oma_certificate_sha256=self._tls_fingerprint)

    def ListPendingEnrollments(self, request, context):
        page = enrollment.list_pending(request.page_size, request.page_token)
        return admin_pb.ListPendingEnrollmentsResponse(enrollments=[_enrollment(e) for e in page.items],
                                                       count=page.total, next_page_token=page.next_page_token)

    def ApproveEnrollment(self, request, context):
        row, connection, port = enrollment.approve(self._tunnel.get(), self._caller(context), request.enrollment_id,
                                                   request.approved_by, request.notes)
        return admin_pb.ApproveEnrollmentResponse(
            enrollment=_enrollment(row), connection=_connection(connection, {row.id: port}),
            message=f"Approved: key installed for {connection.ssh_user}, reverse tunnel port {port}")

    def RejectEnrollment(self, request, context):
        row = enrollment.reject(self._caller(context), request.enrollment_id, request.rejected_by, request.reason)
        return admin_pb.RejectEnrollmentResponse(enrollment=_enrollment(row))

    def RevokeVMA(self, request, context):
        revoked = enrollment.revoke(self._tunnel.get(), self._caller(context), request.enrollment_id,
                                    request.revoked_by, request.reason)
        return admin_pb.RevokeVMAResponse(
            connection=_connection(revoked.connection, enrollment.reverse_ports_of([revoked.connection.enrollment_id])),
            sessions_ended=len(revoked.sessions_ended), message=revoked.message)

    def ListActiveVMAs(self, request, context):
        page = enrollment.list_connections(request.include_disconnected, request.include_revoked,
                                           request.page_size, request.page_token)
        ports = enrollment.reverse_ports_of([c.enrollment_id for c in page.items])
        return admin_pb.ListActiveVMAsResponse(connections=[_connection(c, ports) for c in page.items],
                                               count=page.total, next_page_token=page.next_page_token)

    def GetAuditLog(self, request, context):
        page = enrollment.audit_log(
            event_type=request.event_type, enrollment_id=request.enrollment_id,
            since=optional(request, "since"),
            until=optional(request, "until"),
            page_size=request.page_size, page_token=request.page_token)
        return admin_pb.GetAuditLogResponse(events=[_audit_event(e) for e in page.items], count=page.total,
                                            next_page_token=page.next_page_token)


class EnrollmentServicer(enrollment_pb2_grpc.EnrollmentServiceServicer):

    def __init__(self, runtime, tunnel: TunnelConfig):
        settings = runtime.settings
        self._tunnel = tunnel
        self._secrets = runtime.secrets
        self._limiter = RateLimiter(settings.enrollment_rate_limit_per_minute)
        self._windows = enrollment.Windows(verify=timedelta(seconds=settings.enrollment_verify_window_seconds),
                                           approval=timedelta(seconds=settings.enrollment_approval_window_seconds))

    def _source(self, context) -> enrollment.Caller:
        """The calling VMA's address, after the rate limit for that address."""
        address = source_address(context)
        if not self._limiter.allow(address or ""):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          "too many enrollment calls from this address; retry in a few seconds")
        return enrollment.Caller("", address, _user_agent(context))

    def Enroll(self, request, context):
        row = enrollment.enroll(
            self._secrets, self._source(context), self._windows, pairing_code=request.pairing_code,
            public_key=request.vma_public_key, vma_name=request.vma_name, vma_version=request.vma_version,
            client_fingerprint=request.vma_fingerprint)
        return pb.EnrollResponse(enrollment_id=row.id, challenge=row.challenge_nonce, status=str(row.status),
                                 message="Sign the decoded challenge with the enrolled key and call VerifyChallenge",
                                 expires_at=timestamp(row.expires_at), vma_fingerprint=row.vma_fingerprint)

    def VerifyChallenge(self, request, context):
        row, message = enrollment.verify(self._source(context), self._windows, request.enrollment_id,
                                         request.signature)
        return pb.VerifyChallengeResponse(enrollment_id=row.id, status=str(row.status), message=message,
                                          expires_at=timestamp(row.expires_at))

    def GetEnrollmentResult(self, request, context):
        self._source(context)
        result = enrollment.result(request.enrollment_id)
        response = pb.GetEnrollmentResultResponse(enrollment_id=result.enrollment.id, status=str(result.status),
                                                  message=result.message, access_revoked=result.access_revoked)
        if result.connection is not None and result.reverse_tunnel_port is not None:
            tunnel = self._tunnel.get()
            fill(response, ssh_user=result.connection.ssh_user, ssh_port=tunnel.ssh_port,
                 ssh_options=tunnel.keys.options(result.reverse_tunnel_port), host_key_hash=tunnel.host_key_hash,
                 reverse_tunnel_port=result.reverse_tunnel_port,
                 tunnel_last_seen_at=result.connection.last_seen_at)
        return response


class ExpirySweep:
    """Every ``interval`` seconds (and once at start), moves overdue enrollments to ``expired``."""

    def __init__(self, interval: float):
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="enrollment-expiry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                with db.connection_context():
                    enrollment.expire_overdue()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the sweep
                log.exception("enrollment expiry sweep failed; retrying in %.0f s", self._interval)
            if self._stop.wait(self._interval):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

