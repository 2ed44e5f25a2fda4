"""VMA PowerService and CBTService on a private simulated vCenter through a running agent over gRPC,
and the vSphere API the data mover uses (snapshots, snapshot disks with change ids, changed areas,
the CBT fault classes)."""
from __future__ import annotations

import os
import time

import grpc
import pytest
from vma.v1 import cbt_pb2, cbt_pb2_grpc, power_pb2, power_pb2_grpc, vcenter_pb2

from tests.fixtures.servers import VMA_TOKEN, start_vma
from tests.fixtures.vcsim import VCSim, VCSimError
from vma_agent import cbt, errors
from vma_agent.integrations import vsphere

MD = (("authorization", f"Bearer {VMA_TOKEN}"),)
MiB = 1 << 20
SHUTDOWN_DELAY = 2.0  # the simulated guest needs this long to shut down


@pytest.fixture(scope="module")
def sim():
    # vm-0000..0009 in one datacenter: vm-0003/0007 off, vm-0004 old tools, vm-0009 no tools;
    # vm-0000/0001 have data on their disks (64 MiB + 32 MiB)
    s = VCSim(vms=10, hosts=1, data_vms=2, disk_size="64MiB,32MiB", shutdown_delay=SHUTDOWN_DELAY)
    try:
        s.start()
    except VCSimError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def agent():
    with start_vma() as running:
        yield running


@pytest.fixture(scope="module")
def channel(agent):
    ch = grpc.insecure_channel(f"127.0.0.1:{agent.port}")
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def power(channel):
    return power_pb2_grpc.PowerServiceStub(channel)


@pytest.fixture(scope="module")
def cbt_stub(channel):
    return cbt_pb2_grpc.CBTServiceStub(channel)


@pytest.fixture(scope="module")
def session(sim):
    s = vsphere.connect(params(sim))
    yield s
    s.close()


def params(sim) -> vsphere.VCenterParams:
    return vsphere.VCenterParams(sim.address, sim.username, sim.password, thumbprint=sim.thumbprint_sha1)


def conn(sim, **kw) -> vcenter_pb2.VCenterConnection:
    values = dict(host=sim.address, username=sim.username, password=sim.password, datacenter="DC0",
                  thumbprint=sim.thumbprint_sha1)
    values.update(kw)
    return vcenter_pb2.VCenterConnection(**values)


def ref(sim, name: str, by: str = "path") -> vcenter_pb2.VMReference:
    m = sim.vm(name)
    return vcenter_pb2.VMReference(path=m["path"]) if by == "path" else vcenter_pb2.VMReference(moref=m["moref"])


def rpc_error(call, request, code) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(request, metadata=MD, timeout=60)
    assert info.value.code() == code, f"{info.value.code()}: {info.value.details()}"
    details = info.value.details() or ""
    assert "VMware1!" not in details
    return details


def state(power, sim, name: str) -> power_pb2.GetPowerStateResponse:
    return power.GetPowerState(power_pb2.GetPowerStateRequest(connection=conn(sim), vm=ref(sim, name)),
                               metadata=MD, timeout=60)


# ------------------------------------------------------------------------------------ power


def test_power_state_by_uuid_moref_and_path(power, sim):
    by_path = state(power, sim, "vm-0006")
    assert by_path.power_state == "poweredOn" and by_path.tools_status == "toolsOk"
    assert 3000 < by_path.uptime_seconds < 4000  # the simulator booted its VMs an hour ago
    assert by_path.last_state_change.seconds > 0 and by_path.timestamp.seconds > 0
    by_uuid = power.GetPowerState(power_pb2.GetPowerStateRequest(
        connection=conn(sim), vm=vcenter_pb2.VMReference(uuid=by_path.vm_id)), metadata=MD, timeout=60)
    by_moref = power.GetPowerState(power_pb2.GetPowerStateRequest(
        connection=conn(sim), vm=ref(sim, "vm-0006", "moref")), metadata=MD, timeout=60)
    assert by_uuid.vm_id == by_moref.vm_id == by_path.vm_id
    off = state(power, sim, "vm-0007")
    assert (off.power_state, off.tools_status, off.uptime_seconds) == ("poweredOff", "toolsNotRunning", 0)
    assert not off.HasField("last_state_change")
    assert state(power, sim, "vm-0009").tools_status == "toolsNotInstalled"


