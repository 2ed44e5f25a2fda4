"""Thin gRPC servicers: validate the request, call the domain, convert the result.

Every module here that defines a servicer class with a ``service_name`` (the service's full name)
registers it: ``IMPLEMENTED`` maps the name to the class. Services of the contract with no servicer
are registered with their generated base class and answer UNIMPLEMENTED ("… is not built yet").
A module may also define ``start_component(runtime)`` for a background component of its own.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any


def _service_modules() -> list[Any]:
    return [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)
            if m.name != "messages"]


def _implemented() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for module in _service_modules():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            name = getattr(cls, "service_name", None)
            if name and cls.__module__ == module.__name__:
                found[name] = cls
    return found


IMPLEMENTED: dict[str, Any] = _implemented()


def start_components(runtime: Any) -> None:
    """Start the background components once the services are registered: the job log sink, the VMA
    client, the NBD exports and the replication engine, then those of other service modules."""
    from oma_server.domain import nbd_access
    from oma_server.domain.joblog import LogEventSink
    from oma_server.domain.replication_workflow import ReplicationEngine
    from oma_server.integrations.nbd_exports import ExportManager
    from oma_server.integrations.vma_client import VmaClient

    sink = LogEventSink()
    sink.start()
    runtime.components["log_events"] = sink
    settings = runtime.settings
    runtime.components["vma"] = VmaClient(settings.vma_address, settings.vma_token,
                                          timeout=settings.vma_timeout_seconds, retries=settings.vma_retries)
    tls = {"psk_dir": settings.data_dir / "nbd-tls",
           "psk_for": lambda job_id: nbd_access.export_psk(runtime.secrets, job_id)} if settings.nbd_tls else {}
    runtime.components["exports"] = ExportManager(
        bind_host=settings.nbd_bind_host, public_host=settings.nbd_public_host,
        port_min=settings.nbd_port_min, port_max=settings.nbd_port_max, **tls)
    # The enrollment servicers registered the tunnel (built on first use) before components start.
    tunnel = runtime.components.get("enrollment_tunnel")
    if tunnel is not None:
        permits = nbd_access.ExportPermits(tunnel.get, settings.vma_address, settings.tunnel_reverse_host)
        runtime.components["nbd_permits"] = permits
        nbd_access.install(permits)
    engine = ReplicationEngine(runtime)
    runtime.components["replication"] = engine
    engine.recover()
    for module in _service_modules():
        hook = getattr(module, "start_component", None)
        if hook is not None:
            hook(runtime)
