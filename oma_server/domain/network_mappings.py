"""Network mappings: which CloudStack network each source (vSphere) network of a VM goes to, for live
and for test failovers (network_mappings; unique per VM, source network and test flag).

A mapping always belongs to a managed VM (resolved by context id, or by name + vCenter), so the
``vm_context_id`` cascade removes it with the VM. ``vm_id`` keeps the original meaning (the VM name).
Deleting removes exactly the named mapping(s), nothing else of the VM.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from peewee import IntegrityError

from oma_server.db.database import database_proxy as db
from oma_server.db.models import (
    NetworkMapping,
    NetworkMappingType,
    NetworkValidationStatus,
    VmDisk,
    VmReplicationContext,
    utcnow,
)
from oma_server.domain import contexts, paging, text_rules
from oma_server.domain.text_rules import quote
from oma_server.errors import AlreadyExists, InvalidArgument, NotFound, require

# Looks up a CloudStack network by id: returns its name, or None when it does not exist.
NetworkLookup = Callable[[str], "str | None"]


def resolve_context(vm_id: str = "", vm_context_id: str = "", vcenter_host: str = "") -> VmReplicationContext:
    """The managed VM a mapping request names: context id first, then VM name (+ vCenter)."""
    if vm_context_id:
        return contexts.get(vm_context_id)
    require(vm_id, "vm_id (VM name) or vm_context_id is required")
    ctx = VmReplicationContext.get_or_none(VmReplicationContext.context_id == vm_id)
    return ctx or contexts.get_by_name(vm_id, vcenter_host)


def source_networks(context_id: str) -> list[str]:
    """The VM's source networks as discovery recorded them (vm_disks.network_config), sorted."""
    names: set[str] = set()
    for (config,) in VmDisk.select(VmDisk.network_config).where(VmDisk.vm_context == context_id).tuples():
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except ValueError:
                continue
        for nic in config or []:
            name = nic.get("network_name") if isinstance(nic, dict) else None
            if name:
                names.add(name)
    return sorted(names)


def create(*, vm_id: str, vm_context_id: str, vcenter_host: str, source_network_name: str,
           destination_network_id: str, destination_network_name: str, is_test_network: bool,
           mapping_type: str, network_strategy: str, lookup: NetworkLookup | None) -> tuple[NetworkMapping, bool]:
    """Insert or update the mapping for (VM, source network, test flag). Returns (row, created)."""
    require(source_network_name.strip(), "source_network_name is required")
    require(destination_network_id.strip(), "destination_network_id is required")
    text_rules.fit(NetworkMapping, {"source_network_name": source_network_name.strip(),
                                    "destination_network_id": destination_network_id.strip(),
                                    "destination_network_name": destination_network_name.strip(),
                                    "network_strategy": network_strategy})
    kind = mapping_type or (NetworkMappingType.TEST if is_test_network else NetworkMappingType.LIVE)
    if kind not in set(NetworkMappingType):
        raise InvalidArgument(f"mapping_type must be one of {', '.join(NetworkMappingType)}")
    ctx = resolve_context(vm_id, vm_context_id, vcenter_host)
    validation, validated_at = NetworkValidationStatus.PENDING, None
    name = destination_network_name.strip()
    if lookup is not None:
        found = lookup(destination_network_id)
        validated_at = utcnow()
        validation = NetworkValidationStatus.VALID if found is not None else NetworkValidationStatus.INVALID
        if found is None:
            raise NotFound(f"CloudStack network {quote(destination_network_id)} does not exist")
        name = name or found
    values = {
        "vm_id": ctx.vm_name, "vm_context": ctx.context_id, "vmware_vm_id": ctx.vmware_vm_id,
        "source_network_name": source_network_name.strip(),
        "destination_network_id": destination_network_id.strip(),
        "destination_network_name": name or destination_network_id.strip(),
        "is_test_network": is_test_network, "mapping_type": kind,
        "network_strategy": network_strategy or None, "validation_status": validation,
        "last_validated": validated_at,
    }
    with db.atomic():
        existing = NetworkMapping.get_or_none(
            NetworkMapping.vm_context == ctx.context_id,
            NetworkMapping.source_network_name == values["source_network_name"],
            NetworkMapping.is_test_network == is_test_network,
        )
        try:
            if existing is None:
                row = NetworkMapping.create(**values)
                return row, True
            NetworkMapping.update(values).where(NetworkMapping.id == existing.id).execute()
        except IntegrityError:
            raise AlreadyExists(
                f"another mapping already uses VM name {quote(ctx.vm_name)} with source network "
                f"{quote(values['source_network_name'])}"
            ) from None
    return NetworkMapping.get_by_id(existing.id), False


