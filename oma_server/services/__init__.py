"""Thin gRPC servicers: validate the request, call the domain, convert the result.

``IMPLEMENTED`` maps a service's full name to its servicer class; services of the contract that are
not listed are registered with their generated base class and answer UNIMPLEMENTED.
"""
from __future__ import annotations

from typing import Any

from oma_server.services.auth import AuthServicer

IMPLEMENTED: dict[str, Any] = {
    "oma.v1.AuthService": AuthServicer,
}


def start_components(runtime: Any) -> None:
    """Start background components (workers, followers) once the services are registered."""
