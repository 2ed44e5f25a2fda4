"""Errors of the agent's domain modules (which never import grpc); the RPC layer maps ``code`` to a
gRPC status. Messages name what failed (the vCenter host, the VM) and never contain a password."""
from __future__ import annotations


class AgentError(Exception):
    code = "UNKNOWN"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(AgentError):
    code = "INVALID_ARGUMENT"


class NotFound(AgentError):
    code = "NOT_FOUND"


class AlreadyExists(AgentError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(AgentError):
    code = "FAILED_PRECONDITION"


class Unavailable(AgentError):
    code = "UNAVAILABLE"


class DeadlineExceeded(AgentError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(AgentError):
    code = "UNAUTHENTICATED"


class PermissionDenied(AgentError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(AgentError):
    code = "RESOURCE_EXHAUSTED"