def _filtered(vm_id: str = "", vm_context_id: str = "", is_test_network: bool | None = None):
    query = NetworkMapping.select()
    if vm_context_id:
        query = query.where(NetworkMapping.vm_context == vm_context_id)
    if vm_id:
        query = query.where((NetworkMapping.vm_id == vm_id) | (NetworkMapping.vm_context == vm_id))
    if is_test_network is not None:
        query = query.where(NetworkMapping.is_test_network == is_test_network)
    return query.order_by(NetworkMapping.vm_id, NetworkMapping.source_network_name, NetworkMapping.is_test_network)


def list_all(*, vm_id: str = "", vm_context_id: str = "", is_test_network: bool | None = None,
             page_size: int = 0, page_token: str = "") -> paging.Page:
    return paging.paginate(_filtered(vm_id, vm_context_id, is_test_network), page_size, page_token)


def list_for_vm(*, vm_id: str, vm_context_id: str, is_test_network: bool | None, page_size: int = 0,
                page_token: str = "") -> paging.Page:
    ctx = resolve_context(vm_id, vm_context_id)
    return paging.paginate(_filtered(vm_context_id=ctx.context_id, is_test_network=is_test_network),
                           page_size, page_token)


def status(vm_id: str, vm_context_id: str) -> dict[str, Any]:
    ctx = resolve_context(vm_id, vm_context_id)
    rows = list(NetworkMapping.select().where(NetworkMapping.vm_context == ctx.context_id))
    sources = source_networks(ctx.context_id)

    def covered(test: bool) -> set[str]:
        return {m.source_network_name for m in rows
                if m.is_test_network == test or m.mapping_type == NetworkMappingType.BOTH}

    unmapped_live = [n for n in sources if n not in covered(False)]
    unmapped_test = [n for n in sources if n not in covered(True)]
    live = sum(1 for m in rows if not m.is_test_network)
    if not rows:
        level = "none"
    elif not sources:
        level = "unknown"  # no discovered NICs to compare against
    elif not unmapped_live and not unmapped_test:
        level = "complete"
    elif not unmapped_live:
        level = "live_only"
    elif not unmapped_test:
        level = "test_only"
    else:
        level = "partial"
    return {
        "vm_id": ctx.vm_name, "vm_context_id": ctx.context_id, "total_mappings": len(rows),
        "live_mappings": live, "test_mappings": len(rows) - live, "has_mappings": bool(rows),
        "mapping_complete": bool(sources) and not unmapped_live, "readiness_level": level,
        "source_networks": sources, "unmapped_live_networks": unmapped_live,
        "unmapped_test_networks": unmapped_test,
    }


def delete(vm_id: str, source_network_name: str, is_test_network: bool | None) -> int:
    """Delete exactly the mapping(s) of this VM and source network (optionally one test flag)."""
    require(vm_id, "vm_id is required")
    require(source_network_name, "source_network_name is required")
    condition = ((NetworkMapping.vm_id == vm_id) | (NetworkMapping.vm_context == vm_id)) & (
        NetworkMapping.source_network_name == source_network_name)
    if is_test_network is not None:
        condition &= NetworkMapping.is_test_network == is_test_network
    deleted = NetworkMapping.delete().where(condition).execute()
    if not deleted:
        raise NotFound(f"no network mapping for VM {quote(vm_id)} and source network {quote(source_network_name)}")
    return deleted
