"""The RPC metrics every server of the kit exposes, and its Prometheus endpoint.

``<prefix>_rpc_handled_total{method,code}`` counts every call the interceptor answered (OK or the
status code of the error); ``<prefix>_rpc_handling_seconds{method}`` times the successful ones, unary
calls and streams alike. Each server keeps its own prefix (``oma``, ``vma``) and adds its own metrics.
"""
from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

from server_kit.settings import listen_host


class RpcMetrics:
    """The two RPC metrics of one server; :meth:`record` is the interceptor's ``record_rpc``."""

    def __init__(self, prefix: str):
        self.handled = Counter(f"{prefix}_rpc_handled_total", "RPCs completed, by method and gRPC status code",
                               ["method", "code"])
        self.latency = Histogram(f"{prefix}_rpc_handling_seconds", "Time to handle successful RPCs, by method",
                                 ["method"])

    def record(self, method: str, code: str, seconds: float | None) -> None:
        self.handled.labels(method=method, code=code).inc()
        if seconds is not None:
            self.latency.labels(method=method).observe(seconds)


def serve(listen: str) -> None:
    """Serve every registered metric over HTTP on ``listen`` ("host:port", "[v6]:port"; no host =
    127.0.0.1) from a daemon thread."""
    start_http_server(int(listen.rpartition(":")[2]), addr=listen_host(listen) or "127.0.0.1")
