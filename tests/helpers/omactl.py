"""omactl's exit codes (100 + the gRPC status code), VM contexts and disks written straight into the database
for it to show, and the rows of its tables."""
from __future__ import annotations

from oma_server.db.models import VmDisk, VmReplicationContext

EXIT_NOT_FOUND = 105


EXIT_ALREADY_EXISTS = 106


EXIT_FAILED_PRECONDITION = 109


EXIT_UNIMPLEMENTED = 112


EXIT_UNAUTHENTICATED = 116


def add_vm(name: str, **values) -> VmReplicationContext:
    defaults = {"vmware_vm_id": f"4210-{name}", "vm_path": f"/DC1/vm/{name}", "vcenter_host": "vc.lab",
                "datacenter": "DC1", "cpu_count": 2, "memory_mb": 4096, "os_type": "linux",
                "power_state": "poweredOn"}
    return VmReplicationContext.create(vm_name=name, **{**defaults, **values})


def add_disk(ctx: VmReplicationContext, key: int, size_gb: int, networks: tuple[str, ...] = ()) -> VmDisk:
    return VmDisk.create(
        vm_context=ctx, disk_id=f"disk-{key}", vmdk_path=f"[ds1] {ctx.vm_name}/{ctx.vm_name}_{key}.vmdk",
        size_gb=size_gb, capacity_bytes=size_gb * 1024**3, datastore="ds1", unit_number=key - 2000,
        label=f"Hard disk {key - 1999}", provisioning_type="thin",
        network_config=[{"network_name": n} for n in networks],
    )


def table_rows(text: str) -> list[list[str]]:
    """Rows of an omactl table (header included) split on the two-space column gap."""
    return [[cell.strip() for cell in line.split("  ") if cell.strip()] for line in text.strip().splitlines()]
