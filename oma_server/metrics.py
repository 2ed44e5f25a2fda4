"""Prometheus metrics of the OMA server (RPCs, jobs, bytes replicated), served on a configurable port."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_HANDLED = Counter(
    "oma_rpc_handled_total", "RPCs completed, by method and gRPC status code", ["method", "code"]
)
RPC_LATENCY = Histogram(
    "oma_rpc_handling_seconds", "Time to handle successful RPCs, by method", ["method"]
)
REPLICATION_JOBS = Counter(
    "oma_replication_jobs_total", "Replication jobs that reached a terminal status", ["status"]
)
REPLICATION_BYTES = Counter(
    "oma_replication_bytes_total", "Bytes the VMA reported copied into replica volumes"
)
REPLICATION_RATE = Gauge(
    "oma_replication_throughput_bytes_per_second", "Latest reported copy rate of running jobs", ["job_id"]
)
ACTIVE_REPLICATIONS = Gauge("oma_replication_jobs_active", "Replication jobs not yet terminal")


def record_rpc(method: str, code: str, seconds: float | None) -> None:
    RPC_HANDLED.labels(method=method, code=code).inc()
    if seconds is not None:
        RPC_LATENCY.labels(method=method).observe(seconds)


def serve(listen: str) -> None:
    """Start the metrics HTTP endpoint ("host:port") in a daemon thread."""
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1")
