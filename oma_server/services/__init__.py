"""Thin gRPC servicers: validate the request, call the domain, convert the result.

:func:`build_servicers` lists every implemented service and constructs each with exactly what it uses
(the runtime's settings and keys, and the long-lived parts built by :mod:`oma_server.startup`).
Services of the contract with no servicer here are registered with their generated base class and
answer UNIMPLEMENTED ("… is not built yet"); a servicer's service is the one whose generated base
class it implements (:func:`service_of`).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from oma_server.services.auth import AuthServicer, UserServicer
from oma_server.services.cloudstack_settings import CloudStackSettingsServicer
from oma_server.services.credentials import VMwareCredentialServicer
from oma_server.services.debug import DebugServicer
from oma_server.services.discovery import DiscoveryServicer
from oma_server.services.enrollment import EnrollmentAdminServicer, EnrollmentServicer
from oma_server.services.failover import FailoverServicer
from oma_server.services.groups import MachineGroupServicer
from oma_server.services.job_log import JobLogServicer
from oma_server.services.network_mappings import NetworkMappingServicer
from oma_server.services.ossea_config import OSSEAConfigServicer
from oma_server.services.progress import ProgressServicer
from oma_server.services.replications import ReplicationServicer
from oma_server.services.schedules import ScheduleServicer
from oma_server.services.validation import ValidationServicer
from oma_server.services.vm_contexts import VMContextServicer

if TYPE_CHECKING:
    from oma_server.startup import Components


def service_of(servicer: Any) -> str:
    """The contract's full service name (``oma.v1.XService``) a servicer (class or instance) implements."""
    cls = servicer if isinstance(servicer, type) else type(servicer)
    for base in cls.__mro__:
        if base.__module__.startswith("oma.v1.") and base.__module__.endswith("_pb2_grpc"):
            pb2 = importlib.import_module(base.__module__.removesuffix("_grpc"))
            return pb2.DESCRIPTOR.services_by_name[base.__name__.removesuffix("Servicer")].full_name
    raise TypeError(f"{cls.__name__} implements no generated servicer of the contract")


def build_servicers(runtime: Any, parts: Components) -> list[Any]:
    """Every implemented servicer, given what it uses."""
    return [
        AuthServicer(runtime),
        CloudStackSettingsServicer(runtime),
        VMwareCredentialServicer(runtime, parts.vma),
        DebugServicer(runtime, parts),
        DiscoveryServicer(runtime, parts.vma),
        EnrollmentAdminServicer(runtime, parts.tunnel),
        EnrollmentServicer(runtime, parts.tunnel),
        FailoverServicer(parts.failover, parts.vma),
        MachineGroupServicer(runtime),
        JobLogServicer(runtime),
        NetworkMappingServicer(runtime),
        OSSEAConfigServicer(runtime),
        ProgressServicer(parts.vma, parts.replication.hub),
        ReplicationServicer(runtime, parts.replication, parts.exports),
        ScheduleServicer(parts.scheduler),
        ValidationServicer(parts.vma),
        VMContextServicer(runtime),
        UserServicer(runtime),
    ]


#: The full names of the services implemented here (the others answer UNIMPLEMENTED).
IMPLEMENTED: frozenset[str] = frozenset(service_of(cls) for cls in (
    AuthServicer, CloudStackSettingsServicer, VMwareCredentialServicer, DebugServicer, DiscoveryServicer,
    EnrollmentAdminServicer, EnrollmentServicer, FailoverServicer, MachineGroupServicer, JobLogServicer,
    NetworkMappingServicer, OSSEAConfigServicer, ProgressServicer, ReplicationServicer, ScheduleServicer,
    ValidationServicer, VMContextServicer, UserServicer))
