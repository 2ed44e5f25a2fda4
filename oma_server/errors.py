"""Domain errors: what went wrong, in words an operator can act on.

Business modules raise these (they never import grpc); the RPC layer maps each class to one gRPC
status code. Anything else escaping a handler is a bug and is reported as INTERNAL.
"""
from __future__ import annotations


class DomainError(Exception):
    """Base class; ``code`` is the gRPC status code name the RPC layer uses."""

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
    """Too many attempts: ``retry_after_seconds`` tells the caller when to try again (the RPC layer sends it as
    a ``google.rpc.RetryInfo`` detail as well as in the message)."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_seconds: float):
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class NotBuiltYet(DomainError):
    """An RPC of the contract whose behaviour is planned but not built yet."""

    code = "UNIMPLEMENTED"


def require(condition: object, message: str) -> None:
    """Raise InvalidArgument(message) unless condition holds (input validation one-liner)."""
    if not condition:
        raise InvalidArgument(message)