def test_unknown_vm_and_bad_references(power, sim):
    for vm in (vcenter_pb2.VMReference(uuid="00000000-1111-2222-3333-444444444444"),
               vcenter_pb2.VMReference(moref="vm-99999"), vcenter_pb2.VMReference(path="/DC0/vm/no-such-vm"),
               vcenter_pb2.VMReference(path="/DC0/vm/Folder1")):  # a folder is no VM
        details = rpc_error(power.GetPowerState, power_pb2.GetPowerStateRequest(connection=conn(sim), vm=vm),
                            grpc.StatusCode.NOT_FOUND)
        assert sim.address in details
    details = rpc_error(power.PowerOff, power_pb2.PowerOffRequest(connection=conn(sim)), grpc.StatusCode.INVALID_ARGUMENT)
    assert "vm.uuid" in details
    details = rpc_error(power.PowerOn, power_pb2.PowerOnRequest(connection=conn(sim, password=""), vm=ref(sim, "vm-0000")),
                        grpc.StatusCode.INVALID_ARGUMENT)
    assert "connection.password" in details
    details = rpc_error(power.GetPowerState, power_pb2.GetPowerStateRequest(
        connection=conn(sim, datacenter="Nowhere"), vm=ref(sim, "vm-0000")), grpc.StatusCode.NOT_FOUND)
    assert "Nowhere" in details


def power_off(power, sim, name, **kw) -> power_pb2.PowerOperationResult:
    return power.PowerOff(power_pb2.PowerOffRequest(connection=conn(sim), vm=ref(sim, name), **kw),
                          metadata=MD, timeout=120).result


def test_graceful_power_off_waits_for_the_guest(power, sim):
    r = power_off(power, sim, "vm-0000", timeout_seconds=30)
    assert r.success and r.method == "graceful" and r.operation == "power-off"
    assert (r.previous_state, r.new_state) == ("poweredOn", "poweredOff")
    assert r.duration_ms >= SHUTDOWN_DELAY * 1000 * 0.9  # reported only once the guest was off
    assert state(power, sim, "vm-0000").power_state == "poweredOff"
    again = power_off(power, sim, "vm-0000")
    assert again.success and again.method == "already-off" and again.new_state == "poweredOff"


def test_forced_power_off(power, sim):
    r = power_off(power, sim, "vm-0001", force=True)
    assert r.success and r.method == "forced" and r.new_state == "poweredOff"
    assert r.duration_ms < SHUTDOWN_DELAY * 1000
    # no VMware Tools: hard power-off even without force
    r = power_off(power, sim, "vm-0009")
    assert r.success and r.method == "forced" and r.new_state == "poweredOff" and "toolsNotInstalled" in r.message


def test_guest_too_slow_then_forced_or_reported(power, sim):
    r = power_off(power, sim, "vm-0002", timeout_seconds=1, force_after_timeout=True)
    assert r.success and r.method == "forced-after-timeout" and r.new_state == "poweredOff"
    r = power_off(power, sim, "vm-0005", timeout_seconds=1)
    assert not r.success and r.method == "graceful" and r.new_state == "poweredOn"  # the true state
    assert "still poweredOn" in r.message


def test_power_on(power, sim):
    r = power.PowerOn(power_pb2.PowerOnRequest(connection=conn(sim), vm=ref(sim, "vm-0003"), wait_for_tools=True),
                      metadata=MD, timeout=120).result
    assert r.success and r.operation == "power-on" and r.method == "power-on"
    assert (r.previous_state, r.new_state, r.tools_status) == ("poweredOff", "poweredOn", "toolsOk")
    again = power.PowerOn(power_pb2.PowerOnRequest(connection=conn(sim), vm=ref(sim, "vm-0003", "moref")),
                          metadata=MD, timeout=120).result
    assert again.success and again.method == "already-on" and again.new_state == "poweredOn"


