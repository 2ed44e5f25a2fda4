"""Pure logic of the vSphere integration, no server needed: how faults and network errors become
agent errors (and so gRPC statuses), how CBT refusals are classified, connection parameters,
inventory paths. The same code runs against the simulated vCenter in test_vma_discovery.py and
test_vma_power_cbt.py; here every branch is reached directly, in milliseconds."""
from __future__ import annotations

import socket
import ssl
import xml.etree.ElementTree as ET

import pytest
from pyVmomi import vim, vmodl

from vma_agent import errors
from vma_agent.integrations import vsphere
from vma_agent.integrations.vsphere.faults import agent_error, changed_areas_error, fault_text
from vma_agent.integrations.vsphere.types import normalise_thumbprint

PASSWORD = "S3cret!pw"
HOST = "vc.example:8443"
USER = "svc@vsphere.local"


def classify(exc: BaseException, hint: str = "") -> errors.AgentError | None:
    return agent_error(exc, host=HOST, user=USER, password=PASSWORD, certificate_hint=lambda: hint)


@pytest.mark.parametrize(("fault", "error_class", "text"), [
    (vim.fault.InvalidLogin(), errors.Unauthenticated, f"vCenter {HOST} refused the login for {USER}"),
    (vim.fault.NotAuthenticated(), errors.Unauthenticated, f"did not accept the session of {USER}"),
    (vim.fault.NoPermission(privilegeId="VirtualMachine.Interact.PowerOn", object=vim.VirtualMachine("vm-7")),
     errors.PermissionDenied, f"user {USER} lacks privilege VirtualMachine.Interact.PowerOn on vm-7"),
    (vmodl.fault.ManagedObjectNotFound(obj=vim.VirtualMachine("vm-9")), errors.NotFound,
     f"vm-9 does not exist (any more) on vCenter {HOST}"),
    (vim.fault.ToolsUnavailable(msg="tools are not running"), vsphere.GuestOperationUnavailable,
     "ToolsUnavailable: tools are not running"),
    (vim.fault.InvalidPowerState(), vsphere.GuestOperationUnavailable, "InvalidPowerState"),
    (vim.fault.TaskInProgress(msg="busy"), errors.FailedPrecondition, "TaskInProgress: busy"),
    (vim.fault.SnapshotFault(msg="locked"), errors.FailedPrecondition, "SnapshotFault: locked"),
    (vim.fault.HostConnectFault(msg="host down"), errors.Unavailable, f"vCenter {HOST} is unreachable"),
    (vmodl.fault.SystemError(reason="x", msg="boom"), vsphere.VSphereFault, f"vCenter {HOST}: SystemError: boom"),
    (ConnectionRefusedError(), errors.Unavailable, "is unreachable: connection refused"),
    (socket.gaierror(-2, "Name or service not known"), errors.Unavailable, "cannot resolve the host name"),
    (TimeoutError(), errors.Unavailable, "is unreachable: timed out"),
    (ConnectionResetError(), errors.Unavailable, "connection lost (ConnectionResetError)"),
    (ET.ParseError("not well-formed"), errors.Unavailable, "sent a malformed answer"),
])
def test_vcenter_failures_map_to_agent_errors(fault, error_class, text):
    err = classify(fault)
    assert type(err) is error_class
    assert text in err.message and HOST in err.message


def test_the_most_specific_fault_class_wins():
    # pyVmomi's hierarchy nests the faults: the order of the checks decides the gRPC status
    assert issubclass(vim.fault.NotAuthenticated, vim.fault.NoPermission)
    assert classify(vim.fault.NotAuthenticated()).code == "UNAUTHENTICATED"  # an expired session
    assert issubclass(vim.fault.InvalidPowerState, vim.fault.InvalidState)
    assert type(classify(vim.fault.InvalidPowerState())) is vsphere.GuestOperationUnavailable
    assert type(classify(vim.fault.InvalidState())) is errors.FailedPrecondition
    assert vsphere.VSphereFault.code == "INTERNAL"


def test_password_echoed_by_vcenter_is_scrubbed():
    for fault in (vim.fault.ToolsUnavailable(msg=f"guest said {PASSWORD}"),
                  vim.fault.InvalidState(msg=f"state {PASSWORD}"),
                  vmodl.fault.SystemError(reason="", msg=f"login {USER}/{PASSWORD} failed"),
                  OSError(f"proxy rejected {PASSWORD}")):
        err = classify(fault)
        assert PASSWORD not in err.message and "***" in err.message, err.message


def test_certificate_not_trusted_asks_for_the_pinning_hint_only_then():
    asked: list[int] = []

    def hint() -> str:
        asked.append(1)
        return "; pin its thumbprint (SHA-1 AA:BB)"

    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_message, untrusted.reason = "self-signed certificate", "CERTIFICATE_VERIFY_FAILED"
    err = agent_error(untrusted, host=HOST, user=USER, password=PASSWORD, certificate_hint=hint)
    assert err.code == "UNAVAILABLE" and asked == [1]
    assert err.message.endswith("TLS certificate not trusted (self-signed certificate); pin its thumbprint (SHA-1 AA:BB)")
    agent_error(ConnectionRefusedError(), host=HOST, user=USER, password=PASSWORD, certificate_hint=hint)
    assert asked == [1]


def test_certificate_mismatch_is_a_failed_precondition_naming_both_prints():
    actual = vsphere.Fingerprints.of(b"certificate the server presented")
    pinned = "ab" * 20
    err = classify(vsphere.CertificateMismatch(HOST, pinned, actual))
    assert err.code == "FAILED_PRECONDITION"
    assert "pinned SHA-1 thumbprint AB:AB:" in err.message and actual.sha1 in err.message
    assert actual.sha256 in err.message


