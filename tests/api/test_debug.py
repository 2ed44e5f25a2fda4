"""DebugService (mapping: debug endpoints read from various tables and views; no writes): measured
health (operators get everything, anonymous callers only liveness), failover job counts and stuck
work, the registered RPCs with their routes, and recent log_events with filters and paging. Every
call is made between two snapshots of the database."""
from __future__ import annotations

import importlib
import pkgutil
import re
from datetime import timedelta
from pathlib import Path

import grpc
import oma.v1
from google.protobuf import json_format
from oma.v1 import debug_pb2 as pb

from oma_server.db import models
from oma_server.domain import cloudstack_config, joblog
from omaclient.client import OmaClient
from tests import factories
from tests.factories import read_without_writes, refused_without_writes
from tests.fixtures.servers import ADMIN_PASSWORD

ROOT = Path(__file__).resolve().parents[2]




def _health(client):
    response = read_without_writes(lambda: client.debug.GetSystemHealth(pb.GetSystemHealthRequest(), timeout=30))
    return response, {c.name: c for c in response.components}


def test_system_health_is_measured_for_operators_and_minimal_for_anonymous(oma, oma_server, anonymous):
    schedule = models.ReplicationSchedule.create(name="nightly", cron_expression="0 2 * * *")
    models.ReplicationSchedule.create(name="off", cron_expression="0 3 * * *", enabled=False)
    models.ScheduleExecution.create(schedule=schedule.id, scheduled_at=models.utcnow(), status="running")
    oma_server.components.scheduler.reload()  # as ScheduleService does after a write
    instance = oma_server.components.replication.instance
    ctx = factories.context()
    factories.replication_job(ctx, status="pending", worker=instance, worker_heartbeat_at=models.utcnow())
    factories.replication_job(ctx, status="replicating", worker="other-oma", worker_heartbeat_at=models.utcnow())

    response, components = _health(oma)
    assert response.system_health == "healthy" and response.version == "0.1.0"
    assert {name: c.status for name, c in components.items()} == {
        "database": "healthy", "replication_engine": "healthy", "vma_tunnel": "healthy", "cloudstack": "unknown",
        "log_sink": "healthy", "scheduler": "healthy", "vma_connections": "unknown"}
    assert components["vma_connections"].message == "no VMA is enrolled"
    assert components["database"].details["backend"] in ("sqlite", "mariadb")
    engine = components["replication_engine"].details
    assert (engine["active_jobs"], engine["leases_held"], engine["orphaned_jobs"]) == (2, 1, 0)
    assert 0 <= response.uptime_seconds < 120 and response.started_at.ToDatetime() <= response.checked_at.ToDatetime()
    runtime = response.runtime
    assert runtime.rss_bytes > 10 << 20 and runtime.thread_count > 1 and runtime.cpu_count >= 1
    assert runtime.open_file_descriptors > 3 and runtime.gc_collections >= 0
    assert (response.scheduler.active_schedules, response.scheduler.running_executions,
            response.scheduler.max_concurrent, response.scheduler.is_running) == (1, 1, 10, True)

    anonymous_view = read_without_writes(lambda: anonymous.debug.GetSystemHealth(pb.GetSystemHealthRequest(), timeout=10))
    assert (anonymous_view.system_health, anonymous_view.version) == ("healthy", "0.1.0")
    assert anonymous_view.HasField("checked_at") and not anonymous_view.components
    assert not anonymous_view.HasField("runtime") and not anonymous_view.HasField("started_at")
    for call in (lambda: anonymous.debug.GetFailoverJobsDebug(pb.GetFailoverJobsDebugRequest(), timeout=10),
                 lambda: anonymous.debug.ListEndpoints(pb.ListEndpointsRequest(), timeout=10),
                 lambda: anonymous.debug.GetRecentLogs(pb.GetRecentLogsRequest(), timeout=10)):
        assert refused_without_writes(call) == grpc.StatusCode.UNAUTHENTICATED


