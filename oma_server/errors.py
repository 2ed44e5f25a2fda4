"""The OMA's domain errors: the server kit's (:mod:`server_kit.errors`), under the names the OMA's modules
import. Business modules raise them (they never import grpc); ``oma_server.rpc`` maps each to its status."""
from __future__ import annotations

from server_kit.errors import (
    AlreadyExists,
    DeadlineExceeded,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotBuiltYet,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    require,
)

__all__ = ["AlreadyExists", "DeadlineExceeded", "DomainError", "FailedPrecondition", "InvalidArgument",
           "NotBuiltYet", "NotFound", "PermissionDenied", "ResourceExhausted", "Unauthenticated", "Unavailable",
           "require"]
