"""VMA DiscoveryService on the simulated vCenter, through a running agent over gRPC: every VM with
all its fields, filters, folders and exact names, TLS pinning, login and reachability errors,
session reuse; and the vSphere integration's two answer parsers agreeing with each other."""
from __future__ import annotations

import dataclasses
import re
import socket

import grpc
import pytest
from vma.v1 import discovery_pb2, discovery_pb2_grpc, vcenter_pb2

from tests.fixtures.servers import VMA_TOKEN, start_vma
from vma_agent.integrations import vsphere
from vma_agent.integrations.vsphere import properties as vsphere_properties

MD = (("authorization", f"Bearer {VMA_TOKEN}"),)
WRONG_PASSWORD = "Wr0ng-S3cret-pw!"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MiB = 1 << 20


@pytest.fixture(scope="module")
def agent():
    with start_vma() as running:
        yield running


@pytest.fixture(scope="module")
def stub(agent):
    channel = grpc.insecure_channel(f"127.0.0.1:{agent.port}",
                                    options=[("grpc.max_receive_message_length", 64 << 20)])
    yield discovery_pb2_grpc.DiscoveryServiceStub(channel)
    channel.close()


def conn(sim, **overrides) -> vcenter_pb2.VCenterConnection:
    values = dict(host=sim.address, username=sim.username, password=sim.password, datacenter="DC0",
                  thumbprint=sim.thumbprint_sha1)
    values.update(overrides)
    return vcenter_pb2.VCenterConnection(**values)


def discover(stub, sim, *, filter="", folder="", names=(), **conn_overrides) -> discovery_pb2.DiscoverResponse:
    return stub.Discover(discovery_pb2.DiscoverRequest(
        connection=conn(sim, **conn_overrides), filter=filter, folder=folder, names=list(names)),
        metadata=MD, timeout=60)


