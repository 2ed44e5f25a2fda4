"""The RPC metrics every server of the kit exposes, and its Prometheus endpoint.

``<prefix>_rpc_handled_total{method,code}`` counts every call the interceptor answered (OK or the
status code of the error); ``<prefix>_rpc_handling_seconds{method}`` times the successful ones, unary
calls and streams alike. Each server keeps its own prefix (``oma``, ``vma``) and adds its own metrics.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Histogram, start_http_server

from server_kit.settings import listen_host


class RpcMetrics:
    """The two RPC metrics of one server; :meth:`record` is the interceptor's ``record_rpc``."""

    def __init__(self, prefix: str):
        self.handled = Counter(f"{prefix}_rpc_handled_total", "RPCs completed, by method and gRPC status code",
                               ["method", "code"])
        self.latency = Histogram(f"{prefix}_rpc_handling_seconds", "Time to handle successful RPCs, by method",
                                 ["method"])
        # The labelled children, looked up once per (method, code): ``labels()`` takes a lock and builds its key
        # on every call, a measurable share of a fast read RPC (docs/design/reads.md#statements-compiled-once).
        self._handled: dict[tuple[str, str], Any] = {}
        self._latency: dict[str, Any] = {}

    def record(self, method: str, code: str, seconds: float | None) -> None:
        handled = self._handled.get((method, code))
        if handled is None:
            handled = self._handled[(method, code)] = self.handled.labels(method=method, code=code)
        handled.inc()
        if seconds is not None:
            latency = self._latency.get(method)
            if latency is None:
                latency = self._latency[method] = self.latency.labels(method=method)
            latency.observe(seconds)


def serve(listen: str) -> None:
    """Serve every registered metric over HTTP on ``listen`` ("host:port", "[v6]:port"; no host =
    127.0.0.1) from a daemon thread."""
    start_http_server(int(listen.rpartition(":")[2]), addr=listen_host(listen) or "127.0.0.1")
