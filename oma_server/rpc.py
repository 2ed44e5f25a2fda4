"""The cross-cutting part of every RPC, in one server interceptor.

For each call: authenticate the bearer token (except public methods) and check the caller's role against the
method → role table (``oma_server.domain.auth.ADMIN_ONLY_METHODS``), open one database connection
for unary calls (returned at the end of the call; streams open one per unit of work themselves),
map domain errors to gRPC status codes, and log one access line. An exception that is not a domain
error is a bug: it is logged with its traceback and answered INTERNAL without internals. RESOURCE_EXHAUSTED
carries a ``google.rpc.RetryInfo`` detail with the delay.
"""
from __future__ import annotations

import contextvars
import logging
import time
from typing import Any, Callable, Iterable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from oma_server import errors, metrics, request_rules
from oma_server.db.database import db
from oma_server.db.transactions import is_database_unavailable, is_write_conflict
from oma_server.domain.auth import Identity, TokenAuthority, check_role

log = logging.getLogger("oma_server.rpc")

# No status message is longer than this (gRPC refuses metadata over its limits, and a message that
# echoed a caller's megabyte would turn an answer into RESOURCE_EXHAUSTED).
STATUS_MESSAGE_MAX_CHARS = 1000

# The authenticated caller of the current RPC (None for public methods).
current_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "current_identity", default=None
)

# Methods callable without a token.
PUBLIC_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    "/oma.v1.AuthService/Login",
    "/oma.v1.DebugService/GetSystemHealth",
    "/oma.v1.EnrollmentService/",
)


def caller_name(default: str = "system") -> str:
    identity = current_identity.get()
    return identity.username if identity else default


def _status_code(error: errors.DomainError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN)


def _with_retry_info(code: grpc.StatusCode, message: str, retry_after_seconds: float) -> grpc.Status:
    """The status with a ``google.rpc.RetryInfo`` detail (grpc-status-details-bin), so clients see the delay."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(retry_after_seconds * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))


def _bearer_token(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata():
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise errors.Unauthenticated("authorization metadata must be 'Bearer <token>'")
            return token.strip()
    return None


def bounded_message(message: str) -> str:
    """The safety net under every domain error: at most STATUS_MESSAGE_MAX_CHARS characters."""
    if len(message) <= STATUS_MESSAGE_MAX_CHARS:
        return message
    suffix = f"… ({len(message)} characters)"
    return message[:STATUS_MESSAGE_MAX_CHARS - len(suffix)] + suffix


class RpcInterceptor(grpc.ServerInterceptor):
    def __init__(self, authority: TokenAuthority):
        self._authority = authority

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        method = details.method
        if handler is None or method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return handler
        public = method.startswith(PUBLIC_METHOD_PREFIXES)
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, method, public))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, method, public))
        return handler  # no client-streaming RPCs in the contract

    def _authenticate(self, context: grpc.ServicerContext, method: str, public: bool) -> Identity | None:
        token = _bearer_token(context)
        if token is None:
            if public:
                return None
            raise errors.Unauthenticated("missing bearer token: log in with AuthService.Login")
        try:
            identity = self._authority.verify(token)
        except errors.Unauthenticated:
            if public:
                return None
            raise
        if not public:
            check_role(identity, method)
        return identity

    def _abort(self, context: grpc.ServicerContext, method: str, exc: BaseException) -> None:
        if context.code() is not None and not isinstance(exc, (errors.DomainError, NotImplementedError)):
            raise exc  # the handler already chose a status (context.abort)
        if isinstance(exc, errors.DomainError):
            code, message = _status_code(exc), bounded_message(exc.message)
        elif is_write_conflict(exc):  # a transaction without run_transaction lost a race (Galera certification)
            code, message = grpc.StatusCode.UNAVAILABLE, ("a concurrent change from another OMA process conflicted "
                                                          "with this one; nothing was changed, try again")
        elif is_database_unavailable(exc):
            log.warning("%s: database unavailable: %s", method, exc)
            code, message = grpc.StatusCode.UNAVAILABLE, "the database is unavailable; try again shortly"
        elif isinstance(exc, NotImplementedError):
            service, _, rpc = method.rpartition("/")
            code, message = grpc.StatusCode.UNIMPLEMENTED, f"{service.lstrip('/')}.{rpc} is not built yet"
        else:
            log.exception("bug: unhandled exception in %s", method)
            code, message = grpc.StatusCode.INTERNAL, "internal error (logged on the server)"
        metrics.record_rpc(method, code.name, None)
        if isinstance(exc, errors.ResourceExhausted):
            context.abort_with_status(_with_retry_info(code, message, exc.retry_after_seconds))
        if code == grpc.StatusCode.UNAVAILABLE:
            # This UNAVAILABLE is an answer (a dependency is down), not a transport failure: tell
            # clients with a retry policy not to repeat the call (gRPC server pushback).
            context.set_trailing_metadata((("grpc-retry-pushback-ms", "-1"),))
        context.abort(code, message)

    def _wrap_unary(self, behavior: Callable, method: str, public: bool) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.monotonic()
            token = None
            try:
                token = current_identity.set(self._authenticate(context, method, public))
                request_rules.check_request(request)
                with db.connection_context():
                    response = behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - mapped to a status, bugs logged
                self._abort(context, method, exc)
            finally:
                if token is not None:
                    current_identity.reset(token)
            metrics.record_rpc(method, "OK", time.monotonic() - started)
            log.debug("%s OK %.1f ms", method, (time.monotonic() - started) * 1000)
            return response

        return wrapped

    def _wrap_stream(self, behavior: Callable, method: str, public: bool) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterable[Any]:
            started = time.monotonic()
            try:
                identity = self._authenticate(context, method, public)
                request_rules.check_request(request)
            except errors.DomainError as exc:
                self._abort(context, method, exc)
            token = current_identity.set(identity)
            try:
                yield from behavior(request, context)
            except Exception as exc:  # noqa: BLE001
                self._abort(context, method, exc)
            finally:
                current_identity.reset(token)
            metrics.record_rpc(method, "OK", time.monotonic() - started)

        return wrapped