# ------------------------------------------------------------------------------------ CBT


def cbt_status(cbt_stub, sim, name) -> cbt_pb2.GetCBTStatusResponse:
    return cbt_stub.GetCBTStatus(cbt_pb2.GetCBTStatusRequest(connection=conn(sim), vm=ref(sim, name)),
                                 metadata=MD, timeout=60)


def test_enable_cbt_activates_change_ids_on_every_disk(cbt_stub, sim, session):
    before = cbt_status(cbt_stub, sim, "vm-0008")
    assert not before.enabled and before.vm_name == "vm-0008" and before.vm_path == sim.vm("vm-0008")["path"]
    assert before.power_state == "poweredOn" and before.snapshot_count == 0
    assert [(d.disk_id, d.active) for d in before.disks] == [("disk-2000", False), ("disk-2001", False)]

    t0 = int(time.time())
    r = cbt_stub.EnableCBT(cbt_pb2.EnableCBTRequest(connection=conn(sim), vm=ref(sim, "vm-0008")),
                           metadata=MD, timeout=120)
    assert r.enabled and not r.already_enabled
    assert r.activation_snapshot.startswith("cbt-init-") and int(r.activation_snapshot[9:]) >= t0
    assert [d.disk_id for d in r.disks] == ["disk-2000", "disk-2001"]
    assert [d.label for d in r.disks] == ["Hard disk 1", "Hard disk 2"]
    for d in r.disks:
        assert d.active and d.change_id.startswith("52 ") and d.change_id.endswith("/1"), d

    after = cbt_status(cbt_stub, sim, "vm-0008")
    assert after.enabled and after.snapshot_count == 0  # the activation snapshot is gone
    vm = session.find_vm(vsphere.VMRef(path=sim.vm("vm-0008")["path"]))
    assert session.list_snapshots(vm) == []

    again = cbt_stub.EnableCBT(cbt_pb2.EnableCBTRequest(connection=conn(sim), vm=ref(sim, "vm-0008", "moref")),
                               metadata=MD, timeout=60)
    assert again.enabled and again.already_enabled and not again.activation_snapshot


def test_enable_cbt_refused_while_the_vm_has_snapshots(cbt_stub, sim, session):
    vm = session.find_vm(vsphere.VMRef(path=sim.vm("vm-0007")["path"]))
    snap = session.create_snapshot(vm, "before-upgrade")
    try:
        details = rpc_error(cbt_stub.EnableCBT, cbt_pb2.EnableCBTRequest(connection=conn(sim), vm=ref(sim, "vm-0007")),
                            grpc.StatusCode.FAILED_PRECONDITION)
        assert "snapshots: before-upgrade; remove them first" in details
        status = cbt_status(cbt_stub, sim, "vm-0007")
        assert not status.enabled and status.snapshot_count == 1
        # a VM with a snapshot tree reads the same through both answer parsers
        fast = session.vm_record(vm)
        session.fast_parse = False
        try:
            slow = session.vm_record(vm)
        finally:
            session.fast_parse = True
        assert fast == slow and [s.name for s in fast.snapshots] == ["before-upgrade"]
        assert fast.current_snapshot == snap.moref
    finally:
        session.remove_snapshot(snap)
    details = rpc_error(cbt_stub.GetCBTStatus, cbt_pb2.GetCBTStatusRequest(connection=conn(sim)),
                        grpc.StatusCode.INVALID_ARGUMENT)
    assert "vm.uuid" in details


# ------------------------------------------------------------------------------------ data mover API


