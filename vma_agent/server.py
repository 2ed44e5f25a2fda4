"""Builds and runs the VMA agent's gRPC server (health and reflection always on)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import grpc
import vma.v1
from grpc_health.v1 import health_pb2

from server_kit import serving
from vma_agent.config import ConfigError, Settings
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
        "vma.v1.ProgressService": ProgressServicer(runtime.progress, runs_job=jobs.runs),
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
    """Start the agent; raises ``config.ConfigError`` for settings it must not run with (e.g. a non-loopback
    listen address without auth_token) before anything listens, and for an address it cannot listen on."""
    settings.check()
    runtime = AgentRuntime(settings, ProgressStore(settings.progress_retention_seconds, settings.progress_max_jobs))
    server = serving.new_server(AgentInterceptor(settings.auth_token), settings.max_workers,
                                settings.max_concurrent_rpcs,
                                options=keepalive_options(settings))
    services = serving.register_contract(server, vma.v1, _implemented(runtime))
    health_servicer = serving.add_health_and_reflection(server, services)
    try:
        port = serving.bind(server, settings.listen)
    except ConfigError:
        RunningAgent(server, 0, runtime, services).stop(grace=None)
        raise
    server.start()
    for name in ["", *services]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if settings.metrics_listen:
        from vma_agent import metrics

        metrics.serve(settings.metrics_listen)
    log.info("vma-agent listening on port %d", port)
    return RunningAgent(server, port, runtime, services)
