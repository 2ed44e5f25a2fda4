"""The simulated vCenter (omalab/vcsim) seen through pyVmomi, like the VMA sees a real vCenter."""
from __future__ import annotations

import hashlib
import os
import random
import ssl
import time

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from tests.fixtures.vcsim import VCSim

PC = vmodl.query.PropertyCollector
MiB = 1 << 20


# ----------------------------------------------------------------------------- helpers


def retrieve(si, kind, props, root=None):
    """{obj: {prop: value}} for all objects of ``kind`` via one RetrievePropertiesEx (+ continue)."""
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(root or content.rootFolder, [kind], True)
    try:
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=view, skip=True, selectSet=[
                PC.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)])],
            propSet=[PC.PropertySpec(type=kind, pathSet=list(props))],
        )
        res = content.propertyCollector.RetrievePropertiesEx([spec], PC.RetrieveOptions())
        objs = list(res.objects)
        token = res.token
        while token:
            res = content.propertyCollector.ContinueRetrievePropertiesEx(token)
            objs += res.objects
            token = res.token
        return {o.obj: {p.name: p.val for p in o.propSet} for o in objs}
    finally:
        view.DestroyView()


def vm_by_name(si, name):
    for obj, props in retrieve(si, vim.VirtualMachine, ["name"]).items():
        if props["name"] == name:
            return obj
    raise LookupError(name)


def disks_of(config):
    return [d for d in config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]