def test_data_mover_snapshot_and_changed_areas(sim, session):
    name = sim.data_vms[0]  # vm-0000: data with holes on both disks
    vm = session.find_vm(vsphere.VMRef(path=sim.vm(name)["path"]), "DC0")
    assert vm.moref == sim.vm(name)["moref"]
    record = session.vm_record(vm)
    assert not record.cbt_enabled and record.path == sim.vm(name)["path"]

    # CBT off: the query fault is one the data mover catches to copy everything
    snap0 = session.create_snapshot(vm, "srep-job-0")
    with pytest.raises(vsphere.ChangeTrackingNotActive) as info:
        session.query_changed_areas(vm, snap0, 2000, "*", sim.disk_capacity(name, 0))
    assert isinstance(info.value, vsphere.ChangeTrackingUnusable) and info.value.code == "FAILED_PRECONDITION"
    assert [d.change_id for d in session.snapshot_disks(snap0)] == ["", ""]
    session.remove_snapshot(snap0)

    result = cbt.enable_cbt(session, vm=vm)
    assert result.enabled and all(d.active for d in result.disks)

    snap1 = session.create_snapshot(vm, "srep-job-1")
    assert session.find_snapshot(vm, "srep-job-1") == snap1 and snap1.moref.startswith("snapshot-")
    disks = session.snapshot_disks(snap1)
    assert [(d.key, d.capacity_bytes) for d in disks] == [(2000, 64 * MiB), (2001, 32 * MiB)]
    # frozen copies; sequence 2: the activation snapshot of enable_cbt was the first with CBT on
    assert all(d.file_name.endswith("-snap-3.vmdk") and d.change_id.endswith("/2") for d in disks), disks
    block = sim.cbt_block_size
    full = session.query_changed_areas(vm, snap1, 2000, "*", disks[0].capacity_bytes)
    assert full and all(length > 0 and off % block == 0 for off, length in full)
    assert sum(length for _, length in full) < disks[0].capacity_bytes  # holes are not reported

    sim.guest_write(name, 0, 5 * MiB + 100, os.urandom(4096))
    sim.guest_write(name, 0, disks[0].capacity_bytes - 4096, b"\x01" * 4096)
    snap2 = session.create_snapshot(vm, "srep-job-2")
    disks2 = {d.key: d for d in session.snapshot_disks(snap2)}
    changed = session.query_changed_areas(vm, snap2, 2000, disks[0].change_id, disks2[2000].capacity_bytes)
    covered = set()
    for off, length in changed:
        covered.update(range(off // block, (off + length - 1) // block + 1))
    expected = {(5 * MiB + 100) // block, (5 * MiB + 100 + 4095) // block, (disks[0].capacity_bytes - 1) // block}
    assert covered == expected
    assert session.query_changed_areas(vm, snap2, 2001, disks[1].change_id, disks2[2001].capacity_bytes) == []
    # paging from an offset: only what lies beyond it
    tail = session.query_changed_areas(vm, snap2, 2000, disks[0].change_id, disks2[2000].capacity_bytes,
                                       start_offset=32 * MiB)
    assert tail == [a for a in changed if a[0] >= 32 * MiB]

    for bad in ("garbage", disks[0].change_id.rsplit("/", 1)[0] + "/99", disks[1].change_id):
        with pytest.raises(vsphere.InvalidChangeId):
            session.query_changed_areas(vm, snap2, 2000, bad, disks2[2000].capacity_bytes)

    assert [s.name for s in session.list_snapshots(vm)] == ["srep-job-1", "srep-job-2"]
    session.remove_snapshot(snap1)
    session.remove_snapshot(snap2.moref)
    assert session.list_snapshots(vm) == []


def test_session_keepalive_and_relogin(sim):
    s = vsphere.connect(params(sim))
    try:
        s.start_keepalive(interval=0.05)
        time.sleep(0.2)
        s._conn.content.sessionManager.Logout()  # expired behind our back
        vm = s.find_vm(vsphere.VMRef(path=sim.vm("vm-0006")["path"]))
        assert s.power_state(vm).power_state == "poweredOn" and s.logins == 2
    finally:
        s.close()
    with pytest.raises(errors.FailedPrecondition):
        s.power_state(vm)
