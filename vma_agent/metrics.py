"""Prometheus metrics of the agent: RPCs by method and code (the server kit's), jobs by status, bytes copied,
copy rate."""
from __future__ import annotations

from prometheus_client import Counter, Gauge

from server_kit.metrics import RpcMetrics, serve

__all__ = ["BYTES_COPIED", "BYTES_ZEROED", "COPY_RATE", "JOBS", "RPCS", "record_rpc", "serve"]

RPCS = RpcMetrics("vma")  # vma_rpc_handled_total, vma_rpc_handling_seconds
record_rpc = RPCS.record
BYTES_COPIED = Counter("vma_bytes_copied_total", "Bytes written to replica volumes (data)")
BYTES_ZEROED = Counter("vma_bytes_zeroed_total", "Bytes written to replica volumes as zeroes")
JOBS = Counter("vma_replication_jobs_total", "Replication jobs that ended, by status", ["status"])
COPY_RATE = Gauge("vma_copy_rate_bytes_per_second", "Current copy rate of running jobs", ["job_id"])
