"""Prometheus metrics of the agent (bytes copied, copy rate, jobs by status)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, start_http_server

BYTES_COPIED = Counter("vma_bytes_copied_total", "Bytes written to replica volumes (data)")
BYTES_ZEROED = Counter("vma_bytes_zeroed_total", "Bytes written to replica volumes as zeroes")
JOBS = Counter("vma_replication_jobs_total", "Replication jobs that ended, by status", ["status"])
COPY_RATE = Gauge("vma_copy_rate_bytes_per_second", "Current copy rate of running jobs", ["job_id"])


def serve(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1")
