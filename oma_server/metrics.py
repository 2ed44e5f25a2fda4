"""Prometheus metrics of the OMA server, served on a configurable port: RPCs (count and latency by
method and status code), refused logins, replication jobs by status (read from the database at scrape time, so
every OMA sharing the database reports the same truth), bytes replicated and the copy rate."""
from __future__ import annotations

import logging

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily

import server_kit.metrics
from server_kit.metrics import RpcMetrics

log = logging.getLogger("oma_server.metrics")

RPCS = RpcMetrics("oma")  # oma_rpc_handled_total, oma_rpc_handling_seconds
REPLICATION_JOBS = Counter(
    "oma_replication_jobs_ended_total", "Replication jobs that reached a terminal status", ["status"]
)
REPLICATION_BYTES = Counter(
    "oma_replication_bytes_total", "Bytes the VMA reported written into replica volumes"
)
# One label value for every wrong credential (unknown user, wrong password, disabled user): the metrics endpoint
# is not authenticated, so it must not tell which user names exist.
LOGIN_FAILURES = Counter(
    "oma_auth_login_failures_total",
    "Refused password checks (Login, ChangePassword): invalid_credentials, or throttled (refused unchecked "
    "during a backoff)", ["reason"]
)
REPLICATION_RATE = Gauge(
    "oma_replication_throughput_bytes_per_second", "Latest reported copy rate of running jobs", ["job_id"]
)


class JobsByStatus:
    """``oma_replication_jobs{status}``: how many replication jobs are in each status right now."""

    def collect(self):
        from peewee import fn

        from oma_server.db.database import database_proxy as db
        from oma_server.db.models import JobStatus, ReplicationJob

        family = GaugeMetricFamily("oma_replication_jobs", "Replication jobs by current status", labels=["status"])
        try:
            with db.connection_context():
                counts = dict(ReplicationJob.select(ReplicationJob.status, fn.COUNT(ReplicationJob.id))
                              .group_by(ReplicationJob.status).tuples())
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the database is down
            log.warning("metrics: cannot count replication jobs: %s", exc)
            return
        for status in JobStatus:
            family.add_metric([status.value], counts.get(status.value, 0))
        yield family


record_rpc = RPCS.record


_collector_registered = False


def serve(listen: str) -> None:
    """Start the metrics HTTP endpoint ("host:port") in a daemon thread."""
    global _collector_registered
    if not _collector_registered:
        REGISTRY.register(JobsByStatus())
        _collector_registered = True
    server_kit.metrics.serve(listen)
