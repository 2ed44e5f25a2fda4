#!/usr/bin/env python3
"""Discovery benchmark: the VMA's Discover against plain pyVmomi on a simulated vCenter.

Starts the simulated vCenter (omalab/vcsim) with --vms VMs (2 disks each; the simulator gives every
third VM 2 NICs and the others 1) and a per-SOAP-call latency (default 1 ms, a network hop), starts
a VMA agent in this process, and measures in the same run:

  (a) Discover through the agent over gRPC, end to end (warm session: the first call, which also
      logs in, is reported separately);
  (b) one raw RetrievePropertiesEx through pyVmomi of the same property paths
      (vma_agent.integrations.vsphere.VM_PROPERTIES) over a container view;
  (c) the same properties read VM by VM through pyVmomi (one RetrievePropertiesEx per VM).

(a) and (b) are the median of --repeat interleaved rounds; (c) runs once. Every method must return
all VMs (checked). Prints the three times, ``vm-by-vm/discover``, ``vm-by-vm/raw`` and, last,
``ratio: X`` with X = (a)/(b). Goals: X <= 1.5 and (c)/(a) >= 10. Also shown: Discover of one VM
by exact name (names are read first, then only the match's properties).

    .venv/bin/python bench/discovery.py [--vms 1000] [--latency 1ms] [--repeat 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "clients" / "python"))

import grpc  # noqa: E402
from pyVim.connect import Disconnect  # noqa: E402
from pyVmomi import vim, vmodl  # noqa: E402
from vma.v1 import discovery_pb2, discovery_pb2_grpc, vcenter_pb2  # noqa: E402

from omalab.vcsim import VCSim  # noqa: E402
from vma_agent.config import Settings  # noqa: E402
from vma_agent.integrations.vsphere import VM_PROPERTIES  # noqa: E402
from vma_agent.server import build_server  # noqa: E402

PC = vmodl.query.PropertyCollector
TOKEN = "bench-token"


def raw_retrieve(si) -> list:
    """(b): one RetrievePropertiesEx (+ continuations) of VM_PROPERTIES for every VM."""
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=view, skip=True, selectSet=[
                PC.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)])],
            propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=list(VM_PROPERTIES))],
        )
        res = content.propertyCollector.RetrievePropertiesEx([spec], PC.RetrieveOptions())
        objects = list(res.objects)
        token = res.token
        while token:
            res = content.propertyCollector.ContinueRetrievePropertiesEx(token)
            objects += res.objects
            token = res.token
        return objects
    finally:
        view.DestroyView()


def vm_by_vm(si, vms: list) -> list:
    """(c): the same properties, one RetrievePropertiesEx per VM."""
    pc = si.RetrieveContent().propertyCollector
    out = []
    for vm in vms:
        spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=vm)],
                             propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=list(VM_PROPERTIES))])
        res = pc.RetrievePropertiesEx([spec], PC.RetrieveOptions())
        out += res.objects
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--latency", default="1ms", help="added to every SOAP call (Go duration)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    print(f"starting the simulated vCenter: {args.vms} VMs, 2 disks each, 1-2 NICs "
          f"(2 on every third VM), latency {args.latency} per SOAP call (models a network hop)", flush=True)
    t0 = time.monotonic()
    with VCSim(vms=args.vms, disks=2, latency=args.latency, datacenters=1, hosts=4, networks=2, dvpg=2) as sim:
        print(f"  simulator up in {time.monotonic() - t0:.1f}s at {sim.url}", flush=True)
        agent = build_server(Settings(listen="127.0.0.1:0", auth_token=TOKEN))
        channel = grpc.insecure_channel(f"127.0.0.1:{agent.port}", options=[
            ("grpc.max_receive_message_length", 256 << 20)])
        stub = discovery_pb2_grpc.DiscoveryServiceStub(channel)
        md = (("authorization", f"Bearer {TOKEN}"),)
        request = discovery_pb2.DiscoverRequest(connection=vcenter_pb2.VCenterConnection(
            host=sim.address, username=sim.username, password=sim.password, datacenter="DC0",
            thumbprint=sim.thumbprint_sha1))
        si = sim.connect()
        try:
            def discover():
                t = time.monotonic()
                resp = stub.Discover(request, metadata=md, timeout=300)
                return time.monotonic() - t, resp

            cold, resp = discover()
            assert len(resp.vms) == args.vms, f"Discover returned {len(resp.vms)} of {args.vms} VMs"
            times_a, times_b = [], []
            objects = []
            for _ in range(max(1, args.repeat)):
                dt_a, resp = discover()
                assert len(resp.vms) == args.vms, f"Discover returned {len(resp.vms)} of {args.vms} VMs"
                times_a.append(dt_a)
                t = time.monotonic()
                objects = raw_retrieve(si)
                times_b.append(time.monotonic() - t)
                assert len(objects) == args.vms, f"raw retrieval returned {len(objects)} of {args.vms} VMs"

            # same VMs, same disks and NICs in both answers
            by_name = {o.propSet[0].val if o.propSet[0].name == "name" else
                       next(p.val for p in o.propSet if p.name == "name"): o for o in objects}
            assert set(by_name) == {vm.name for vm in resp.vms}, "Discover and pyVmomi disagree on the VM names"
            for vm in resp.vms[:: max(1, args.vms // 50)]:
                props = {p.name: p.val for p in by_name[vm.name].propSet}
                devices = props["config.hardware.device"]
                disks = [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]
                nics = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
                assert [d.id for d in vm.disks] == [f"disk-{d.key}" for d in disks], vm.name
                assert [d.capacity_bytes for d in vm.disks] == [d.capacityInBytes for d in disks], vm.name
                assert [n.mac_address for n in vm.networks] == [n.macAddress for n in nics], vm.name
                assert vm.id == props["config.uuid"] and vm.power_state == props["runtime.powerState"], vm.name

            # one VM by exact name: names first, then the properties of the match only
            name = resp.vms[len(resp.vms) // 2].name
            by_name_request = discovery_pb2.DiscoverRequest(connection=request.connection, names=[name])
            times_d = []
            for _ in range(max(1, args.repeat)):
                t = time.monotonic()
                one = stub.Discover(by_name_request, metadata=md, timeout=60)
                times_d.append(time.monotonic() - t)
                assert [vm.name for vm in one.vms] == [name], "exact-name Discover returned the wrong VMs"

            t = time.monotonic()
            per_vm = vm_by_vm(si, [o.obj for o in objects])
            c = time.monotonic() - t
            assert len(per_vm) == args.vms, f"VM-by-VM read returned {len(per_vm)} of {args.vms} VMs"
        finally:
            Disconnect(si)
            channel.close()
            agent.stop(grace=None)

    a, b = statistics.median(times_a), statistics.median(times_b)
    print(f"VMs: {args.vms} (all returned by every method); latency per SOAP call: {args.latency}")
    print(f"(a) Discover via the agent over gRPC, end to end: {a:.3f}s "
          f"(median of {len(times_a)}: {', '.join(f'{x:.3f}' for x in times_a)}; "
          f"first call incl. login {cold:.3f}s)")
    print(f"(b) one raw RetrievePropertiesEx via pyVmomi, same property paths: {b:.3f}s "
          f"(median of {len(times_b)}: {', '.join(f'{x:.3f}' for x in times_b)})")
    print(f"(c) the same properties VM by VM (one RetrievePropertiesEx each): {c:.3f}s")
    print(f"    Discover of one VM by exact name among {args.vms}: {statistics.median(times_d):.3f}s "
          f"(median of {len(times_d)})")
    print(f"vm-by-vm/discover: {c / a:.1f} (goal >= 10)")
    print(f"vm-by-vm/raw: {c / b:.1f}")
    print(f"ratio: {a / b:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