def test_exceptions_that_are_not_vcenter_failures_are_left_alone():
    assert classify(ValueError("a bug")) is None
    assert classify(KeyError("x")) is None


@pytest.mark.parametrize(("fault", "error_class"), [
    (vim.fault.FileFault(file="[ds] vm/disk-ctk.vmdk"), vsphere.ChangeTrackingNotActive),
    (vmodl.fault.InvalidArgument(invalidProperty="changeId"), vsphere.InvalidChangeId),
    (vmodl.fault.InvalidArgument(), vsphere.InvalidChangeId),
    (vmodl.fault.InvalidArgument(invalidProperty="deviceKey"), errors.InvalidArgument),
    (vmodl.fault.SystemError(reason="x"), vsphere.VSphereFault),
])
def test_changed_areas_refusals_say_whether_to_copy_the_whole_disk(fault, error_class):
    err = changed_areas_error(fault, host=HOST, label="disk 2000 of VM web01", change_id="52 aa/7")
    assert type(err) is error_class
    assert "disk 2000 of VM web01" in err.message and HOST in err.message
    copy_whole_disk = isinstance(err, vsphere.ChangeTrackingUnusable)
    assert copy_whole_disk == (error_class in (vsphere.ChangeTrackingNotActive, vsphere.InvalidChangeId))
    if error_class is vsphere.InvalidChangeId:
        assert "'52 aa/7'" in err.message


def test_fault_text_uses_the_localized_messages_when_there_is_no_msg():
    fault = vim.fault.InvalidState(faultMessage=[vmodl.LocalizableMessage(key="k", message="VM is busy")])
    assert fault_text(fault) == "InvalidState: VM is busy"
    assert fault_text(vim.fault.InvalidState()) == "InvalidState"


@pytest.mark.parametrize(("host", "address", "label"), [
    ("vc.example", ("vc.example", 443), "vc.example"),
    (" vc.example:8443 ", ("vc.example", 8443), "vc.example:8443"),
    ("https://vc.example/sdk", ("vc.example", 443), "vc.example"),
    ("https://vc.example:9443/sdk", ("vc.example", 9443), "vc.example:9443"),
    ("10.0.0.5:443", ("10.0.0.5", 443), "10.0.0.5"),
    ("[fd00::5]:8443", ("fd00::5", 8443), "fd00::5:8443"),
    ("fd00::5", ("fd00::5", 443), "fd00::5"),
])
def test_vcenter_address_forms(host, address, label):
    params = vsphere.VCenterParams(host, USER, PASSWORD)
    assert params.address() == address and params.label == label


@pytest.mark.parametrize("host", ["", "vc.example:0", "vc.example:70000", "vc:ex:ample:"])
def test_bad_vcenter_address_is_invalid_argument(host):
    with pytest.raises(errors.InvalidArgument, match="connection.host"):
        vsphere.VCenterParams(host, USER, PASSWORD).address()


def test_tls_modes_are_exclusive_and_thumbprints_normalised():
    sha1 = "AB:CD:" + ":".join(["01"] * 18)
    assert vsphere.VCenterParams(HOST, USER, PASSWORD).tls_mode() == ("system", "")
    assert vsphere.VCenterParams(HOST, USER, PASSWORD, insecure=True).tls_mode() == ("insecure", "")
    assert vsphere.VCenterParams(HOST, USER, PASSWORD, thumbprint=f"sha1={sha1}").tls_mode() == (
        "thumbprint", "abcd" + "01" * 18)
    assert normalise_thumbprint("SHA-256: " + "Ef" * 32) == "ef" * 32
    with pytest.raises(errors.InvalidArgument, match="choose one TLS mode, not thumbprint and insecure"):
        vsphere.VCenterParams(HOST, USER, PASSWORD, thumbprint=sha1, insecure=True).tls_mode()
    with pytest.raises(errors.InvalidArgument, match="SHA-1 .40 hex digits"):
        normalise_thumbprint("AB:CD")


def test_password_is_neither_in_repr_nor_in_the_cache_key():
    params = vsphere.VCenterParams(HOST, USER, PASSWORD)
    assert PASSWORD not in repr(params)
    key = params.cache_key()
    assert PASSWORD not in "".join(key)
    assert key == vsphere.VCenterParams("VC.example:8443", USER, PASSWORD).cache_key()
    assert key != vsphere.VCenterParams(HOST, USER, PASSWORD + "x").cache_key()


def test_inventory_paths_from_parent_links():
    node = vsphere.InventoryNode
    nodes = {
        "group-d1": node("group-d1", "Folder", "Datacenters", ""),
        "f-1": node("f-1", "Folder", "Region", "group-d1"),
        "dc-1": node("dc-1", "Datacenter", "DC0", "f-1"),
        "group-v1": node("group-v1", "Folder", "vm", "dc-1"),
        "resgroup-v9": node("resgroup-v9", "VirtualApp", "App", "group-v1"),
        "vm-1": node("vm-1", "VirtualMachine", "web01", "resgroup-v9"),
        "loop-a": node("loop-a", "Folder", "A", "loop-b"),
        "loop-b": node("loop-b", "Folder", "B", "loop-a"),
    }
    assert vsphere.inventory_path("vm-1", nodes) == "/Region/DC0/vm/App/web01"
    assert vsphere.inventory_path("vm-1", nodes, {"dc-1": "/Region/DC0"}) == "/Region/DC0/vm/App/web01"
    assert vsphere.inventory_path("vm-1", nodes, {"group-v1": "/X/vm/"}) == "/X/vm/App/web01"
    assert vsphere.inventory_path("loop-a", nodes) == "/B/A"  # a parent cycle ends, it does not hang
