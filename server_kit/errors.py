"""Domain errors: what went wrong, in words a person can act on.

Business modules of both servers raise these (they never import grpc); :mod:`server_kit.rpc` maps each
class to the gRPC status code named by its ``code``. Anything else escaping a handler is a bug and is
answered INTERNAL without internals. Messages name what failed and never contain a secret.
"""
from __future__ import annotations


class DomainError(Exception):
    """Base class; ``code`` is the name of the gRPC status code the RPC layer answers with."""

    code = "UNKNOWN"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    code = "INVALID_ARGUMENT"


class NotFound(DomainError):
    code = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    code = "FAILED_PRECONDITION"


class Unavailable(DomainError):
    code = "UNAVAILABLE"


class DeadlineExceeded(DomainError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(DomainError):
    code = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(DomainError):
    """Too much at once. With ``retry_after_seconds`` the caller is told when to try again (the RPC layer
    sends it as a ``google.rpc.RetryInfo`` detail as well as in the message)."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_seconds: float | None = None):
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class NotBuiltYet(DomainError):
    """An RPC of the contract whose behaviour is planned but not built yet."""

    code = "UNIMPLEMENTED"


def require(condition: object, message: str) -> None:
    """Raise InvalidArgument(message) unless condition holds (input validation one-liner)."""
    if not condition:
        raise InvalidArgument(message)