def data_extents(path, size=None):
    """[(start, end)] data extents of a file via SEEK_DATA/SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = size if size is not None else os.fstat(fd).st_size
        off = 0
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            out.append((data, hole))
            off = hole
    finally:
        os.close(fd)
    return out


def blocks_of_ranges(ranges, block):
    """Set of block indexes touched by [(start, end)] byte ranges."""
    out = set()
    for s, e in ranges:
        out.update(range(s // block, (e + block - 1) // block))
    return out


def blocks_of_areas(info, block):
    out = set()
    for a in info.changedArea or []:
        assert a.start % block == 0 or a.start == info.startOffset, a
        out.update(range(a.start // block, (a.start + a.length + block - 1) // block))
    return out


def query_all(vm, snapshot, key, change_id, capacity):
    """QueryChangedDiskAreas paged over the whole disk, like a backup tool does."""
    areas, start, calls = [], 0, 0
    while start < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snapshot, deviceKey=key, startOffset=start, changeId=change_id)
        calls += 1
        assert info.startOffset == start and info.length > 0
        for a in info.changedArea or []:
            assert start <= a.start and a.start + a.length <= start + info.length
        areas += [(a.start, a.start + a.length) for a in info.changedArea or []]
        start = info.startOffset + info.length
    return areas, calls


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def reconfigure_cbt(vm, enabled):
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=enabled)))


def snapshot(vm, name):
    task = vm.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=False)
    WaitForTask(task)
    return task.info.result


@pytest.fixture
def cbt_sim(vcsim_factory) -> VCSim:
    """A private small simulator for tests that change VM state."""
    return vcsim_factory(vms=4, hosts=1, data_vms=2, disk_size="64MiB,32MiB")


@pytest.fixture
def cbt_si(cbt_sim):
    si = cbt_sim.connect()
    yield si
    Disconnect(si)


# ----------------------------------------------------------------------------- login / TLS


def test_login_ok_and_about(vcsim):
    si = vcsim.connect()
    try:
        about = si.RetrieveContent().about
        assert about.apiType == "VirtualCenter"
        assert si.RetrieveContent().sessionManager.currentSession.userName == vcsim.username
    finally:
        Disconnect(si)


def test_bad_password_gets_invalid_login(vcsim):
    with pytest.raises(vim.fault.InvalidLogin):
        SmartConnect(host=vcsim.host, port=vcsim.port, user=vcsim.username, pwd="wrong",
                     disableSslCertValidation=True)


def test_start_line_and_tls_thumbprints(vcsim):
    assert vcsim.url == f"https://127.0.0.1:{vcsim.port}/sdk"
    assert vcsim.datacenters == ["DC0", "DC1"]
    assert set(vcsim.datastores) == {"LocalDS_0", "LocalDS_1"}
    assert all(p.is_dir() for p in vcsim.datastores.values())
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((vcsim.host, vcsim.port)))
    sha1 = ":".join(f"{b:02X}" for b in hashlib.sha1(der).digest())
    sha256 = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    assert vcsim.thumbprint_sha1 == sha1 and len(sha1) == 59
    assert vcsim.thumbprint_sha256 == sha256
    si = vcsim.connect(verify=True)  # certificate validates against cert_file
    Disconnect(si)


# ----------------------------------------------------------------------------- inventory


def test_inventory_via_retrieve_properties_ex(vcsim):
    si = vcsim.connect()
    try:
        vms = retrieve(si, vim.VirtualMachine, ["name", "config", "runtime", "guest", "parent"])
        assert sorted(p["name"] for p in vms.values()) == sorted(vcsim.vm_names())
        assert len(vms) == 10
        guest_ids = {p["config"].guestId for p in vms.values()}
        assert any(g.startswith("windows") for g in guest_ids)
        assert any(not g.startswith("windows") for g in guest_ids)
        states = {p["runtime"].powerState for p in vms.values()}
        assert {"poweredOn", "poweredOff"} <= states
        tools = {p["guest"].toolsRunningStatus for p in vms.values()}
        assert {"guestToolsRunning", "guestToolsNotRunning"} <= tools
        backings = set()
        for obj, p in vms.items():
            m = vcsim.vm(p["name"])
            assert obj._moId == m["moref"]
            cfg = p["config"]
            assert cfg.changeTrackingEnabled is False
            disks = disks_of(cfg)
            assert [d.key for d in disks] == [2000, 2001]
            assert [d.unitNumber for d in disks] == [0, 1]
            assert {d.controllerKey for d in disks} == {1000}
            for d in disks:
                assert isinstance(d.backing, vim.vm.device.VirtualDisk.FlatVer2BackingInfo)
                assert d.capacityInBytes == 64 * MiB and d.capacityInKB == 64 * 1024
            for nic in cfg.hardware.device:
                if isinstance(nic, vim.vm.device.VirtualEthernetCard):
                    backings.add(type(nic.backing).__name__)
            if p["runtime"].powerState == "poweredOn" and m["tools"] != "none":
                assert p["guest"].ipAddress == m["ip"]
        assert {d.backing.thinProvisioned for p in vms.values() for d in disks_of(p["config"])} == {True, False}
        assert backings == {"vim.vm.device.VirtualEthernetCard.NetworkBackingInfo",
                            "vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo"}
        # nested folders: /DC0/vm/Folder1/Nested1/<vm>
        index = si.RetrieveContent().searchIndex
        nested = [v for v in vcsim.manifest["vms"] if "/Folder1/Nested1/" in v["path"]]
        assert nested
        for v in vcsim.manifest["vms"]:
            found = index.FindByInventoryPath(v["path"])
            assert found is not None and found._moId == v["moref"], v["path"]
    finally:
        Disconnect(si)


def test_unset_property_reads_as_none(vcsim):
    si = vcsim.connect()
    try:
        vm = vm_by_name(si, vcsim.vm_names()[0])
        assert vm.snapshot is None  # Fetch of an unset property (the stock simulator panics)
        assert vm.name == vcsim.vm_names()[0]  # the connection survived
    finally:
        Disconnect(si)


def test_disks_are_sparse_raw_files(vcsim):
    for name in vcsim.vm_names():
        m = vcsim.vm(name)
        for d in m["disks"]:
            path = vcsim.disk_file(name, d["index"])
            assert path == vcsim.disk_file(name, d["key"]) == vcsim.disk_file(name, f"disk-{d['key']}")
            assert path.name == (f"{name}.vmdk" if d["index"] == 0 else f"{name}_{d['index']}.vmdk")
            assert path.parent == vcsim.datastores[m["datastore"]] / name
            assert vcsim.datastore_path(d["file_name"]) == path
            st = path.stat()
            assert st.st_size == d["capacity"] == 64 * MiB
            extents = data_extents(path)
            if name in vcsim.data_vms:
                allocated = sum(e - s for s, e in extents)
                assert 0 < allocated < st.st_size // 2, "data VMs have data and holes"
            else:
                assert extents == [] and st.st_blocks == 0
    # deterministic content: the same seed gives the same data
    d0 = vcsim.disk_file(vcsim.data_vms[0], 0)
    with open(d0, "rb") as f:
        assert any(f.read(MiB))


# ----------------------------------------------------------------------------- CBT


def test_query_before_cbt_enabled_faults(cbt_sim, cbt_si):
    vm = vm_by_name(cbt_si, cbt_sim.data_vms[0])
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=None, deviceKey=2000, startOffset=0, changeId="*")
    snap = snapshot(vm, "no-cbt")
    d = disks_of(snap.config)[0]
    assert not d.backing.changeId  # CBT off: no change id
    assert cbt_sim.datastore_path(d.backing.fileName).is_file()
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=2000, startOffset=0, changeId="*")


def test_cbt_full_then_incremental_is_exact(cbt_sim, cbt_si):
    name = cbt_sim.data_vms[0]
    vm = vm_by_name(cbt_si, name)
    block = cbt_sim.cbt_block_size
    live = cbt_sim.disk_file(name, 2000)
    capacity = cbt_sim.disk_capacity(name, 2000)

    reconfigure_cbt(vm, True)
    assert vm.config.changeTrackingEnabled is True
    original = sha256_file(live)
    s1 = snapshot(vm, "s1")

    # the snapshot's disks point at frozen copies with change ids; the VM keeps the base file
    s1_disks = {d.key: d for d in disks_of(s1.config)}
    vm_disks = {d.key: d for d in disks_of(vm.config)}
    assert set(s1_disks) == set(vm_disks) == {2000, 2001}
    for key, d in s1_disks.items():
        assert d.backing.fileName.endswith("-snap-1.vmdk")
        assert vm_disks[key].backing.fileName == cbt_sim.vm(name)["disks"][key - 2000]["file_name"]
        uuid_part, _, seq = d.backing.changeId.rpartition("/")
        assert seq == "1" and uuid_part.startswith("52 ") and len(uuid_part) == 47
    frozen1 = cbt_sim.datastore_path(s1_disks[2000].backing.fileName)
    assert frozen1.parent == live.parent and sha256_file(frozen1) == original
    assert data_extents(frozen1) == data_extents(live)  # sparse copy: holes stay holes
    cid1 = s1_disks[2000].backing.changeId

    # "*": all allocated areas = the data extents of the frozen file, block-rounded
    full, _ = query_all(vm, s1, 2000, "*", capacity)
    assert blocks_of_ranges(full, block) == blocks_of_ranges(data_extents(frozen1), block)
    assert sum(e - s for s, e in full) < capacity // 2  # holes are not reported

    # guest writes between the snapshots: in a hole, inside data, unaligned across a block
    # boundary, and at the very end of the disk
    offsets = [3 * MiB + 4096, 512 * 1024, 100 * block - 2048, capacity - 4096]
    rnd = random.Random(7)
    for off in offsets:
        cbt_sim.guest_write(name, 2000, off, rnd.randbytes(4096))
    at_s2 = sha256_file(live)
    s2 = snapshot(vm, "s2")
    s2_disk = {d.key: d for d in disks_of(s2.config)}[2000]
    assert s2_disk.backing.changeId == cid1.rsplit("/", 1)[0] + "/2"
    frozen2 = cbt_sim.datastore_path(s2_disk.backing.fileName)

    changed, _ = query_all(vm, s2, 2000, cid1, capacity)
    expected = blocks_of_ranges([(o, o + 4096) for o in offsets], block)
    assert blocks_of_ranges(changed, block) == expected
    assert len(expected) == 5  # the unaligned write spans two blocks
    # the other disk did not change
    cid1_b = s1_disks[2001].backing.changeId
    assert query_all(vm, s2, 2001, cid1_b, cbt_sim.disk_capacity(name, 2001))[0] == []

    # the frozen snapshot-2 file is the disk as it was at snapshot time
    cbt_sim.guest_write(name, 2000, 10 * MiB, b"\xff" * 4096)
    assert sha256_file(frozen2) == at_s2 != sha256_file(live)
    assert sha256_file(frozen1) == original

    # RemoveSnapshot: plain pyVmomi task waiting works; the visible frozen file goes away
    task = s1.RemoveSnapshot_Task(removeChildren=False)
    WaitForTask(task)
    assert task.info.entity == vm
    assert not frozen1.exists()
    tree = vm.snapshot.rootSnapshotList
    assert [t.name for t in tree] == ["s2"]
    # change ids outlive their snapshot
    assert blocks_of_ranges(query_all(vm, s2, 2000, cid1, capacity)[0], block) == expected

    # a third snapshot: since s2 only the newest write; since s1 the union
    s3 = snapshot(vm, "s3")
    cid2 = s2_disk.backing.changeId
    assert blocks_of_ranges(query_all(vm, s3, 2000, cid2, capacity)[0], block) == {10 * MiB // block}
    assert blocks_of_ranges(query_all(vm, s3, 2000, cid1, capacity)[0], block) == expected | {10 * MiB // block}
    # same change id as the snapshot's own: nothing changed
    cid3 = {d.key: d for d in disks_of(s3.config)}[2000].backing.changeId
    assert query_all(vm, s3, 2000, cid3, capacity)[0] == []


def test_cbt_reset_invalidates_old_change_ids(cbt_sim, cbt_si):
    vm = vm_by_name(cbt_si, cbt_sim.data_vms[1])
    capacity = cbt_sim.disk_capacity(cbt_sim.data_vms[1], 0)
    reconfigure_cbt(vm, True)
    s1 = snapshot(vm, "s1")
    cid1 = disks_of(s1.config)[0].backing.changeId
    s2 = snapshot(vm, "s2")
    vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=2000, startOffset=0, changeId=cid1)

    reconfigure_cbt(vm, False)
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=2000, startOffset=0, changeId=cid1)
    reconfigure_cbt(vm, True)
    s3 = snapshot(vm, "s3")
    cid3 = disks_of(s3.config)[0].backing.changeId
    assert cid3.rsplit("/", 1)[0] != cid1.rsplit("/", 1)[0] and cid3.endswith("/1")
    with pytest.raises(vmodl.fault.InvalidArgument):
        vm.QueryChangedDiskAreas(snapshot=s3, deviceKey=2000, startOffset=0, changeId=cid1)
    # a full query against the new snapshot still works
    assert query_all(vm, s3, 2000, "*", capacity)[0]


def test_query_faults(cbt_sim, cbt_si):
    vm = vm_by_name(cbt_si, cbt_sim.data_vms[0])
    other = vm_by_name(cbt_si, cbt_sim.data_vms[1])
    reconfigure_cbt(vm, True)
    reconfigure_cbt(other, True)
    s1 = snapshot(vm, "s1")
    s_other = snapshot(other, "x")
    cid = disks_of(s1.config)[0].backing.changeId
    bad = [
        {"snapshot": s1, "deviceKey": 2000, "startOffset": 0, "changeId": "garbage"},
        {"snapshot": s1, "deviceKey": 2000, "startOffset": 0, "changeId": cid.rsplit("/", 1)[0] + "/99"},
        {"snapshot": s1, "deviceKey": 2000, "startOffset": 0,
         "changeId": "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/1"},
        {"snapshot": s1, "deviceKey": 2001, "startOffset": 0, "changeId": cid},  # disk 2000's id for 2001
        {"snapshot": s1, "deviceKey": 2999, "startOffset": 0, "changeId": "*"},
        {"snapshot": s_other, "deviceKey": 2000, "startOffset": 0, "changeId": "*"},
        {"snapshot": s1, "deviceKey": 2000, "startOffset": 1 << 40, "changeId": "*"},
        {"snapshot": s1, "deviceKey": 2000, "startOffset": -1, "changeId": "*"},
    ]
    for kwargs in bad:
        with pytest.raises(vmodl.fault.InvalidArgument):
            vm.QueryChangedDiskAreas(**kwargs)
    # the second disk is 32 MiB (disk_size="64MiB,32MiB")
    info = vm.QueryChangedDiskAreas(snapshot=s1, deviceKey=2001, startOffset=0, changeId="*")
    assert info.startOffset + info.length == 32 * MiB
    # unauthenticated callers get NotAuthenticated
    si2 = cbt_sim.connect()
    vm2 = vm_by_name(si2, cbt_sim.data_vms[0])
    si2.content.sessionManager.Logout()
    with pytest.raises(vim.fault.NotAuthenticated):
        vm2.QueryChangedDiskAreas(snapshot=s1, deviceKey=2000, startOffset=0, changeId="*")


def test_query_pages_like_vsphere(vcsim_factory):
    sim = vcsim_factory(vms=1, hosts=1, data_vms=1, cbt_max_areas=3, cbt_max_length="16MiB")
    si = sim.connect()
    try:
        vm = vm_by_name(si, sim.data_vms[0])
        reconfigure_cbt(vm, True)
        s1 = snapshot(vm, "s1")
        capacity = sim.disk_capacity(sim.data_vms[0], 0)
        areas, calls = query_all(vm, s1, 2000, "*", capacity)
        assert calls > capacity // (16 * MiB)
        frozen = sim.datastore_path(disks_of(s1.config)[0].backing.fileName)
        block = sim.cbt_block_size
        assert blocks_of_ranges(areas, block) == blocks_of_ranges(data_extents(frozen), block)
    finally:
        Disconnect(si)


def test_live_disk_query_without_snapshot(cbt_sim, cbt_si):
    name = cbt_sim.data_vms[0]
    vm = vm_by_name(cbt_si, name)
    block = cbt_sim.cbt_block_size
    reconfigure_cbt(vm, True)
    s1 = snapshot(vm, "s1")
    cid = disks_of(s1.config)[0].backing.changeId
    cbt_sim.guest_write(name, 0, 20 * MiB, os.urandom(4096))
    info = vm.QueryChangedDiskAreas(snapshot=None, deviceKey=2000, startOffset=0, changeId=cid)
    assert blocks_of_areas(info, block) == {20 * MiB // block}


# ----------------------------------------------------------------------------- power / tasks


def test_power_operations_and_guest_state(cbt_sim, cbt_si):
    vms = {m["name"]: m for m in cbt_sim.manifest["vms"]}
    on = next(n for n, m in vms.items() if m["power_state"] == "poweredOn" and m["tools"] != "none")
    vm = vm_by_name(cbt_si, on)
    vm.ShutdownGuest()
    props = retrieve(cbt_si, vim.VirtualMachine, ["runtime.powerState", "guest.toolsRunningStatus", "guest.ipAddress"])[vm]
    assert props["runtime.powerState"] == "poweredOff"
    assert props["guest.toolsRunningStatus"] == "guestToolsNotRunning" and not props.get("guest.ipAddress")
    WaitForTask(vm.PowerOnVM_Task())
    assert vm.runtime.powerState == "poweredOn"
    assert vm.guest.toolsRunningStatus == "guestToolsRunning" and vm.guest.ipAddress == vms[on]["ip"]
    WaitForTask(vm.PowerOffVM_Task())
    assert vm.runtime.powerState == "poweredOff" and vm.guest.toolsStatus == "toolsNotRunning"
    with pytest.raises(vim.fault.InvalidPowerState):
        vm.ShutdownGuest()


def test_shutdown_guest_needs_tools(vcsim_factory):
    sim = vcsim_factory(vms=10, hosts=1)
    no_tools = [m for m in sim.manifest["vms"] if m["tools"] == "none" and m["power_state"] == "poweredOn"]
    assert no_tools
    si = sim.connect()
    try:
        vm = vm_by_name(si, no_tools[0]["name"])
        with pytest.raises(vim.fault.ToolsUnavailable):
            vm.ShutdownGuest()
        WaitForTask(vm.PowerOffVM_Task())  # hard power off still works
        assert vm.runtime.powerState == "poweredOff"
    finally:
        Disconnect(si)


def test_latency_flag(vcsim_factory):
    sim = vcsim_factory(vms=1, hosts=1, latency=0.05)
    si = sim.connect()
    try:
        t0 = time.monotonic()
        for _ in range(4):
            si.CurrentTime()
        assert time.monotonic() - t0 >= 0.2
    finally:
        Disconnect(si)


def test_scales_to_2000_vms(vcsim_factory):
    t0 = time.monotonic()
    sim = vcsim_factory(vms=2000, datacenters=2, clusters=2, hosts=4, data_vms=1)
    started = time.monotonic() - t0
    assert started < 45, f"2000 VMs took {started:.1f}s to start"
    si = sim.connect()
    try:
        vms = retrieve(si, vim.VirtualMachine, ["name", "runtime.powerState"])
        assert len(vms) == 2000
        assert len({p["name"] for p in vms.values()}) == 2000
    finally:
        Disconnect(si)
    m = sim.vm(sim.vm_names()[-1])
    assert sim.disk_file(m["name"], 1).stat().st_size == 64 * MiB
