"""Operator troubleshooting views (docs/design/operations.md#debug-views): real figures only, read-only, never a secret.

The original's debug endpoints returned constants (24 h uptime, 28 endpoints, sample requests);
here every number is measured: the process (/proc), the database (a ping), the dependencies (a cheap
call to the VMA agent and to the active CloudStack, cached for a few seconds so a polling dashboard
does not hammer them), the replication engine (active jobs and the leases this process holds), the
scheduler, the failover records and JobLog, the registered RPCs (from the contract's descriptors) and
``log_events``.
"""
from __future__ import annotations

import base64
import gc
import importlib
import importlib.metadata
import os
import pkgutil
import resource
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any, Callable
from urllib.parse import urlsplit

import oma.v1
from migration.v1 import options_pb2
from peewee import DatabaseError, fn

from oma_server.db.database import database_proxy as db
from oma_server.db.database import is_mysql
from oma_server.db.models import (
    FAILOVER_ACTIVE_STATUSES,
    REPLICATION_ACTIVE_STATUSES,
    FailoverJob,
    JobCategory,
    JobTracking,
    JobTrackingStatus,
    JobType,
    LogEvent,
    LogLevel,
    OsseaConfig,
    ReplicationJob,
    ReplicationSchedule,
    ScheduleExecution,
    ScheduleExecutionStatus,
    VmaActiveConnection,
    utcnow,
)
from oma_server.domain import cloudstack_config, paging
from oma_server.domain.crypto import SecretBox
from oma_server.domain.text_rules import quote
from oma_server.errors import DomainError, InvalidArgument, NotFound

HEALTHY, DEGRADED, UNHEALTHY, UNKNOWN = "healthy", "degraded", "unhealthy", "unknown"

VMA_PROBE_TTL_SECONDS = 5.0
CLOUDSTACK_PROBE_TTL_SECONDS = 15.0
CLOUDSTACK_PROBE_TIMEOUT_SECONDS = 10.0
# A job id the VMA never issues: "not found" proves the agent answers and accepts our token.
VMA_PROBE_JOB_ID = "oma-health-probe"

DEFAULT_LONG_RUNNING_MINUTES = 30
MAX_LONG_RUNNING_MINUTES = 366 * 24 * 60
LOGS_DEFAULT_PAGE = 100
LOGS_MAX_PAGE = 500
_LEVEL_ORDER = (LogLevel.DEBUG, LogLevel.INFO, LogLevel.WARN, LogLevel.ERROR)


@dataclass(frozen=True)
class Probe:
    """Health of one dependency or subsystem (DebugComponentHealth)."""

    name: str
    status: str
    message: str
    latency_ms: int
    checked_at: datetime
    details: dict[str, Any] = field(default_factory=dict)


