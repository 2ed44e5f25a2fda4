"""Builds and runs the VMA agent's gRPC server (health and reflection always on)."""
from __future__ import annotations

import importlib
import logging
import pkgutil
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import vma.v1
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vma_agent.config import Settings
from vma_agent.progress_store import ProgressStore
from vma_agent.rpc import AgentInterceptor

log = logging.getLogger("vma_agent")


@dataclass
class AgentRuntime:
    settings: Settings
    progress: ProgressStore
    components: dict[str, Any] = field(default_factory=dict)


def _implemented(runtime: AgentRuntime) -> dict[str, Any]:
    from vma_agent.integrations.vsphere import SessionCache
    from vma_agent.replication import ReplicationJobs
    from vma_agent.services.cbt import CBTServicer
    from vma_agent.services.discovery import DiscoveryServicer
    from vma_agent.services.enrollment import EnrollmentServicer
    from vma_agent.services.power import PowerServicer
    from vma_agent.services.progress import ProgressServicer
    from vma_agent.services.replication import ReplicationServicer

    # vCenter logins shared by the vSphere-facing services (logged out when the agent stops)
    sessions = runtime.components.setdefault("vsphere_sessions", SessionCache())
    jobs = runtime.components.setdefault(
        "replication_jobs", ReplicationJobs(runtime.settings, runtime.progress, sessions))
    return {
        "vma.v1.ProgressService": ProgressServicer(runtime.progress),
        "vma.v1.DiscoveryService": DiscoveryServicer(sessions, runtime.settings),
        "vma.v1.PowerService": PowerServicer(sessions, runtime.settings),
        "vma.v1.CBTService": CBTServicer(sessions, runtime.settings),
        "vma.v1.ReplicationService": ReplicationServicer(jobs, runtime.settings.vcenter_timeout_seconds),
        "vma.v1.EnrollmentService": EnrollmentServicer(runtime),
    }


@dataclass
class RunningAgent:
    server: grpc.Server
    port: int
    runtime: AgentRuntime
    services: list[str]

    def stop(self, grace: float | None = 2.0) -> None:
        for component in reversed(list(self.runtime.components.values())):
            stop = getattr(component, "stop", None)
            if stop:
                stop()
        self.server.stop(grace).wait()


def keepalive_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC channel arguments that keep long streams (WatchProgress over a multi-hour copy) alive."""
    return [
        ("grpc.keepalive_time_ms", int(settings.grpc_keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(settings.grpc_min_client_ping_seconds * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def build_server(settings: Settings) -> RunningAgent:
    runtime = AgentRuntime(settings, ProgressStore(settings.progress_retention_seconds))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc"),
        interceptors=[AgentInterceptor(settings.auth_token)],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        options=keepalive_options(settings),
    )
    implemented = _implemented(runtime)
    services = []
    for m in pkgutil.iter_modules(vma.v1.__path__):
        if not m.name.endswith("_pb2_grpc"):
            continue
        module = importlib.import_module(f"vma.v1.{m.name}")
        pb2 = importlib.import_module(f"vma.v1.{m.name[:-5]}")
        for service in pb2.DESCRIPTOR.services_by_name.values():
            servicer = implemented.get(service.full_name) or getattr(module, f"{service.name}Servicer")()
            getattr(module, f"add_{service.name}Servicer_to_server")(servicer, server)
            services.append(service.full_name)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise SystemExit(f"cannot listen on {settings.listen}")
    server.start()
    for name in ["", *services]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if settings.metrics_listen:
        from vma_agent import metrics

        metrics.serve(settings.metrics_listen)
    log.info("vma-agent listening on port %d", port)
    return RunningAgent(server, port, runtime, sorted(services))