def test_unreachable_dependencies_degrade_health_without_showing_secrets(oma_factory):
    server = oma_factory(vma_address="127.0.0.1:9", vma_retries=0, worker_lease_seconds=3600)
    box = server.runtime.secrets
    cloudstack_config.create(box, {"name": "cs", "api_url": "http://127.0.0.1:9/client/api",
                                   "api_key": "api-key-4711", "secret_key": "secret-key-4711", "zone": "zone-a"})
    ctx = factories.context()
    factories.replication_job(ctx, status="replicating", worker="gone-oma",
                              worker_heartbeat_at=models.utcnow() - timedelta(hours=2))
    with OmaClient(f"127.0.0.1:{server.port}", token="") as client:
        client.login("admin", ADMIN_PASSWORD)
        response, components = _health(client)
    assert response.system_health == "degraded"
    assert {name: c.status for name, c in components.items() if c.status != "healthy"} == {
        "vma_tunnel": "unhealthy", "cloudstack": "unhealthy", "replication_engine": "degraded",
        "vma_connections": "unknown"}
    assert "127.0.0.1:9" in components["vma_tunnel"].message
    assert components["cloudstack"].details["api_host"] == "127.0.0.1:9"
    assert components["replication_engine"].details["orphaned_jobs"] == 1
    text = json_format.MessageToJson(response)
    assert not any(secret in text for secret in ("api-key-4711", "secret-key-4711"))


