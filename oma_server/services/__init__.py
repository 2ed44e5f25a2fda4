"""Thin gRPC servicers: validate the request, call the domain, convert the result.

``IMPLEMENTED`` maps a service's full name to its servicer class; services of the contract that are
not listed are registered with their generated base class and answer UNIMPLEMENTED.
"""
from __future__ import annotations

from typing import Any

from oma_server.services.auth import AuthServicer
from oma_server.services.cloudstack_settings import CloudStackSettingsServicer
from oma_server.services.credentials import VMwareCredentialServicer
from oma_server.services.discovery import DiscoveryServicer
from oma_server.services.groups import MachineGroupServicer
from oma_server.services.job_log import JobLogServicer
from oma_server.services.network_mappings import NetworkMappingServicer
from oma_server.services.ossea_config import OSSEAConfigServicer
from oma_server.services.progress import ProgressServicer
from oma_server.services.replications import ReplicationServicer
from oma_server.services.vm_contexts import VMContextServicer

IMPLEMENTED: dict[str, Any] = {
    "oma.v1.AuthService": AuthServicer,
    "oma.v1.VMContextService": VMContextServicer,
    "oma.v1.VMwareCredentialService": VMwareCredentialServicer,
    "oma.v1.MachineGroupService": MachineGroupServicer,
    "oma.v1.NetworkMappingService": NetworkMappingServicer,
    "oma.v1.JobLogService": JobLogServicer,
    "oma.v1.DiscoveryService": DiscoveryServicer,
    "oma.v1.ReplicationService": ReplicationServicer,
    "oma.v1.ProgressService": ProgressServicer,
    "oma.v1.OSSEAConfigService": OSSEAConfigServicer,
    "oma.v1.CloudStackSettingsService": CloudStackSettingsServicer,
}


def start_components(runtime: Any) -> None:
    """Start background components (workers, followers) once the services are registered."""
    from oma_server.domain.joblog import LogEventSink
    from oma_server.domain.replication_workflow import ReplicationEngine
    from oma_server.integrations.nbd_exports import ExportManager
    from oma_server.integrations.vma_client import VmaClient

    sink = LogEventSink()
    sink.start()
    runtime.components["log_events"] = sink
    settings = runtime.settings
    runtime.components["vma"] = VmaClient(settings.vma_address, settings.vma_token,
                                          timeout=settings.vma_timeout_seconds, retries=settings.vma_retries)
    runtime.components["exports"] = ExportManager(
        bind_host=settings.nbd_bind_host, public_host=settings.nbd_public_host,
        port_min=settings.nbd_port_min, port_max=settings.nbd_port_max)
    engine = ReplicationEngine(runtime)
    runtime.components["replication"] = engine
    engine.recover()