class _ProbeCache:
    """Results of dependency probes, reused for ``ttl`` seconds per key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple, tuple[float, Probe]] = {}

    def get(self, key: tuple, ttl: float, run: Callable[[], Probe]) -> Probe:
        with self._lock:
            hit = self._entries.get(key)
        if hit is not None and time.monotonic() - hit[0] < ttl:
            return hit[1]
        probe = run()
        with self._lock:
            self._entries[key] = (time.monotonic(), probe)
        return probe


_probes = _ProbeCache()


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def vma_health(vma: Any) -> Probe:
    """Can the OMA reach the VMA agent (and does the agent accept its token)? Cached a few seconds."""
    if vma is None:
        return Probe("vma_tunnel", UNKNOWN, "the VMA client is not running", 0, utcnow())

    def run() -> Probe:
        started, now = time.monotonic(), utcnow()
        try:
            vma.get_progress(VMA_PROBE_JOB_ID)
        except NotFound:
            pass
        except DomainError as exc:
            return Probe("vma_tunnel", UNHEALTHY, exc.message, _elapsed_ms(started), now, {"address": vma.address})
        return Probe("vma_tunnel", HEALTHY, f"the VMA agent at {vma.address} answers", _elapsed_ms(started), now,
                     {"address": vma.address})

    return _probes.get(("vma", vma.address), VMA_PROBE_TTL_SECONDS, run)


def cloudstack_health(config: OsseaConfig | None, box: SecretBox) -> Probe:
    """Does the active configuration's CloudStack answer (listZones)? Cached; an edit of the
    configuration probes again."""
    if config is None:
        return Probe("cloudstack", UNKNOWN, "no CloudStack configuration is active", 0, utcnow())
    details = {"config_id": config.id, "config_name": config.name,
               "api_host": urlsplit(config.api_url).netloc.rpartition("@")[2]}  # never user:password@

    def run() -> Probe:
        started, now = time.monotonic(), utcnow()
        try:
            zones = cloudstack_config.client(config, box, timeout=CLOUDSTACK_PROBE_TIMEOUT_SECONDS).list_zones()
        except DomainError as exc:
            return Probe("cloudstack", UNHEALTHY, exc.message, _elapsed_ms(started), now, details)
        return Probe("cloudstack", HEALTHY, f"CloudStack answers ({len(zones)} zones)", _elapsed_ms(started), now,
                     details)

    key = ("cloudstack", config.id, config.api_url, config.updated_at)
    return _probes.get(key, CLOUDSTACK_PROBE_TTL_SECONDS, run)


def database_health() -> Probe:
    """A ``SELECT 1`` round trip (never cached: this is the liveness signal)."""
    started, now = time.monotonic(), utcnow()
    backend = "mariadb" if is_mysql() else "sqlite"
    try:
        db.execute_sql("SELECT 1")
    except DatabaseError as exc:
        return Probe("database", UNHEALTHY, f"the database does not answer ({type(exc).__name__})",
                     _elapsed_ms(started), now, {"backend": backend})
    return Probe("database", HEALTHY, "the database answers", _elapsed_ms(started), now, {"backend": backend})


def replication_health(instance: str | None, lease_seconds: float) -> Probe:
    """Active replication jobs, the leases this process holds, and active jobs nobody drives."""
    started, now = time.monotonic(), utcnow()
    if instance is None:
        return Probe("replication_engine", UNKNOWN, "the replication engine is not running", 0, now)
    active = ReplicationJob.select().where(ReplicationJob.status.in_(REPLICATION_ACTIVE_STATUSES))
    orphaned = active.where(ReplicationJob.worker.is_null()
                            | (ReplicationJob.worker_heartbeat_at < now - timedelta(seconds=lease_seconds))).count()
    details = {"instance": instance, "active_jobs": active.count(),
               "leases_held": active.where(ReplicationJob.worker == instance).count(), "orphaned_jobs": orphaned}
    if orphaned:
        return Probe("replication_engine", DEGRADED, f"{orphaned} active jobs have no live worker (a takeover is due)",
                     _elapsed_ms(started), now, details)
    return Probe("replication_engine", HEALTHY,
                 f"{details['active_jobs']} active jobs, {details['leases_held']} driven by {instance}",
                 _elapsed_ms(started), now, details)


def vma_connections_health(monitor_running: bool) -> Probe:
    """The enrolled VMAs as the connection monitor last saw them through their tunnels."""
    now = utcnow()
    rows = (VmaActiveConnection.select(VmaActiveConnection.connection_status, VmaActiveConnection.vma_name)
            .where(VmaActiveConnection.connection_status != "revoked"))
    connected = sorted(r.vma_name for r in rows if r.connection_status == "connected")
    disconnected = sorted(r.vma_name for r in rows if r.connection_status == "disconnected")
    details = {"connected": len(connected), "disconnected": len(disconnected), "disconnected_vmas": disconnected}
    if not monitor_running:
        return Probe("vma_connections", UNKNOWN, "the VMA connection monitor is not running", 0, now, details)
    if not connected and not disconnected:
        return Probe("vma_connections", UNKNOWN, "no VMA is enrolled", 0, now, details)
    if disconnected:
        return Probe("vma_connections", DEGRADED, f"{len(disconnected)} of {len(connected) + len(disconnected)} "
                     f"enrolled VMAs do not answer through their tunnels: {', '.join(disconnected)}", 0, now, details)
    return Probe("vma_connections", HEALTHY, f"all {len(connected)} enrolled VMAs answer through their tunnels",
                 0, now, details)


def log_sink_health(dropped: int | None) -> Probe:
    now = utcnow()
    if dropped is None:
        return Probe("log_sink", UNKNOWN, "the job log sink is not running", 0, now)
    if dropped:
        return Probe("log_sink", DEGRADED, f"{dropped} log records were dropped (queue full) since start", 0, now,
                     {"dropped_records": dropped})
    return Probe("log_sink", HEALTHY, "no log record dropped", 0, now, {"dropped_records": 0})


def scheduler_health(scheduler: Any) -> tuple[Probe, dict[str, Any]]:
    """The scheduler component's own status (its thread, registered schedules, running executions)
    as a component and as DebugSchedulerHealth; from the database alone when it is not running here."""
    now = utcnow()
    if scheduler is None:
        running = ScheduleExecution.select().where(ScheduleExecution.status == ScheduleExecutionStatus.RUNNING).count()
        enabled = ReplicationSchedule.select().where(ReplicationSchedule.enabled == True).count()  # noqa: E712
        return (Probe("scheduler", UNKNOWN, "the scheduler does not run in this process", 0, now),
                {"is_running": False, "active_schedules": enabled, "running_executions": running})
    status = scheduler.status()
    view = {"is_running": status.is_running, "active_schedules": len(status.registrations),
            "running_executions": status.running_executions, "max_concurrent": status.max_concurrent_executions}
    if not status.is_running:
        return Probe("scheduler", UNHEALTHY, "the scheduler thread is not running", 0, now, view), view
    return Probe("scheduler", HEALTHY, f"{view['active_schedules']} schedules registered, "
                 f"{view['running_executions']} executions running", 0, now, view), view


def _proc_status() -> dict[str, int]:
    """VmRSS (kB) and Threads from /proc/self/status; empty where there is no /proc."""
    values: dict[str, int] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "Threads"):
                    values[key] = int(rest.split()[0])
    except OSError:
        pass
    return values


def runtime_stats() -> dict[str, Any]:
    """Resident memory, OS threads (incl. gRPC's own), CPUs, GC runs and open descriptors of this process."""
    proc = _proc_status()
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = 0
    return {
        # Without /proc only the peak resident size is known (ru_maxrss, kB on Linux).
        "rss_bytes": proc["VmRSS"] * 1024 if "VmRSS" in proc else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "thread_count": proc.get("Threads") or threading.active_count(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0),
        "gc_collections": sum(generation["collections"] for generation in gc.get_stats()),
        "open_file_descriptors": fds,
    }


@cache
def version() -> str:
    try:
        return importlib.metadata.version("oma-vma-migrate")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def overall(components: list[Probe]) -> str:
    """unhealthy when the database is down; degraded when any dependency is not healthy."""
    if any(p.name == "database" and p.status != HEALTHY for p in components):
        return UNHEALTHY
    if any(p.status in (DEGRADED, UNHEALTHY) for p in components):
        return DEGRADED
    return HEALTHY


# --- failover jobs -------------------------------------------------------------------------------

def failover_jobs_debug(long_running_minutes: int) -> dict[str, Any]:
    """failover_jobs counts by status and type, the non-terminal ones with their age, and failover or
    rollback/cleanup JobLog jobs running longer than ``long_running_minutes`` (0 = 30)."""
    if not 0 <= long_running_minutes <= MAX_LONG_RUNNING_MINUTES:
        raise InvalidArgument(f"long_running_minutes must be between 0 and {MAX_LONG_RUNNING_MINUTES}")
    now = utcnow()
    cutoff = now - timedelta(minutes=long_running_minutes or DEFAULT_LONG_RUNNING_MINUTES)

    def counts(column) -> dict[str, int]:
        return {str(value): total for value, total in
                FailoverJob.select(column, fn.COUNT(FailoverJob.id)).group_by(column).tuples()}

    open_jobs = list(FailoverJob.select().where(FailoverJob.status.in_(FAILOVER_ACTIVE_STATUSES))
                     .order_by(FailoverJob.created_at, FailoverJob.id))
    long_running = list(JobTracking.select().where(
        JobTracking.status == JobTrackingStatus.RUNNING, JobTracking.started_at < cutoff,
        (JobTracking.job_category == JobCategory.FAILOVER)
        | JobTracking.job_type.in_([JobType.FAILOVER, JobType.CLEANUP]),
    ).order_by(JobTracking.started_at, JobTracking.id))
    return {
        "counts_by_status": counts(FailoverJob.status),
        "counts_by_type": counts(FailoverJob.job_type),
        "non_terminal_jobs": [{"job": j, "age_seconds": int((now - j.created_at).total_seconds())} for j in open_jobs],
        "long_running_jobs": [{"job": j, "running_seconds": int((now - j.started_at).total_seconds())}
                              for j in long_running],
        "generated_at": now,
    }


# --- endpoints -----------------------------------------------------------------------------------

@cache
def _registered_endpoints() -> tuple[dict[str, Any], ...]:
    """Every RPC of every oma.v1 service — the server registers all of them (unbuilt ones answer
    UNIMPLEMENTED) — with its ``migration.v1.route`` options."""
    found = []
    for info in pkgutil.iter_modules(oma.v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"oma.v1.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found.append({
                    "service": service.full_name, "method": method.name,
                    "full_method": f"/{service.full_name}/{method.name}",
                    "routes": list(method.GetOptions().Extensions[options_pb2.route]),
                    "client_streaming": method.client_streaming, "server_streaming": method.server_streaming,
                })
    return tuple(sorted(found, key=lambda e: (e["service"], e["method"])))