def rpc_error(call, request, code, *secrets: str) -> str:
    """The details of the expected gRPC error; no password may appear in them."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, metadata=MD, timeout=60)
    err = info.value
    assert err.code() == code, f"{err.code()}: {err.details()}"
    details = err.details() or ""
    for secret in ("VMware1!", WRONG_PASSWORD, *secrets):
        assert secret not in details, details
    return details


def request(sim, **kw) -> discovery_pb2.DiscoverRequest:
    extra = {k: kw.pop(k) for k in ("filter", "folder", "names") if k in kw}
    return discovery_pb2.DiscoverRequest(connection=conn(sim, **kw), **extra)


def sessions(agent) -> vsphere.SessionCache:
    return agent.runtime.components["vsphere_sessions"]


# ------------------------------------------------------------------------------------ inventory


def expected_folder(path: str, dc: str) -> str:
    rest = path[len(f"/{dc}/vm/"):]
    return rest.rpartition("/")[0] or "Root"


def test_discover_returns_every_vm_with_all_fields(stub, vcsim):
    resp = discover(stub, vcsim)
    assert resp.vcenter_host == vcsim.address and resp.datacenter == "DC0"
    manifest = [m for m in vcsim.manifest["vms"] if m["datacenter"] == "DC0"]
    assert sorted(vm.name for vm in resp.vms) == sorted(m["name"] for m in manifest)
    seen_tools = set()
    for vm in resp.vms:
        m = vcsim.vm(vm.name)
        i = int(vm.name.removeprefix("vm-"))
        assert UUID_RE.match(vm.id) and UUID_RE.match(vm.instance_uuid) and vm.id != vm.instance_uuid
        assert vm.moref == m["moref"] and vm.path == m["path"] and vm.datacenter == "DC0"
        assert vm.folder_path == expected_folder(m["path"], "DC0")
        assert vm.power_state == m["power_state"]
        assert vm.guest_os == ("windows" if m["windows"] else "linux")
        assert vm.guest_id == m["guest_id"] and vm.guest_full_name == m["guest_full_name"]
        cpus, mem = (4, 8192) if m["windows"] else (2, 2048)
        if i % 3 == 1:
            cpus, mem = cpus // 2, mem // 2
        assert (vm.num_cpu, vm.memory_mb) == (cpus, mem)
        assert vm.firmware == ("efi" if m["windows"] else "bios")
        assert vm.annotation == f"test lab VM {i}"
        assert vm.vmx_version.startswith("vmx-")
        running = m["power_state"] == "poweredOn"
        if m["tools"] == "none":
            assert (vm.tools_status, vm.tools_version) == ("toolsNotInstalled", "")
        else:
            version = "10346" if m["tools"] == "old" else "11365"
            assert vm.tools_version == version != vm.vmx_version  # the real tools version
            if running:
                assert vm.tools_status == ("toolsOld" if m["tools"] == "old" else "toolsOk")
            else:
                assert vm.tools_status == "toolsNotRunning"
        seen_tools.add(vm.tools_status)
        assert not vm.cbt_enabled and vm.snapshot_count == 0
        assert vm.host == m["host"]
        assert len(vm.disks) == len(m["disks"]) == 2
        for d, md in zip(vm.disks, m["disks"], strict=True):
            assert d.id == f"disk-{md['key']}" and d.key == md["key"]
            assert d.label == f"Hard disk {md['index'] + 1}"
            assert d.vmdk_path == md["file_name"] and d.datastore == m["datastore"]
            assert d.capacity_bytes == md["capacity"] == 64 * MiB and d.size_gb == 1
            assert (d.unit_number, d.controller_key) == (md["unit_number"], md["controller_key"])
            assert (d.controller_type, d.bus_number) == ("scsi", 0)
            assert d.provisioning_type == ("thin" if md["thin"] else "thick")
            assert d.backing_type == "flat" and not d.change_tracking_active
        assert [(n.key, n.mac_address, n.network_name, n.adapter_type) for n in vm.networks] == [
            (nic["key"], nic["mac"], nic["network"], nic["type"]) for nic in m["nics"]]
        assert all(n.connected and n.label.startswith("Network adapter") for n in vm.networks)
    assert {"toolsOk", "toolsOld"} <= seen_tools
    # both standard and distributed port groups were resolved to names
    kinds = {nic["kind"] for m in manifest for nic in m["nics"]}
    assert kinds == {"standard", "distributed"}


def test_uuid_is_the_bios_uuid(stub, vcsim):
    resp = discover(stub, vcsim, names=["vm-0002"])
    si = vcsim.connect()
    try:
        found = si.RetrieveContent().searchIndex.FindByUuid(None, resp.vms[0].id, True, False)
        assert found._moId == vcsim.vm("vm-0002")["moref"]
    finally:
        from pyVim.connect import Disconnect

        Disconnect(si)


def test_every_datacenter_when_none_is_named(stub, vcsim):
    resp = discover(stub, vcsim, datacenter="")
    assert resp.datacenter == ""
    assert sorted(vm.name for vm in resp.vms) == sorted(vcsim.vm_names())
    for vm in resp.vms:
        m = vcsim.vm(vm.name)
        assert (vm.datacenter, vm.path) == (m["datacenter"], m["path"])
        assert vm.folder_path == expected_folder(m["path"], m["datacenter"])
        # powered-off VMs and VMs without tools still get their guest OS (from the configuration)
        assert vm.guest_os == ("windows" if m["windows"] else "linux")
    states = {(vm.power_state, vm.tools_status) for vm in resp.vms}
    assert {("poweredOff", "toolsNotRunning"), ("poweredOn", "toolsNotInstalled"), ("poweredOn", "toolsOk"),
            ("poweredOn", "toolsOld")} <= states


def test_filter_terms_folder_and_exact_names(stub, vcsim, monkeypatch):
    resp = discover(stub, vcsim, datacenter="", filter=" 0001 ,VM-0004,, ")
    assert sorted(vm.name for vm in resp.vms) == ["vm-0001", "vm-0004"]

    dc0 = [m for m in vcsim.manifest["vms"] if m["datacenter"] == "DC0"]
    in_folder1 = sorted(m["name"] for m in dc0 if m["path"].startswith("/DC0/vm/Folder1/"))
    assert in_folder1
    assert sorted(vm.name for vm in discover(stub, vcsim, folder="Folder1").vms) == in_folder1
    assert sorted(vm.name for vm in discover(stub, vcsim, folder="/DC0/vm/Folder1/").vms) == in_folder1
    nested = sorted(m["name"] for m in dc0 if "/Folder1/Nested1/" in m["path"])
    assert nested and sorted(vm.name for vm in discover(stub, vcsim, folder="Folder1/Nested1").vms) == nested
    assert len(discover(stub, vcsim, folder="Root").vms) == len(dc0)
    # criteria combine
    both = discover(stub, vcsim, folder="Folder1", filter=in_folder1[0][-2:])
    assert [vm.name for vm in both.vms] == [in_folder1[0]]
    details = rpc_error(stub.Discover, request(vcsim, folder="NoSuchFolder"), grpc.StatusCode.NOT_FOUND)
    assert "NoSuchFolder" in details and "DC0" in details

    # exact names: case-insensitive, unknown names are simply absent, and only the matches are read
    calls = []
    real = vsphere.Session.vm_records
    monkeypatch.setattr(vsphere.Session, "vm_records",
                        lambda self, morefs, *a, **kw: calls.append(list(morefs)) or real(self, morefs, *a, **kw))
    skeletons = []
    real_skeleton = vsphere.Session.inventory_skeleton
    monkeypatch.setattr(vsphere.Session, "inventory_skeleton",
                        lambda self, dc=None, **kw: skeletons.append(kw) or real_skeleton(self, dc, **kw))
    resp = discover(stub, vcsim, names=["VM-0002", "no-such-vm"])
    assert [vm.name for vm in resp.vms] == ["vm-0002"]
    assert resp.vms[0].path == vcsim.vm("vm-0002")["path"] and len(resp.vms[0].disks) == 2
    assert calls == [[vcsim.vm("vm-0002")["moref"]]]
    assert skeletons == [{"with_vm_properties": False}]


def test_unknown_datacenter_is_not_found(stub, vcsim):
    details = rpc_error(stub.Discover, request(vcsim, datacenter="DC9"), grpc.StatusCode.NOT_FOUND)
    assert "DC9" in details and "DC0" in details and vcsim.address in details


def test_missing_connection_fields_are_invalid(stub, vcsim):
    for field in ("host", "username", "password"):
        details = rpc_error(stub.Discover, request(vcsim, **{field: ""}), grpc.StatusCode.INVALID_ARGUMENT)
        assert f"connection.{field}" in details
    details = rpc_error(stub.Discover, request(vcsim, host="bad host:99999"), grpc.StatusCode.INVALID_ARGUMENT)
    assert "connection.host" in details


# ------------------------------------------------------------------------------------ TLS


def test_tls_thumbprints_ca_bundle_and_insecure(stub, vcsim):
    sha256_plain = vcsim.thumbprint_sha256.replace(":", "").lower()
    for tls in ({"thumbprint": vcsim.thumbprint_sha1}, {"thumbprint": vcsim.thumbprint_sha256},
                {"thumbprint": sha256_plain}, {"thumbprint": "", "ca_pem": vcsim.cert_file.read_text()},
                {"thumbprint": "", "insecure": True}):
        assert len(discover(stub, vcsim, names=["vm-0000"], **tls).vms) == 1, tls


def test_wrong_thumbprint_is_refused_naming_both_fingerprints(stub, vcsim):
    wrong = ":".join(["AB"] * 20)
    details = rpc_error(stub.Discover, request(vcsim, thumbprint=wrong), grpc.StatusCode.FAILED_PRECONDITION)
    assert vcsim.address in details and wrong in details
    assert vcsim.thumbprint_sha1 in details and vcsim.thumbprint_sha256 in details


def test_untrusted_certificate_and_bad_tls_options(stub, vcsim):
    details = rpc_error(stub.Discover, request(vcsim, thumbprint=""), grpc.StatusCode.UNAVAILABLE)
    assert vcsim.address in details and "not trusted" in details and vcsim.thumbprint_sha1 in details
    details = rpc_error(stub.Discover, request(vcsim, insecure=True), grpc.StatusCode.INVALID_ARGUMENT)
    assert "thumbprint" in details and "insecure" in details
    details = rpc_error(stub.Discover, request(vcsim, thumbprint="12:34"), grpc.StatusCode.INVALID_ARGUMENT)
    assert "connection.thumbprint" in details
    details = rpc_error(stub.Discover, request(vcsim, thumbprint="", ca_pem="not a pem"),
                        grpc.StatusCode.INVALID_ARGUMENT)
    assert "connection.ca_pem" in details


# ------------------------------------------------------------------------------------ login / reachability


def test_bad_password_is_unauthenticated_and_never_echoed(stub, vcsim):
    details = rpc_error(stub.Discover, request(vcsim, password=WRONG_PASSWORD), grpc.StatusCode.UNAUTHENTICATED)
    assert vcsim.address in details and vcsim.username in details
    check = stub.CheckConnection(discovery_pb2.CheckConnectionRequest(
        connection=conn(vcsim, password=WRONG_PASSWORD)), metadata=MD, timeout=60)
    assert not check.success and vcsim.address in check.message and WRONG_PASSWORD not in check.message
    assert check.thumbprint == vcsim.thumbprint_sha1  # shown so that it can be pinned


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_closed_port_is_unavailable(stub, vcsim):
    address = f"127.0.0.1:{free_port()}"
    details = rpc_error(stub.Discover, request(vcsim, host=address), grpc.StatusCode.UNAVAILABLE)
    assert address in details and "unreachable" in details and "refused" in details
    check = stub.CheckConnection(discovery_pb2.CheckConnectionRequest(connection=conn(vcsim, host=address)),
                                 metadata=MD, timeout=60)
    assert not check.success and "unreachable" in check.message


def test_stopped_vcenter_is_unavailable_and_its_session_dropped(stub, agent, vcsim_factory):
    sim = vcsim_factory(vms=2, hosts=1, password="An0ther-Pass")
    assert len(discover(stub, sim).vms) == 2
    cache = sessions(agent)
    key = vsphere.VCenterParams(sim.address, sim.username, sim.password, thumbprint=sim.thumbprint_sha1).cache_key()
    assert key in cache._sessions
    sim.stop()
    details = rpc_error(stub.Discover, request(sim), grpc.StatusCode.UNAVAILABLE, "An0ther-Pass")
    assert sim.address in details and "unreachable" in details
    assert key not in cache._sessions


# ------------------------------------------------------------------------------------ CheckConnection


def test_check_connection(stub, vcsim):
    ok = stub.CheckConnection(discovery_pb2.CheckConnectionRequest(connection=conn(vcsim)), metadata=MD, timeout=60)
    assert ok.success, ok.message
    assert ok.vcenter_version.startswith("6.5.0") and list(ok.datacenters) == ["DC0", "DC1"]
    assert ok.thumbprint == vcsim.thumbprint_sha1 and vcsim.address in ok.message
    bad_dc = stub.CheckConnection(discovery_pb2.CheckConnectionRequest(connection=conn(vcsim, datacenter="DCX")),
                                  metadata=MD, timeout=60)
    assert not bad_dc.success and "DCX" in bad_dc.message and list(bad_dc.datacenters) == ["DC0", "DC1"]
    wrong = stub.CheckConnection(discovery_pb2.CheckConnectionRequest(
        connection=conn(vcsim, thumbprint=":".join(["CD"] * 32))), metadata=MD, timeout=60)
    assert not wrong.success and vcsim.thumbprint_sha256 in wrong.message
    rpc_error(stub.CheckConnection, discovery_pb2.CheckConnectionRequest(connection=conn(vcsim, username="")),
              grpc.StatusCode.INVALID_ARGUMENT)


# ------------------------------------------------------------------------------------ sessions


def test_sessions_are_reused_and_renewed_when_expired(stub, agent, vcsim):
    cache = sessions(agent)
    discover(stub, vcsim, names=["vm-0000"])
    key = vsphere.VCenterParams(vcsim.address, vcsim.username, vcsim.password,
                                thumbprint=vcsim.thumbprint_sha1).cache_key()
    session = cache._sessions[key]
    logins = session.logins
    before = cache.logins
    for _ in range(3):
        discover(stub, vcsim, names=["vm-0002"])
    assert cache.logins == before and session.logins == logins
    # the session expires behind the agent's back: the next call logs in again, once
    session._conn.content.sessionManager.Logout()
    assert len(discover(stub, vcsim, names=["vm-0002"]).vms) == 1
    assert session.logins == logins + 1 and cache._sessions[key] is session
    # another password (or TLS mode) is another session; the password is not in any repr
    assert "VMware1!" not in repr(session) and "VMware1!" not in repr(session.params)


# ------------------------------------------------------------------------------------ parsers


def test_fast_parser_agrees_with_elementtree(vcsim):
    params = vsphere.VCenterParams(vcsim.address, vcsim.username, vcsim.password, thumbprint=vcsim.thumbprint_sha1)
    with vsphere.connect(params) as session:
        fast = session.inventory_skeleton(None, with_vm_properties=True)
        session.fast_parse = False
        slow = session.inventory_skeleton(None, with_vm_properties=True)
        records = session.vm_records(fast.vms[:3])
    assert len(fast.records) == len(vcsim.vm_names())
    assert (fast.nodes, fast.networks, fast.hosts, fast.vms) == (slow.nodes, slow.networks, slow.hosts, slow.vms)
    for moref, rec in fast.records.items():
        assert dataclasses.asdict(rec) == dataclasses.asdict(slow.records[moref])
    assert [dataclasses.asdict(r) for r in records] == [dataclasses.asdict(fast.records[m]) for m in fast.vms[:3]]


def test_fast_parser_edge_cases():
    head = (b'<?xml version="1.0"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
            b'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>'
            b'<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><token>t-1</token>')
    tail = b"</returnval></RetrievePropertiesExResponse></soapenv:Body></soapenv:Envelope>"
    obj = (b'<objects><obj type="VirtualMachine">vm-7</obj>'
           b'<propSet><name>name</name><val xsi:type="xsd:string">a &amp; b &lt;c&gt; &#233;</val></propSet>'
           b'<propSet><name>config.annotation</name><val xsi:type="xsd:string"/></propSet>'
           b'<propSet><name>config.hardware.device</name><val xsi:type="ArrayOfVirtualDevice">'
           b'<VirtualDevice xsi:type="VirtualKeyboard"><key>600</key></VirtualDevice>'
           b'<VirtualDevice xsi:type="VirtualAHCIController"><key>15000</key><busNumber>0</busNumber></VirtualDevice>'
           b'<VirtualDevice xsi:type="VirtualDisk"><key>16000</key><deviceInfo><label>Hard disk 1</label></deviceInfo>'
           b'<backing xsi:type="VirtualDiskRawDiskMappingVer1BackingInfo"><fileName>[ds] a/rdm.vmdk</fileName>'
           b'<compatibilityMode>physicalMode</compatibilityMode><changeId>52 aa/3</changeId>'
           b'<parent xsi:type="VirtualDiskRawDiskMappingVer1BackingInfo"><fileName>[ds] a/old.vmdk</fileName>'
           b'<changeId>old</changeId></parent></backing><controllerKey>15000</controllerKey><unitNumber>0</unitNumber>'
           b'<capacityInKB>1024</capacityInKB></VirtualDevice>'
           b'<VirtualDevice xsi:type="VirtualVmxnet3Vrdma"><key>4000</key><deviceInfo><label>Network adapter 1</label>'
           b'</deviceInfo><backing xsi:type="VirtualEthernetCardOpaqueNetworkBackingInfo">'
           b'<opaqueNetworkId>ls-1</opaqueNetworkId><opaqueNetworkType>nsx.LogicalSwitch</opaqueNetworkType></backing>'
           b'<connectable><connected>false</connected></connectable><macAddress>00:50:56:aa:bb:cc</macAddress>'
           b'</VirtualDevice></val></propSet></objects>')
    data = head + obj + tail
    fast, token = vsphere_properties.parse_objects_fast(data)
    slow, token2 = vsphere_properties.parse_objects_et(data)
    assert token == token2 == "t-1"
    record = vsphere_properties.vm_record_from_properties
    rf, rs = record(fast[0][1], fast[0][2]), record(slow[0][1], slow[0][2])
    assert dataclasses.asdict(rf) == dataclasses.asdict(rs)
    assert rf.name == "a & b <c> \u00e9" and rf.annotation == ""
    assert rf.controllers[15000].kind == "sata"
    (disk,) = rf.disks
    assert (disk.key, disk.backing, disk.file_name, disk.change_id, disk.capacity_bytes) == (
        16000, "rdm-physical", "[ds] a/rdm.vmdk", "52 aa/3", 1 << 20)
    (nic,) = rf.nics
    assert (nic.adapter_type, nic.backing, nic.opaque_id, nic.connected) == ("vmxnet3", "opaque", "ls-1", False)
    # answers the fast parser does not vouch for go to ElementTree
    with pytest.raises(vsphere_properties.NotForFastPath):
        vsphere_properties.parse_objects_fast(head + obj.replace(b"<key>16000</key>", b"") + tail)
    assert vsphere_properties.parse_objects(head + tail) == ([], "t-1")