def test_failover_jobs_debug_counts_and_lists_stuck_work(oma):
    ctx = factories.context()
    now = models.utcnow()
    for job_id, job_type, status, age in (("fo-1", "live", "completed", 300), ("fo-2", "test", "failed", 200),
                                          ("fo-3", "test", "validating", 10), ("fo-4", "live", "reverting", 5),
                                          ("fo-5", "test", "completed", 100)):
        models.FailoverJob.create(vm_context=ctx.context_id, job_id=job_id, vm_id=ctx.vmware_vm_id, job_type=job_type,
                                  status=status, source_vm_name=ctx.vm_name, created_at=now - timedelta(minutes=age))

    def tracked(job_type, operation, minutes, category="system", status="running"):
        job = joblog.start_job(job_type, operation, context_id=ctx.context_id, category=category,
                               external_job_id=f"ext-{operation}")
        models.JobTracking.update(started_at=now - timedelta(minutes=minutes), status=status).where(
            models.JobTracking.id == job).execute()
        return job

    stuck_failover = tracked("failover", "unified-live-failover", 45, category="failover")
    stuck_rollback = tracked("cleanup", "enhanced-live-failover-rollback", 40)
    recent_failover = tracked("failover", "unified-test-failover", 5, category="failover")
    tracked("migration", "replication", 120, category="replication")
    tracked("failover", "unified-test-failover-old", 120, category="failover", status="completed")

    report = read_without_writes(lambda: oma.debug.GetFailoverJobsDebug(pb.GetFailoverJobsDebugRequest(), timeout=10))
    assert dict(report.counts_by_status) == {"completed": 2, "failed": 1, "validating": 1, "reverting": 1}
    assert dict(report.counts_by_type) == {"live": 2, "test": 3}
    assert [(j.job_id, j.status, j.job_type, j.vm_context_id, j.source_vm_name) for j in report.non_terminal_jobs] == \
        [("fo-3", "validating", "test", ctx.context_id, ctx.vm_name), ("fo-4", "reverting", "live", ctx.context_id,
                                                                       ctx.vm_name)]
    assert 590 <= report.non_terminal_jobs[0].age_seconds <= 700
    assert [j.job_id for j in report.long_running_jobs] == [stuck_failover, stuck_rollback]
    first = report.long_running_jobs[0]
    assert (first.operation, first.external_job_id, first.context_id, first.status) == \
        ("unified-live-failover", "ext-unified-live-failover", ctx.context_id, "running")
    assert 45 * 60 <= first.running_seconds < 46 * 60

    shorter = read_without_writes(lambda: oma.debug.GetFailoverJobsDebug(pb.GetFailoverJobsDebugRequest(long_running_minutes=1),
                                                           timeout=10))
    assert [j.job_id for j in shorter.long_running_jobs] == [stuck_failover, stuck_rollback, recent_failover]
    for minutes in (-1, 10**9):
        assert refused_without_writes(lambda: oma.debug.GetFailoverJobsDebug(pb.GetFailoverJobsDebugRequest(
            long_running_minutes=minutes), timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT


def _contract_methods() -> set[str]:
    methods = set()
    for info in pkgutil.iter_modules(oma.v1.__path__):
        if info.name.endswith("_pb2"):
            for service in importlib.import_module(f"oma.v1.{info.name}").DESCRIPTOR.services_by_name.values():
                methods |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    return methods


def _mapping_routes() -> set[str]:
    routes = set()
    for line in (ROOT / "tests/data/mapping_routes.txt").read_text().splitlines():
        if line.startswith("oma."):
            routes.add(line.split("|")[1].strip())
    return routes


def test_endpoints_are_the_registered_rpcs_with_every_mapping_route(oma):
    endpoints, token = [], ""
    while True:
        page = read_without_writes(lambda: oma.debug.ListEndpoints(pb.ListEndpointsRequest(page_size=40, page_token=token),
                                                     timeout=10))
        endpoints += page.endpoints
        token = page.next_page_token
        if not token:
            break
    by_method = {e.full_method: e for e in endpoints}
    assert len(endpoints) == len(by_method) == page.count and set(by_method) == _contract_methods()
    routes = {re.sub(r"\{[^}]*\}", "{}", r) for e in endpoints for r in e.routes}
    assert _mapping_routes() <= routes
    login = by_method["/oma.v1.AuthService/Login"]
    assert (login.service, login.method, list(login.routes), login.requires_auth) == \
        ("oma.v1.AuthService", "Login", ["POST /auth/login"], False)
    assert not by_method["/oma.v1.DebugService/GetSystemHealth"].requires_auth
    assert by_method["/oma.v1.DebugService/ListEndpoints"].requires_auth
    watch = by_method["/oma.v1.ProgressService/WatchReplicationProgress"]
    assert watch.server_streaming and not watch.client_streaming

    debug_only = read_without_writes(lambda: oma.debug.ListEndpoints(pb.ListEndpointsRequest(service="oma.v1.DebugService"),
                                                       timeout=10))
    assert sorted(e.method for e in debug_only.endpoints) == \
        ["GetFailoverJobsDebug", "GetRecentLogs", "GetSystemHealth", "ListEndpoints"] and debug_only.count == 4
    assert refused_without_writes(lambda: oma.debug.ListEndpoints(pb.ListEndpointsRequest(service="oma.v1.Nope"), timeout=10)) == \
        grpc.StatusCode.NOT_FOUND


def test_recent_logs_newest_first_with_filters_and_stable_pages(oma):
    now = models.utcnow()
    first = joblog.start_job("failover", "unified-live-failover", external_job_id="ext-a")
    second = joblog.start_job("cleanup", "test-failover-cleanup")
    rows = []
    for i in range(12):
        level = ("DEBUG", "INFO", "WARN", "ERROR")[i % 4]
        job = first if i % 2 == 0 else second
        rows.append({"job": job, "level": level, "message": f"record {i}", "ts": now - timedelta(seconds=100 - i),
                     "external_job_id": "ext-a" if job == first else None, "attrs": {"n": i, "context_id": "c"}})
    models.LogEvent.insert_many(rows).execute()

    def logs(**kw):
        return read_without_writes(lambda: oma.debug.GetRecentLogs(pb.GetRecentLogsRequest(**kw), timeout=10))

    def messages(response):
        return [e.message for e in response.events]

    seeded = logs(job_id=first)
    assert messages(seeded) == [f"record {i}" for i in (10, 8, 6, 4, 2, 0)]
    newest = seeded.events[0]
    assert (newest.job_id, newest.level, newest.external_job_id, newest.attrs["n"]) == (first, "WARN", "ext-a", 10)
    assert newest.ts.ToDatetime() == now - timedelta(seconds=90)
    assert messages(logs(external_job_id="ext-a", level="warn")) == ["record 10", "record 6", "record 2"]
    assert messages(logs(job_id=second, level="ERROR")) == ["record 11", "record 7", "record 3"]
    since = now - timedelta(seconds=92)
    since_ts = pb.GetRecentLogsRequest().since
    since_ts.FromDatetime(since)
    assert messages(logs(job_id=second, since=since_ts)) == ["record 11", "record 9"]

    # Pages continue after the last record seen: a newer record arriving meanwhile shifts nothing.
    page = logs(job_id=second, page_size=4)
    assert messages(page) == ["record 11", "record 9", "record 7", "record 5"] and page.next_page_token
    models.LogEvent.create(job=second, level="INFO", message="late", ts=now)
    page = logs(job_id=second, page_size=4, page_token=page.next_page_token)
    assert messages(page) == ["record 3", "record 1"] and not page.next_page_token

    models.LogEvent.insert_many([{"job": second, "level": "INFO", "message": f"bulk {i}",
                                  "ts": now - timedelta(hours=1, seconds=i)} for i in range(520)]).execute()
    assert len(logs(job_id=second).events) == 100
    assert len(logs(job_id=second, page_size=1000).events) == 500
    for bad in (dict(level="LOUD"), dict(page_token="not-a-token"), dict(page_size=-1)):
        assert refused_without_writes(lambda: oma.debug.GetRecentLogs(pb.GetRecentLogsRequest(**bad), timeout=10)) == \
            grpc.StatusCode.INVALID_ARGUMENT
