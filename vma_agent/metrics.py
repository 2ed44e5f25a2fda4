"""Prometheus metrics of the agent: RPCs by method and code, jobs by status, bytes copied, copy rate."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_HANDLED = Counter("vma_rpc_handled_total", "RPCs completed, by method and gRPC status code", ["method", "code"])
RPC_LATENCY = Histogram("vma_rpc_handling_seconds", "Time to handle successful unary RPCs", ["method"])
BYTES_COPIED = Counter("vma_bytes_copied_total", "Bytes written to replica volumes (data)")
BYTES_ZEROED = Counter("vma_bytes_zeroed_total", "Bytes written to replica volumes as zeroes")
JOBS = Counter("vma_replication_jobs_total", "Replication jobs that ended, by status", ["status"])
COPY_RATE = Gauge("vma_copy_rate_bytes_per_second", "Current copy rate of running jobs", ["job_id"])


def record_rpc(method: str, code: str, seconds: float | None) -> None:
    RPC_HANDLED.labels(method=method, code=code).inc()
    if seconds is not None:
        RPC_LATENCY.labels(method=method).observe(seconds)


def serve(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1")
