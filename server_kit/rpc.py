"""The cross-cutting part of every RPC of both servers, in one server interceptor.

For each call of a service of the contract (health and reflection pass untouched): authenticate the
caller (the server's own ``authenticate``: the OMA's token authority and role table, the agent's shared
token), remember who it is for the handler (``identity``), check the request (``check_request``: the
server's field limits), run unary handlers inside the server's per-call ``call_scope`` (the OMA's
database connection; streams open their own per unit of work), map domain errors
(:mod:`server_kit.errors`) to their gRPC status with a bounded message, count every call
(``record_rpc``) and log one access line. An exception that is not a domain error is a bug: it is
logged with its traceback and answered INTERNAL without internals. RESOURCE_EXHAUSTED with a delay
carries a ``google.rpc.RetryInfo`` detail; an UNAVAILABLE answer carries gRPC's "do not retry"
pushback, because it reports a dependency that is down, not a transport failure a retry would fix.
"""
from __future__ import annotations

import contextlib
import contextvars
import hmac
import logging
import time
from typing import Any, Callable, ContextManager, Iterable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from server_kit import errors

# No status message is longer than this (gRPC refuses metadata over its limits, and a message that
# echoed a caller's megabyte would turn an answer into RESOURCE_EXHAUSTED).
STATUS_MESSAGE_MAX_CHARS = 1000
_UNINTERCEPTED = ("/grpc.health.", "/grpc.reflection.")

#: ``authenticate(context, method)``: the caller's identity (None: anonymous, allowed), or raise a DomainError.
Authenticate = Callable[[grpc.ServicerContext, str], Any]
#: ``record_rpc(method, status code name, seconds or None)``.
RecordRpc = Callable[[str, str, "float | None"], None]


def bounded_message(message: str) -> str:
    """The safety net under every domain error: at most STATUS_MESSAGE_MAX_CHARS characters."""
    if len(message) <= STATUS_MESSAGE_MAX_CHARS:
        return message
    suffix = f"… ({len(message)} characters)"
    return message[:STATUS_MESSAGE_MAX_CHARS - len(suffix)] + suffix


def bearer_token(context: grpc.ServicerContext) -> str | None:
    """The token of the call's ``authorization: Bearer <token>`` metadata; None without that metadata."""
    for key, value in context.invocation_metadata():
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise errors.Unauthenticated("authorization metadata must be 'Bearer <token>'")
            return token.strip()
    return None


def shared_token(expected: str, message: str) -> Authenticate:
    """An ``authenticate`` accepting exactly the bearer token ``expected`` (compared in constant time);
    an empty ``expected`` lets every caller in. ``message``: the UNAUTHENTICATED text."""
    def authenticate(context: grpc.ServicerContext, method: str) -> None:
        if not expected:
            return None
        try:
            sent = bearer_token(context)
        except errors.Unauthenticated:
            sent = None
        if sent is None or not hmac.compare_digest(sent.encode(), expected.encode()):
            raise errors.Unauthenticated(message)
        return None

    return authenticate


def status_code(error: errors.DomainError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN)


def _with_retry_info(code: grpc.StatusCode, message: str, retry_after_seconds: float) -> grpc.Status:
    """The status with a ``google.rpc.RetryInfo`` detail (grpc-status-details-bin), so clients see the delay."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(retry_after_seconds * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))


class CallInterceptor(grpc.ServerInterceptor):
    """One server's interceptor; what differs between the servers comes in as parameters (module docstring)."""

    def __init__(self, *, authenticate: Authenticate, check_request: Callable[[Any], None], record_rpc: RecordRpc,
                 call_scope: Callable[[], ContextManager[Any]] | None = None,
                 identity: contextvars.ContextVar[Any] | None = None,
                 server_name: str = "server", log: logging.Logger | None = None,
                 translate_error: Callable[[BaseException], errors.DomainError | None] | None = None):
        self._authenticate = authenticate
        self._translate_error = translate_error
        self._check_request = check_request
        self._record_rpc = record_rpc
        self._call_scope = call_scope or contextlib.nullcontext
        self._identity = identity
        self._server_name = server_name
        self._log = log or logging.getLogger("server_kit.rpc")

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        method = details.method
        if handler is None or method.startswith(_UNINTERCEPTED):
            return handler
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, method))
        return handler  # neither contract has client-streaming RPCs

    def _admit(self, request: Any, context: grpc.ServicerContext, method: str) -> contextvars.Token | None:
        """Authenticate and check the request; the token to reset the identity with (None without one)."""
        identity = self._authenticate(context, method)
        self._check_request(request)
        return self._identity.set(identity) if self._identity is not None else None

    def _release(self, token: contextvars.Token | None) -> None:
        if token is not None and self._identity is not None:
            self._identity.reset(token)

    def _abort(self, context: grpc.ServicerContext, method: str, exc: BaseException) -> None:
        if context.code() is not None and not isinstance(exc, (errors.DomainError, NotImplementedError)):
            raise exc  # the handler already chose a status (context.abort)
        if not isinstance(exc, errors.DomainError) and self._translate_error is not None:
            # the server's known non-domain failures (e.g. the OMA's database conflicts) with their status
            exc = self._translate_error(exc) or exc
        if isinstance(exc, errors.DomainError):
            code, message = status_code(exc), bounded_message(exc.message)
        elif isinstance(exc, NotImplementedError):
            service, _, rpc = method.rpartition("/")
            code, message = grpc.StatusCode.UNIMPLEMENTED, f"{service.lstrip('/')}.{rpc} is not built yet"
        else:
            self._log.exception("bug: unhandled exception in %s", method)
            code, message = grpc.StatusCode.INTERNAL, f"internal error (logged on the {self._server_name})"
        self._record_rpc(method, code.name, None)
        self._log.debug("%s %s", method, code.name)
        if isinstance(exc, errors.ResourceExhausted) and exc.retry_after_seconds is not None:
            context.abort_with_status(_with_retry_info(code, message, exc.retry_after_seconds))
        if code == grpc.StatusCode.UNAVAILABLE:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", "-1"),))
        context.abort(code, message)

    def _done(self, method: str, started: float) -> None:
        elapsed = time.monotonic() - started
        self._record_rpc(method, "OK", elapsed)
        self._log.debug("%s OK %.1f ms", method, elapsed * 1000)

    def _wrap_unary(self, behavior: Callable, method: str) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.monotonic()
            token = None
            try:
                token = self._admit(request, context, method)
                with self._call_scope():
                    response = behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - mapped to a status, bugs logged
                self._abort(context, method, exc)
            finally:
                self._release(token)
            self._done(method, started)
            return response

        return wrapped

    def _wrap_stream(self, behavior: Callable, method: str) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterable[Any]:
            started = time.monotonic()
            token = None
            try:
                token = self._admit(request, context, method)
                yield from behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - mapped to a status, bugs logged
                self._abort(context, method, exc)
            finally:
                self._release(token)
            self._done(method, started)

        return wrapped
