"""The OMA's parts of the server kit's interceptor (:mod:`server_kit.rpc`).

What the OMA adds: who may call what — the bearer token checked by the token authority (login
throttling lives there too) and the caller's role against the method → role table
(``oma_server.domain.auth.ADMIN_ONLY_METHODS``), with a few public methods; the request rules of every
string field (``oma_server.request_rules``); one database connection per unary call; its metrics.
The mapping of errors to statuses, RetryInfo, pushback and the access log are the kit's.
"""
from __future__ import annotations

import contextvars
import logging

import grpc

from oma_server import errors, metrics, request_rules
from oma_server.db.database import db
from oma_server.db.transactions import is_database_unavailable, is_write_conflict
from oma_server.domain.auth import Identity, TokenAuthority, check_role
from server_kit.rpc import STATUS_MESSAGE_MAX_CHARS, CallInterceptor, bearer_token, bounded_message

__all__ = ["PUBLIC_METHOD_PREFIXES", "STATUS_MESSAGE_MAX_CHARS", "RpcInterceptor", "bounded_message",
           "caller_name", "current_identity"]

log = logging.getLogger("oma_server.rpc")

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


def token_and_role_check(authority: TokenAuthority):
    """The kit's ``authenticate`` for the OMA: a valid token (any role) on public methods, else none needed;
    on every other method a valid token whose role may call it."""
    def authenticate(context: grpc.ServicerContext, method: str) -> Identity | None:
        public = method.startswith(PUBLIC_METHOD_PREFIXES)
        token = bearer_token(context)
        if token is None:
            if public:
                return None
            raise errors.Unauthenticated("missing bearer token: log in with AuthService.Login")
        try:
            identity = authority.verify(token)
        except errors.Unauthenticated:
            if public:
                return None
            raise
        if not public:
            check_role(identity, method)
        return identity

    return authenticate


def database_error_status(exc: BaseException) -> errors.DomainError | None:
    """The answer for a database failure that reached the interceptor: a transaction that lost a race
    without run_transaction (Galera certification) or a lost/refused connection is UNAVAILABLE with
    "try again", not a bug (docs/design/galera.md)."""
    if is_write_conflict(exc):
        return errors.Unavailable("a concurrent change from another OMA process conflicted with this one; "
                                  "nothing was changed, try again")
    if is_database_unavailable(exc):
        log.warning("database unavailable: %s", exc)
        return errors.Unavailable("the database is unavailable; try again shortly")
    return None


def RpcInterceptor(authority: TokenAuthority) -> CallInterceptor:  # noqa: N802 - the name callers construct
    """The OMA's interceptor: the kit's, with the OMA's authentication, request rules, database scope and metrics."""
    return CallInterceptor(authenticate=token_and_role_check(authority), check_request=request_rules.check_request,
                           record_rpc=metrics.record_rpc, call_scope=db.connection_context,
                           identity=current_identity, server_name="server", log=log,
                           translate_error=database_error_status)
