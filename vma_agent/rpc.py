"""Cross-cutting part of every agent RPC: bearer-token check (when configured), the size limits of every
request field (:mod:`vma_agent.request_limits`), agent errors mapped to gRPC status codes, and bugs
logged and answered INTERNAL without internals."""
from __future__ import annotations

import hmac
import logging
import time
from typing import Any, Callable, Iterable

import grpc

from vma_agent import errors, metrics, request_limits

log = logging.getLogger("vma_agent.rpc")


class AgentInterceptor(grpc.ServerInterceptor):
    def __init__(self, auth_token: str):
        self._token = auth_token

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        method = details.method
        if handler is None or method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return handler
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, method))
        return handler

    def _check_token(self, context: grpc.ServicerContext) -> None:
        if not self._token:
            return
        sent = dict(context.invocation_metadata()).get("authorization", "")
        scheme, _, token = sent.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), self._token):
            raise errors.Unauthenticated("this agent requires the OMA's bearer token")

    def _abort(self, context: grpc.ServicerContext, method: str, exc: BaseException) -> None:
        if context.code() is not None and not isinstance(exc, errors.AgentError):
            raise exc
        if isinstance(exc, errors.AgentError):
            code, message = getattr(grpc.StatusCode, exc.code), exc.message
        elif isinstance(exc, NotImplementedError):
            code, message = grpc.StatusCode.UNIMPLEMENTED, f"{method} is not built yet"
        else:
            log.exception("bug: unhandled exception in %s", method)
            code, message = grpc.StatusCode.INTERNAL, "internal error (logged on the agent)"
        metrics.record_rpc(method, code.name, None)
        context.abort(code, message)

    def _wrap_unary(self, behavior: Callable, method: str) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.monotonic()
            try:
                self._check_token(context)
                request_limits.check(request)
                response = behavior(request, context)
            except Exception as exc:  # noqa: BLE001
                self._abort(context, method, exc)
            metrics.record_rpc(method, "OK", time.monotonic() - started)
            return response

        return wrapped

    def _wrap_stream(self, behavior: Callable, method: str) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterable[Any]:
            try:
                self._check_token(context)
                request_limits.check(request)
                yield from behavior(request, context)
            except Exception as exc:  # noqa: BLE001
                self._abort(context, method, exc)
            metrics.record_rpc(method, "OK", None)

        return wrapped