def endpoints(service: str, public_prefixes: tuple[str, ...], page_size: int, page_token: str) -> paging.Page:
    """One page of the registered RPCs (optionally of one service); ``requires_auth`` from the
    server's public method prefixes."""
    items = [{**e, "requires_auth": not e["full_method"].startswith(public_prefixes)}
             for e in _registered_endpoints() if not service or e["service"] == service]
    if service and not items:
        raise NotFound(f"no registered service {quote(service)}")
    return paging.paginate_list(items, page_size, page_token)


# --- logs ----------------------------------------------------------------------------------------

def _encode_position(event: LogEvent) -> str:
    return base64.urlsafe_b64encode(f"k:{event.ts.isoformat()}:{event.id}".encode()).decode()


def _decode_position(token: str) -> tuple[datetime, int]:
    try:
        kind, _, rest = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        ts, _, event_id = rest.rpartition(":")
        position = datetime.fromisoformat(ts), int(event_id)
        if kind != "k" or not 0 < position[1] < 1 << 63:
            raise ValueError
        return position
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token is not a token this server issued") from None


def recent_logs(*, level: str = "", job_id: str = "", external_job_id: str = "", since: datetime | None = None,
                page_size: int = 0, page_token: str = "") -> tuple[list[LogEvent], str]:
    """log_events newest first. Pages continue from the last record seen (not an offset), so records
    arriving meanwhile never shift a page."""
    if page_size < 0:
        raise InvalidArgument("page_size cannot be negative")
    size = min(page_size or LOGS_DEFAULT_PAGE, LOGS_MAX_PAGE)
    query = LogEvent.select()
    if level:
        try:
            floor = _LEVEL_ORDER.index(LogLevel(level.upper()))
        except ValueError:
            raise InvalidArgument(f"unknown log level {quote(level)}; one of DEBUG, INFO, WARN, ERROR") from None
        query = query.where(LogEvent.level.in_(list(_LEVEL_ORDER[floor:])))
    if job_id:
        query = query.where(LogEvent.job == job_id)
    if external_job_id:
        query = query.where(LogEvent.external_job_id == external_job_id)
    if since is not None:
        query = query.where(LogEvent.ts >= since)
    if page_token:
        ts, event_id = _decode_position(page_token)
        query = query.where((LogEvent.ts < ts) | ((LogEvent.ts == ts) & (LogEvent.id < event_id)))
    rows = list(query.order_by(LogEvent.ts.desc(), LogEvent.id.desc()).limit(size + 1))
    return rows[:size], _encode_position(rows[size - 1]) if len(rows) > size else ""
