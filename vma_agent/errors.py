"""The agent's domain errors: the server kit's (:mod:`server_kit.errors`); ``AgentError`` is the agent's
name for their base class. Messages name what failed (the vCenter host, the VM) and never contain a
password; ``vma_agent.rpc`` maps each to its status."""
from __future__ import annotations

from server_kit.errors import (
    AlreadyExists,
    DeadlineExceeded,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

AgentError = DomainError

__all__ = ["AgentError", "AlreadyExists", "DeadlineExceeded", "DomainError", "FailedPrecondition",
           "InvalidArgument", "NotFound", "PermissionDenied", "ResourceExhausted", "Unauthenticated", "Unavailable"]
