"""Rows for tests that need existing state (written through the models, as the server would)."""
from __future__ import annotations

import itertools
import uuid
from datetime import timedelta
from typing import Any, Callable

import grpc
import pytest

from oma_server.db import models

_seq = itertools.count(1)


def context(**overrides: Any) -> models.VmReplicationContext:
    n = next(_seq)
    values = {
        "context_id": f"ctx-vm{n}-{uuid.uuid4().hex[:8]}", "vm_name": f"vm{n}", "vmware_vm_id": str(uuid.uuid4()),
        "vm_path": f"/DC0/vm/vm{n}", "vcenter_host": "vcenter.lab", "datacenter": "DC0",
        "cpu_count": 2, "memory_mb": 2048, "os_type": "linux", "power_state": "poweredOn",
    }
    values.update(overrides)
    return models.VmReplicationContext.create(**values)


def disk(ctx: models.VmReplicationContext, key: int = 2000, **overrides: Any) -> models.VmDisk:
    values = {
        "vm_context": ctx.context_id, "disk_id": f"disk-{key}", "vmdk_path": f"[ds0] {ctx.vm_name}/{key}.vmdk",
        "size_gb": 1, "capacity_bytes": 1 << 30, "unit_number": key - 2000 if key < 3000 else 0,
        "label": f"Hard disk {key - 1999}",
    }
    values.update(overrides)
    return models.VmDisk.create(**values)


def replication_job(ctx: models.VmReplicationContext, status: str = "completed", **overrides: Any) -> models.ReplicationJob:
    n = next(_seq)
    created = models.utcnow() - timedelta(minutes=60 - n % 60)
    values = {
        "id": f"job-test-{n}-{uuid.uuid4().hex[:6]}", "vm_context": ctx.context_id,
        "source_vm_id": ctx.vmware_vm_id, "source_vm_name": ctx.vm_name, "source_vm_path": ctx.vm_path,
        "vcenter_host": ctx.vcenter_host, "datacenter": ctx.datacenter, "replication_type": "initial",
        "status": status, "created_at": created,
        "completed_at": created + timedelta(minutes=5) if status in ("completed", "failed", "cancelled") else None,
    }
    values.update(overrides)
    return models.ReplicationJob.create(**values)


def db_snapshot() -> dict[str, list[str]]:
    """Every row of every table, to compare before/after a call that must write nothing. log_events
    is left out: the log sink writes it asynchronously, from earlier work, at any moment."""
    return {m.__name__: sorted(repr(r.__data__) for r in m.select())
            for m in models.ALL_MODELS if m is not models.LogEvent}


def read_without_writes(call: Callable[[], Any]) -> Any:
    """Make a call that must write nothing; return its response."""
    before = db_snapshot()
    response = call()
    assert db_snapshot() == before
    return response


def refused_without_writes(call: Callable[[], Any]) -> grpc.StatusCode:
    """Make a call that must be refused and write nothing; return its status code."""
    before = db_snapshot()
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert db_snapshot() == before
    return err.value.code()


# Values no text field may take (issue 9, items 7 and 8): each must be refused with INVALID_ARGUMENT
# before anything is looked up or written. Secrets (passwords, keys) are only bounded in length.
HOSTILE_TEXT = {
    "nul": "web\x0001",
    "crlf": "web\r\n01",
    "esc": "web\x1b[2J\x1b[31m01",
    "rtl-override": "web\u202e10gpj.exe",
    "1mb": "w" * (1 << 20),
}
HOSTILE_SECRET = {"1mb": HOSTILE_TEXT["1mb"]}


def string_fields(descriptor: Any, prefix: tuple[str, ...] = (), depth: int = 0) -> list[tuple[tuple[str, ...], Any]]:
    """(path, field descriptor) of every string field of a request message, nested messages and
    repeated fields included (map fields as their own kind, see ``set_text``)."""
    from google.protobuf.descriptor import FieldDescriptor

    found: list[tuple[tuple[str, ...], Any]] = []
    for fd in descriptor.fields:
        path = (*prefix, fd.name)
        if fd.type == FieldDescriptor.TYPE_STRING:
            found.append((path, fd))
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            found.append((path, fd))
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and depth < 2 \
                and not fd.message_type.full_name.startswith("google.protobuf."):
            found.extend(string_fields(fd.message_type, path, depth + 1))
    return found


def set_text(message: Any, path: tuple[str, ...], value: str) -> None:
    """Put ``value`` into the string field at ``path`` (appended to a repeated field; a map gets it as
    a key and as a value)."""
    from google.protobuf.descriptor import FieldDescriptor

    for name in path[:-1]:
        holder = getattr(message, name)
        message = holder.add() if message.DESCRIPTOR.fields_by_name[name].is_repeated else holder
    fd = message.DESCRIPTOR.fields_by_name[path[-1]]
    if fd.type == FieldDescriptor.TYPE_MESSAGE:  # map<string, string>
        getattr(message, fd.name)[value] = value
    elif fd.is_repeated:
        getattr(message, fd.name).append(value)
    else:
        setattr(message, fd.name, value)
