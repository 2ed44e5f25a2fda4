"""The local lab: every real part of a migration wired together on one machine.

    simulated vCenter (govmomi simulator, raw disk files)  ←  VMA agent (nbdkit file over the datastores)
    CloudStack emulator (volumes are sparse files, attached ones appear in a by-id folder)
    OMA server (SQLite or MariaDB) with a saved vCenter credential and an active CloudStack config

All in this process (the servers on free ports, the simulator and nothing else as child processes), for
the end-to-end tests (fixtures ``lab``/``lab_private`` in ``tests/fixtures/lab.py``). With
``vma_process=True`` the VMA is a real ``vma-agent`` child process instead (``omalab.vma_process``), so a
test can SIGKILL it and start it again on the same port and work dir; with ``oma_process=True`` (needs
``db_url``, the database ``existing_database`` is bound to) the OMA is a real ``oma-server`` process
(``omalab.oma_process``) the same way: fixed port, same database, data dir and instance name. The demo
(``scripts/lab``, ``omalab/demo.py``) runs the same parts as separate processes instead, as an operator
would, and shares the parts themselves and ``sha256_prefix`` with this module.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from oma.v1 import ossea_config_pb2, vmware_credentials_pb2

from oma_server.server import RunningServer
from omaclient.client import OmaClient
from omalab.checksums import sha256_prefix
from omalab.cloudstack_emulator import CloudStackEmulator, local_mac
from omalab.oma_process import OmaProcess
from omalab.servers import ADMIN_PASSWORD, start_oma, start_vma
from omalab.vcsim import VCSim
from omalab.vma_process import VmaProcess
from vma_agent.server import RunningAgent

__all__ = ["Lab", "nbd_port_range", "sha256_prefix", "start_lab"]


@dataclass
class Lab:
    vcenter: VCSim
    cloudstack: CloudStackEmulator
    vma: RunningAgent | VmaProcess
    oma: RunningServer | OmaProcess
    client: OmaClient
    credential_id: int
    ossea_config_id: int

    def vm_names(self) -> list[str]:
        """VMs of the datacenter the lab's credential points at."""
        datacenter = self.vcenter.datacenters[0]
        return [v["name"] for v in self.vcenter.manifest["vms"] if v["datacenter"] == datacenter]

    def volume_file(self, volume_uuid: str) -> Path:
        return Path(self.cloudstack.volume_path(volume_uuid))


def nbd_port_range() -> tuple[int, int]:
    """NBD export ports of this test process: parallel pytest workers get disjoint ranges, so two
    labs never race for a port (an export answering on another lab's port would be a wrong target)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        # Not under xdist (one test module run by hand while a full suite runs): a range of its own, away
        # from the workers' ranges, so the hand-run lab never takes over a port of the suite's labs.
        start = 30000 + 400 * (os.getpid() % 50)
        return start, start + 399
    index = int(worker.removeprefix("gw")) if worker.removeprefix("gw").isdigit() else 0
    start = 20000 + 400 * index
    return start, start + 399


@contextlib.contextmanager
def start_lab(work: Path, *, existing_database: Any = None, db_url: str | None = None,
              vcenter: VCSim | None = None, vms: int = 4, data_vms: int = 2, disk_size: str = "64MiB",
              job_delay: float = 0.05, oma_settings: dict[str, Any] | None = None,
              vma_settings: dict[str, Any] | None = None, vma_process: bool = False,
              oma_process: bool = False) -> Iterator[Lab]:
    with contextlib.ExitStack() as stack:
        if vcenter is None:
            vcenter = stack.enter_context(VCSim(vms=vms, data_vms=data_vms, disks=2, disk_size=disk_size))
        cloudstack = stack.enter_context(CloudStackEmulator(work / "cloudstack", oma_mac=local_mac(),
                                                            job_delay=job_delay))
        datastores = ",".join(f"{name}={folder}" for name, folder in vcenter.datastores.items())
        agent_settings = {"source_mode": "file", "datastore_map": datastores, "work_dir": work / "vma",
                          "progress_interval_seconds": 0.2, **(vma_settings or {})}
        vma = stack.enter_context(VmaProcess(**agent_settings) if vma_process else start_vma(**agent_settings))
        ports = nbd_port_range()
        settings = {
            "vma_address": f"127.0.0.1:{vma.port}", "device_dir": Path(cloudstack.byid_dir),
            "device_wait_seconds": 10.0, "replica_extra_gib": 0, "nbd_port_min": ports[0], "nbd_port_max": ports[1],
            **({"db_url": db_url} if db_url else {}), **(oma_settings or {}),
        }
        if oma_process:
            assert db_url, "an OMA process needs the database's URL"
            oma = stack.enter_context(OmaProcess(work / "oma", **settings))
        else:
            oma = stack.enter_context(start_oma(work / "oma", existing_database, **settings))
        client = OmaClient(f"127.0.0.1:{oma.port}", token="")
        stack.callback(client.close)
        client.login("admin", ADMIN_PASSWORD)
        credential = client.credentials.CreateCredential(vmware_credentials_pb2.CreateCredentialRequest(
            credential_name="lab-vcenter", vcenter_host=vcenter.address, username=vcenter.username,
            password=vcenter.password, datacenter=vcenter.datacenters[0], is_default=True,
            tls_thumbprint=vcenter.thumbprint_sha1), timeout=10).credential
        config = client.ossea.CreateConfig(ossea_config_pb2.CreateConfigRequest(
            name="lab-cloudstack", api_url=cloudstack.url, api_key=cloudstack.api_key,
            secret_key=cloudstack.secret_key, zone=cloudstack.zone_id, disk_offering_id=cloudstack.disk_offering_id,
            oma_vm_id=cloudstack.oma_vm_id, service_offering_id=cloudstack.service_offering_id,
            network_id=cloudstack.network_id), timeout=10).config
        yield Lab(vcenter, cloudstack, vma, oma, client, credential.id, config.id)
