"""CloudStack resources → protobuf messages, once for every service that shows them.

OSSEAConfigService (``OSSEAZone``, ``OSSEATemplate`` …), CloudStackSettingsService
(``CloudStackZone``, ``CloudStackTemplate`` …) and NetworkMappingService (``AvailableNetwork``,
``AvailableServiceOffering``) each declare their own messages for the same resources; their field
names agree, and each declares a subset. So each resource has one set of field values here, and
``convert.fill`` sets the fields the target message has (a field a message lacks is skipped).
"""
from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf.message import Message

from oma_server.convert import fill
from oma_server.integrations.cloudstack import DiskOffering, Network, ServiceOffering, Template, Zone

M = TypeVar("M", bound=Message)


def _label(resource: Any) -> str:
    """What the settings screens show as a resource's name: CloudStack's display text, else its name."""
    return resource.display_text or resource.name


def zone(message: M, z: Zone) -> M:
    return fill(message, id=z.id, name=z.name)


def template(message: M, t: Template) -> M:
    return fill(message, id=t.id, name=_label(t), description=t.os_type_name, os_type=t.os_type_name,
                size_gb=t.size_bytes >> 30)


def service_offering(message: M, o: ServiceOffering, *, name: str | None = None) -> M:
    return fill(message, id=o.id, name=_label(o) if name is None else name, description=o.display_text,
                cpu=o.cpu_number, memory=o.memory_mb, is_customized=o.is_customized)


def disk_offering(message: M, o: DiskOffering) -> M:
    return fill(message, id=o.id, name=_label(o), description=o.display_text, disk_size_gb=o.disk_size_gb,
                is_customized=o.is_customized)


def network(message: M, n: Network) -> M:
    return fill(message, id=n.id, name=n.name, description=n.display_text, zone_id=n.zone_id, zone_name=n.zone_name,
                state=n.state, network_type=n.network_type, is_default=n.is_default)
