"""The OMA's long-lived parts, built and started in one visible order.

:func:`build_components` constructs everything the servicers and each other use — the job log sink,
the VMA client, the NBD exports, the replication engine (which uses the VMA client and the exports),
the failover engine (which also uses the replication engine, for a live failover's final sync), the
scheduler (which starts replications), the enrollment expiry sweep and the VMA connection monitor —
and hands each exactly what it uses. Nothing runs yet: :meth:`Components.start` starts them in that
order once the servicers (:func:`oma_server.services.build_servicers`) hold their references and the
ports are bound, and :meth:`Components.stop` stops them in the reverse order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from oma_server.config import Settings
from oma_server.domain import nbd_access
from oma_server.domain.crypto import SecretBox
from oma_server.domain.joblog import LogEventSink
from oma_server.domain.scheduler import Scheduler
from oma_server.domain.vma_connections import ConnectionMonitor
from oma_server.integrations import vma_client
from oma_server.integrations.nbd_exports import ExportManager
from oma_server.integrations.vma_client import VmaClient
from oma_server.services.enrollment import ExpirySweep, TunnelConfig
from oma_server.workflows.failover import FailoverEngine
from oma_server.workflows.failover_common import FailoverDeps
from oma_server.workflows.replication import ReplicationDeps, ReplicationEngine

log = logging.getLogger("oma_server")


@dataclass
class Components:
    log_events: LogEventSink
    vma: VmaClient
    exports: ExportManager
    tunnel: TunnelConfig
    nbd_permits: nbd_access.ExportPermits
    replication: ReplicationEngine
    failover: FailoverEngine
    scheduler: Scheduler
    enrollment_expiry: ExpirySweep
    vma_monitor: ConnectionMonitor

    def start(self) -> None:
        """Start in dependency order. The engines recover first (replications are followed again,
        interrupted failovers fail) so the scheduler sees the jobs as they really are."""
        self.log_events.start()
        self.replication.start()
        self.failover.start()
        self.scheduler.start()
        self.enrollment_expiry.start()
        self.vma_monitor.start()

    def stop(self) -> None:
        """Stop in reverse order: nothing new is started while the engines wind down; the replication
        engine stops the exports before it hands its leases back."""
        self.vma_monitor.stop()
        self.enrollment_expiry.stop()
        self.scheduler.stop()
        self.failover.stop()
        self.replication.stop()
        self.exports.stop()
        self.vma.close()
        self.log_events.stop()


def build_components(settings: Settings, secrets: SecretBox) -> Components:
    vma = VmaClient(settings.vma_address, settings.vma_token, timeout=settings.vma_timeout_seconds,
                    retries=settings.vma_retries)
    # Each job's export is served over TLS with a key derived from the job id (docs/security/data.md).
    tls = {"psk_dir": settings.data_dir / "nbd-tls",
           "psk_for": lambda job_id: nbd_access.export_psk(secrets, job_id)} if settings.nbd_tls else {}
    exports = ExportManager(bind_host=settings.nbd_bind_host, public_host=settings.nbd_public_host,
                            port_min=settings.nbd_port_min, port_max=settings.nbd_port_max, **tls)
    # The enrollment services and the export permits share the tunnel (built on first use).
    tunnel = TunnelConfig(settings)
    # A VMA may forward only to the exports of its running jobs: job start/end rewrite its key's permitopen.
    permits = nbd_access.ExportPermits(tunnel.get, settings.vma_address, settings.tunnel_reverse_host)
    nbd_access.install(permits)
    replication = ReplicationEngine(ReplicationDeps(settings, secrets, vma, exports))
    failover = FailoverEngine(FailoverDeps(settings, secrets, vma, exports, replication))
    scheduler = Scheduler(settings, replication)
    monitor = ConnectionMonitor(
        vma_client.tunnel_probe(settings.tunnel_reverse_host, settings.vma_monitor_probe_timeout_seconds),
        settings.vma_monitor_interval_seconds, settings.vma_disconnect_after_seconds)
    return Components(log_events=LogEventSink(), vma=vma, exports=exports, tunnel=tunnel, nbd_permits=permits,
                      replication=replication,
                      failover=failover, scheduler=scheduler,
                      enrollment_expiry=ExpirySweep(settings.enrollment_sweep_interval_seconds), vma_monitor=monitor)
