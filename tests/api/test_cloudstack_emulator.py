"""The CloudStack emulator, exercised through the real ``cs`` client (and raw HTTP where needed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cs
import pytest
import requests
from cs import CloudStackApiException

from omalab.cloudstack_emulator import (
    AUTH_ERROR_TEXT,
    UNKNOWN_COMMAND_TEXT,
    CloudStackEmulator,
    byid_name,
    local_macs,
    sign_params,
)

GiB = 1 << 30
FAST = pytest.mark.cloudstack_emulator(job_delay=0.05)
REPO = Path(__file__).resolve().parents[2]


def raw_get(emu: CloudStackEmulator, params: dict) -> requests.Response:
    return requests.get(emu.url, params=params, timeout=5)


def signed(emu: CloudStackEmulator, **params: str) -> dict:
    return sign_params({"response": "json", **params}, emu.api_key, emu.secret_key)


def api_error(excinfo: pytest.ExceptionInfo) -> tuple[int, dict]:
    return excinfo.value.response.status_code, excinfo.value.error


def new_volume(client, emu: CloudStackEmulator, size_gb: int = 1, **kw) -> dict:
    return client.createVolume(zoneid=emu.zone_id, diskofferingid=emu.disk_offering_id,
                               size=size_gb, fetch_result=True, **kw)["volume"]


# ============================================================================ authentication


def test_signed_get_and_post_requests_are_accepted(cloudstack):
    for method in ("get", "post"):
        zones = cloudstack.client(method=method).listZones()
        assert zones["count"] == 2
        assert {z["name"] for z in zones["zone"]} == {"zone-a", "zone-b"}


def test_emulator_signs_like_the_cs_client(cloudstack_client, cloudstack):
    params = {"command": "listZones", "response": "json", "apiKey": cloudstack.api_key,
              "name": "Zone A*b_c.d-e", "keyword": "x y/z&é"}
    theirs = dict(params)
    cloudstack_client._sign(theirs)
    ours = sign_params(params, cloudstack.api_key, cloudstack.secret_key, expires_in=None)
    assert ours["signature"] == theirs["signature"]


def test_tampered_signature_is_refused_with_401(cloudstack):
    params = signed(cloudstack, command="listZones")
    assert raw_get(cloudstack, params).status_code == 200

    added = dict(params, name="zone-a")  # a parameter added after signing
    r = raw_get(cloudstack, added)
    assert r.status_code == 401
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json() == {"listzonesresponse": {"uuidList": [], "errorcode": 401,
                                              "errortext": AUTH_ERROR_TEXT}}

    flipped = dict(params, signature=params["signature"][::-1])
    assert raw_get(cloudstack, flipped).status_code == 401
    unsigned = {k: v for k, v in params.items() if k != "signature"}
    assert raw_get(cloudstack, unsigned).status_code == 401


def test_wrong_secret_and_unknown_key_are_refused(cloudstack):
    for client in (cloudstack.client(secret="not-the-secret"),
                   cloudstack.client(key="no-such-key"),
                   cloudstack.client(secret=cloudstack.second_secret_key)):
        with pytest.raises(CloudStackApiException) as exc:
            client.listZones()
        status, error = api_error(exc)
        assert status == 401
        assert error == {"uuidList": [], "errorcode": 401, "errortext": AUTH_ERROR_TEXT}


def test_expired_signature_version_3_is_refused(cloudstack_client):
    past = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S%z")
    with pytest.raises(CloudStackApiException) as exc:
        cloudstack_client.listZones(signatureVersion="3", expires=past)
    assert api_error(exc) == (401, {"uuidList": [], "errorcode": 401, "errortext": AUTH_ERROR_TEXT})

    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat(timespec="seconds")
    assert cloudstack_client.listZones(signatureVersion="3", expires=future)["count"] == 2


def test_version_3_without_expires_is_refused(cloudstack):
    params = sign_params({"command": "listZones", "response": "json", "signatureVersion": "3"},
                         cloudstack.api_key, cloudstack.secret_key, expires_in=None)
    assert raw_get(cloudstack, params).status_code == 401


def test_values_are_encoded_like_java_urlencoder(cloudstack_client, cloudstack):
    # spaces, '*', '+', '&', '=', non-ASCII: cs encodes them as CloudStack does, so accepted
    assert cloudstack_client.listVirtualMachines(keyword="no such * +&= é") == {}
    # '~': java.net.URLEncoder escapes it, cs (urllib quote) does not -> refused, as by CloudStack
    with pytest.raises(CloudStackApiException) as exc:
        cloudstack_client.listVirtualMachines(keyword="a~b")
    assert api_error(exc)[0] == 401
    assert raw_get(cloudstack, signed(cloudstack, command="listVirtualMachines",
                                      keyword="a~b")).status_code == 200


def test_second_account_sees_only_its_own_resources(cloudstack):
    tenant = cloudstack.client(key=cloudstack.second_api_key, secret=cloudstack.second_secret_key)
    assert [a["name"] for a in tenant.listAccounts()["account"]] == ["tenant-b"]
    assert [v["name"] for v in tenant.listVirtualMachines()["virtualmachine"]] == ["tenant-b-app"]
    admin = cloudstack.client()
    assert [a["name"] for a in admin.listAccounts()["account"]] == ["admin"]
    assert {a["name"] for a in admin.listAccounts(listall=True)["account"]} == {"admin", "tenant-b"}


@pytest.mark.cloudstack_emulator(oma_vm_account="tenant-b")
def test_oma_vm_in_another_account_for_mismatch_checks(cloudstack_client, cloudstack):
    c = cloudstack_client
    [oma] = c.listVirtualMachines(id=cloudstack.oma_vm_id)["virtualmachine"]  # admins see it by id
    [account] = c.listAccounts()["account"]
    assert (oma["account"], account["name"]) == ("tenant-b", "admin")
    assert cloudstack.oma_vm_id not in {v["id"] for v in c.listVirtualMachines()["virtualmachine"]}
    tenant = cloudstack.client(key=cloudstack.second_api_key, secret=cloudstack.second_secret_key)
    with pytest.raises(CloudStackApiException) as exc:
        tenant.listAccounts(id=account["id"])
    assert api_error(exc)[0] == 531


# ============================================================================ envelopes and lists


def test_unknown_command_is_432(cloudstack, cloudstack_client):
    for command in ("listFooBars", "listzones"):  # command names are case-sensitive
        with pytest.raises(CloudStackApiException) as exc:
            getattr(cloudstack_client, command)()
        assert api_error(exc) == (432, {"uuidList": [], "errorcode": 432, "cserrorcode": 9999,
                                        "errortext": UNKNOWN_COMMAND_TEXT})
    r = raw_get(cloudstack, signed(cloudstack, command="listFooBars"))
    assert list(r.json()) == ["errorresponse"]


@pytest.mark.cloudstack_emulator(unknown_command_status=401)
def test_unknown_command_can_answer_401_like_current_cloudstack(cloudstack_client):
    with pytest.raises(CloudStackApiException) as exc:
        cloudstack_client.listFooBars()
    assert api_error(exc)[0] == 401


def test_lists_pagination_and_empty_envelopes(cloudstack, cloudstack_client):
    c = cloudstack_client
    everything = c.listTemplates(templatefilter="executable", fetch_list=True)
    in_pages = c.listTemplates(templatefilter="executable", pagesize=2, fetch_list=True)
    assert len(everything) >= 5
    assert [(t["id"], t["zoneid"]) for t in in_pages] == [(t["id"], t["zoneid"]) for t in everything]

    first = c.listTemplates(templatefilter="executable", page=1, pagesize=2)
    assert first["count"] == len(everything) and len(first["template"]) == 2
    assert c.listTemplates(templatefilter="executable", page=99, pagesize=2) == {
        "count": len(everything)}

    assert c.listVolumes(name="no-such-volume") == {}
    r = raw_get(cloudstack, signed(cloudstack, command="listVolumes", name="no-such-volume"))
    assert r.json() == {"listvolumesresponse": {}}

    for extra in ({"pagesize": "2"}, {"page": "1"}):
        r = raw_get(cloudstack, signed(cloudstack, command="listZones", **extra))
        assert r.status_code == 431
        assert "parameter is required when" in r.json()["listzonesresponse"]["errortext"]


def test_inventory_offerings_templates_networks(cloudstack_client, cloudstack):
    c = cloudstack_client
    disk = c.listDiskOfferings()["diskoffering"]
    assert [d["id"] for d in disk if d["iscustomized"]] == [cloudstack.disk_offering_id]
    assert all(d["disksize"] > 0 for d in disk if not d["iscustomized"])

    compute = c.listServiceOfferings()["serviceoffering"]
    custom = [o for o in compute if o["iscustomized"]]
    assert [o["id"] for o in custom] == [cloudstack.service_offering_id]
    assert "cpunumber" not in custom[0]
    assert all(o["cpunumber"] >= 1 and o["memory"] >= 512 for o in compute if not o["iscustomized"])

    featured = c.listTemplates(templatefilter="featured")["template"]
    assert featured and all(t["isready"] for t in featured)
    executable = c.listTemplates(templatefilter="executable")["template"]
    assert any(not t["isready"] for t in executable)
    ready = [t for t in executable if t["isready"]]
    assert any(t["size"] < 2 * GiB for t in ready) and any(t["size"] >= 2 * GiB for t in ready)
    assert [t["zoneid"] for t in executable if t["id"] == cloudstack.template_id] == [
        cloudstack.zone_id, cloudstack.zone2_id]  # one entry per zone
    assert "Tenant B Golden Image" not in {t["name"] for t in executable}
    assert {t["name"] for t in c.listTemplates(templatefilter="self")["template"]} >= {
        "Migration Boot Stub", "Ubuntu 24.04 Minimal"}
    only_zone2 = c.listTemplates(templatefilter="featured", zoneid=cloudstack.zone2_id)["template"]
    assert {t["zoneid"] for t in only_zone2} == {cloudstack.zone2_id}

    with pytest.raises(CloudStackApiException) as exc:
        c.listTemplates(templatefilter="bogus")
    assert api_error(exc)[0] == 431
    with pytest.raises(CloudStackApiException) as exc:
        c.listTemplates()
    assert api_error(exc)[1]["errortext"] == (
        "Unable to execute API command listtemplates due to missing parameter templatefilter")

    nets = c.listNetworks(zoneid=cloudstack.zone_id)["network"]
    assert {n["zoneid"] for n in nets} == {cloudstack.zone_id}
    names = [n["name"] for n in nets]
    assert any("test" in n for n in names) and any("isolated" in n for n in names)
    assert "tenant-b-network" not in names
    assert len(c.listNetworks()["network"]) > len(nets)


def test_oma_vm_is_found_by_a_local_mac(cloudstack_client, cloudstack):
    macs = set(local_macs())
    assert cloudstack.oma_mac in macs
    vms = cloudstack_client.listVirtualMachines(fetch_list=True)
    matches = [vm for vm in vms if any(n["macaddress"] in macs for n in vm["nic"])]
    assert [vm["id"] for vm in matches] == [cloudstack.oma_vm_id]
    [account] = cloudstack_client.listAccounts()["account"]
    assert matches[0]["account"] == account["name"] == cloudstack.account_name


def test_vm_and_volume_list_filters(cloudstack_client, cloudstack):
    c = cloudstack_client
    assert {v["name"] for v in c.listVirtualMachines(name="web")["virtualmachine"]} == {
        "web-01", "web-02"}  # substring match
    assert [v["name"] for v in c.listVirtualMachines(state="Stopped")["virtualmachine"]] == ["web-02"]
    assert c.listVirtualMachines(keyword="tenant") == {}
    assert c.listVirtualMachines(keyword="tenant", listall=True)["count"] == 1
    web01 = cloudstack.ids["vm_web01"]
    assert c.listVirtualMachines(id=web01)["virtualmachine"][0]["name"] == "web-01"

    with pytest.raises(CloudStackApiException) as exc:
        c.listVirtualMachines(id="00000000-0000-4000-8000-000000000000")
    status, error = api_error(exc)
    assert status == 431 and error["cserrorcode"] == 9999
    assert "Invalid parameter id value=00000000-0000-4000-8000-000000000000" in error["errortext"]

    vols = c.listVolumes(virtualmachineid=web01)["volume"]
    assert [(v["type"], v["deviceid"]) for v in vols] == [("ROOT", 0), ("DATADISK", 1)]
    assert [v["type"] for v in c.listVolumes(virtualmachineid=web01, type="DATADISK")["volume"]] == [
        "DATADISK"]


# ============================================================================ async jobs, volumes


def test_create_volume_job_is_pending_then_succeeds(cloudstack_client, cloudstack):
    c = cloudstack_client
    started = c.createVolume(zoneid=cloudstack.zone_id, diskofferingid=cloudstack.disk_offering_id,
                             size=3, name="vol-a")
    assert set(started) == {"id", "jobid"}
    first = c.queryAsyncJobResult(jobid=started["jobid"])
    assert first["jobstatus"] == 0 and "jobresult" not in first

    path = cloudstack.volume_path(started["id"])
    assert path.stat().st_size == 3 * GiB
    assert path.stat().st_blocks * 512 < 1 << 20  # sparse

    polls = 1
    deadline = time.monotonic() + 5
    while (job := c.queryAsyncJobResult(jobid=started["jobid"]))["jobstatus"] == 0:
        assert time.monotonic() < deadline
        polls += 1
        time.sleep(0.02)
    assert polls > 1
    assert job["jobstatus"] == 1 and job["jobresultcode"] == 0
    assert job["jobresulttype"] == "object"
    assert job["cmd"].endswith(".CreateVolumeCmd")
    assert (job["jobinstancetype"], job["jobinstanceid"]) == ("Volume", started["id"])
    vol = job["jobresult"]["volume"]
    assert (vol["id"], vol["name"], vol["type"], vol["size"], vol["state"]) == (
        started["id"], "vol-a", "DATADISK", 3 * GiB, "Allocated")
    assert vol["zoneid"] == cloudstack.zone_id
    assert vol["diskofferingid"] == cloudstack.disk_offering_id
    assert "virtualmachineid" not in vol and vol["created"]


def test_fetch_result_polls_until_the_job_is_done(cloudstack):
    client = cs.CloudStack(cloudstack.url, cloudstack.api_key, cloudstack.secret_key,
                           fetch_result=True, poll_interval=0.05)
    result = client.createVolume(zoneid=cloudstack.zone_id,
                                 diskofferingid=cloudstack.ids["disk_offering_small"])
    assert result["volume"]["size"] == 5 * GiB
    assert cloudstack.calls["queryAsyncJobResult"] >= 2
    assert cloudstack.calls["createVolume"] == 1


def test_create_volume_validation_errors(cloudstack_client, cloudstack):
    c = cloudstack_client
    cases = [
        ({"diskofferingid": cloudstack.disk_offering_id},
         431, 4350, "This disk offering requires a custom size specified"),
        ({"diskofferingid": cloudstack.ids["disk_offering_small"], "size": 3},
         431, 4350, "This disk offering does not allow custom size"),
        ({"diskofferingid": cloudstack.disk_offering_id, "size": 5000},
         431, 4350, "Volume size: 5000GB is out of allowed range. Max: 1024 Min:1"),
    ]
    for kwargs, status, cscode, text in cases:
        with pytest.raises(CloudStackApiException) as exc:
            c.createVolume(zoneid=cloudstack.zone_id, **kwargs)
        assert api_error(exc) == (status, {"uuidList": [], "errorcode": status,
                                           "cserrorcode": cscode, "errortext": text})
    with pytest.raises(CloudStackApiException) as exc:
        c.createVolume(zoneid=cloudstack.oma_vm_id, diskofferingid=cloudstack.disk_offering_id,
                       size=1)
    assert "Invalid parameter zoneid value=" in api_error(exc)[1]["errortext"]


@FAST
def test_attach_makes_the_by_id_link_and_detach_removes_it(cloudstack_client, cloudstack):
    c, oma = cloudstack_client, cloudstack.oma_vm_id
    vol = new_volume(c, cloudstack, 1)
    link = cloudstack.byid_dir / ("virtio-" + vol["id"].replace("-", "")[:20])
    assert cloudstack.device_path(vol["id"]) == link
    assert not link.exists()

    attached = c.attachVolume(id=vol["id"], virtualmachineid=oma, fetch_result=True)["volume"]
    assert (attached["virtualmachineid"], attached["deviceid"], attached["state"]) == (oma, 1, "Ready")
    assert link.is_symlink()
    assert link.resolve() == cloudstack.volume_path(vol["id"]).resolve()
    assert os.path.getsize(link) == GiB
    with open(link, "r+b") as dev:
        dev.seek(GiB - 4)
        dev.write(b"tail")
    with open(cloudstack.volume_path(vol["id"]), "rb") as f:
        f.seek(GiB - 4)
        assert f.read() == b"tail"

    more = [new_volume(c, cloudstack, 1) for _ in range(2)]
    ids = [c.attachVolume(id=v["id"], virtualmachineid=oma, fetch_result=True)["volume"]["deviceid"]
           for v in more]
    assert ids == [2, 4]  # 3 is the CD-ROM slot

    other = new_volume(c, cloudstack, 1)
    c.attachVolume(id=other["id"], virtualmachineid=cloudstack.ids["vm_web01"], fetch_result=True)
    assert not cloudstack.device_path(other["id"]).exists()  # only the OMA VM's disks appear here

    with pytest.raises(CloudStackApiException) as exc:
        c.attachVolume(id=vol["id"], virtualmachineid=oma, fetch_result=True)
    assert exc.value.error == {"errorcode": 431,
                               "errortext": "Please specify a volume that is not attached to any VM."}

    detached = c.detachVolume(id=vol["id"], fetch_result=True)["volume"]
    assert "virtualmachineid" not in detached and detached["state"] == "Ready"
    assert not link.exists() and not link.is_symlink()


@FAST
def test_delete_of_an_attached_volume_is_refused(cloudstack_client, cloudstack):
    c = cloudstack_client
    vol = new_volume(c, cloudstack, 1)
    c.attachVolume(id=vol["id"], virtualmachineid=cloudstack.oma_vm_id, fetch_result=True)
    with pytest.raises(CloudStackApiException) as exc:
        c.deleteVolume(id=vol["id"])
    assert api_error(exc) == (431, {"uuidList": [], "errorcode": 431, "cserrorcode": 4350,
                                    "errortext": "Please specify a volume that is not attached to any VM."})

    c.detachVolume(id=vol["id"], fetch_result=True)
    assert c.deleteVolume(id=vol["id"]) == {"success": True}
    assert not cloudstack.volume_path(vol["id"]).exists()
    assert c.listVolumes(id=vol["id"]) == {}  # a removed id filters to nothing
    with pytest.raises(CloudStackApiException) as exc:
        c.deleteVolume(id=vol["id"])
    assert api_error(exc)[0] == 431


@FAST
def test_resize_volume(cloudstack_client, cloudstack):
    c = cloudstack_client
    vol = new_volume(c, cloudstack, 1)
    grown = c.resizeVolume(id=vol["id"], size=2, fetch_result=True)["volume"]
    assert grown["size"] == 2 * GiB == cloudstack.volume_path(vol["id"]).stat().st_size
    with pytest.raises(CloudStackApiException) as exc:
        c.resizeVolume(id=vol["id"], size=1, fetch_result=True)
    assert exc.value.error["errorcode"] == 431 and "shrinkok" in exc.value.error["errortext"]


# ============================================================================ fault injection


def test_injected_sync_failure_reaches_the_client(cloudstack_client, cloudstack):
    cloudstack.fail("listZones", times=1, errorcode=530, errortext="database is down")
    with pytest.raises(CloudStackApiException) as exc:
        cloudstack_client.listZones()
    assert api_error(exc) == (530, {"uuidList": [], "errorcode": 530, "cserrorcode": 4250,
                                    "errortext": "database is down"})
    assert cloudstack_client.listZones()["count"] == 2
    assert cloudstack.calls["listZones"] == 2


@FAST
def test_injected_async_failure_fails_the_job(cloudstack_client, cloudstack):
    c = cloudstack_client
    vol = new_volume(c, cloudstack, 1)
    cloudstack.fail("attachVolume", errorcode=530, errortext="agent unreachable", async_job=True)
    with pytest.raises(CloudStackApiException) as exc:
        c.attachVolume(id=vol["id"], virtualmachineid=cloudstack.oma_vm_id, fetch_result=True)
    assert exc.value.error == {"errorcode": 530, "errortext": "agent unreachable"}
    [job] = [r for r in cloudstack.requests if r["command"] == "attachVolume"]
    assert job["status"] == 200  # the call itself was accepted; the job failed
    assert "virtualmachineid" not in c.listVolumes(id=vol["id"])["volume"][0]
    assert not cloudstack.device_path(vol["id"]).exists()

    jobid = c.attachVolume(id=vol["id"], virtualmachineid=cloudstack.oma_vm_id)["jobid"]
    assert cloudstack.wait_for_jobs()
    assert c.queryAsyncJobResult(jobid=jobid)["jobstatus"] == 1
    assert cloudstack.device_path(vol["id"]).is_symlink()

    cloudstack.fail("detachVolume", async_job=True)
    jobid = c.detachVolume(id=vol["id"])["jobid"]
    assert cloudstack.wait_for_jobs()
    failed = c.queryAsyncJobResult(jobid=jobid)
    assert (failed["jobstatus"], failed["jobresultcode"], failed["jobresult"]["errorcode"]) == (2, 530, 530)


def test_http_control_path(cloudstack_client, cloudstack):
    base = cloudstack.url.removesuffix("/client/api")
    r = requests.post(base + "/_emulator/fail", timeout=5, json={
        "command": "createVolume", "times": 2, "errorcode": 431, "errortext": "nope"})
    assert r.json() == {"ok": True}
    for _ in range(2):
        with pytest.raises(CloudStackApiException) as exc:
            cloudstack_client.createVolume(zoneid=cloudstack.zone_id,
                                           diskofferingid=cloudstack.disk_offering_id, size=1)
        assert api_error(exc) == (431, {"uuidList": [], "errorcode": 431, "cserrorcode": 4350,
                                        "errortext": "nope"})
    created = cloudstack_client.createVolume(zoneid=cloudstack.zone_id,
                                             diskofferingid=cloudstack.disk_offering_id, size=1)
    assert requests.get(base + "/_emulator/calls", timeout=5).json() == {"calls": {"createVolume": 3}}
    assert requests.post(base + "/_emulator/reset", timeout=5).json() == {"ok": True}
    assert not cloudstack.volume_path(created["id"]).exists()
    assert cloudstack.calls == {}
    assert requests.post(base + "/_emulator/fail", timeout=5,
                         json={"command": "nope"}).status_code == 400


# ============================================================================ VMs and snapshots


@FAST
def test_deploy_start_stop_destroy_and_root_swap(cloudstack_client, cloudstack):
    c, ids = cloudstack_client, cloudstack.ids
    started = c.deployVirtualMachine(
        zoneid=cloudstack.zone_id, serviceofferingid=ids["service_offering_small"],
        templateid=cloudstack.template_id, networkids=[ids["network_test"], ids["network"]],
        name="mig-test-01", startvm=False, rootdisksize=4)
    assert set(started) == {"id", "jobid"}
    assert cloudstack.wait_for_jobs()
    vm = c.queryAsyncJobResult(jobid=started["jobid"])["jobresult"]["virtualmachine"]
    assert (vm["id"], vm["name"], vm["state"]) == (started["id"], "mig-test-01", "Stopped")
    assert [n["networkid"] for n in vm["nic"]] == [ids["network_test"], ids["network"]]
    assert [n["isdefault"] for n in vm["nic"]] == [True, False]
    assert len({n["macaddress"] for n in vm["nic"]}) == 2

    [root] = c.listVolumes(virtualmachineid=vm["id"], type="ROOT")["volume"]
    assert (root["deviceid"], root["size"], root["state"]) == (0, 4 * GiB, "Allocated")
    assert cloudstack.volume_path(root["id"]).stat().st_size == 4 * GiB

    # the failover sequence: drop the template root disk, attach the replicated one as device 0
    assert c.detachVolume(id=root["id"], fetch_result=True)["volume"]["type"] == "DATADISK"
    assert c.deleteVolume(id=root["id"]) == {"success": True}
    replica = new_volume(c, cloudstack, 4)
    as_root = c.attachVolume(id=replica["id"], virtualmachineid=vm["id"], deviceid=0,
                             fetch_result=True)["volume"]
    assert (as_root["type"], as_root["deviceid"]) == ("ROOT", 0)

    running = c.startVirtualMachine(id=vm["id"], fetch_result=True)["virtualmachine"]
    assert running["state"] == "Running"
    assert c.listVolumes(id=replica["id"])["volume"][0]["state"] == "Ready"
    with pytest.raises(CloudStackApiException) as exc:
        c.startVirtualMachine(id=vm["id"], fetch_result=True)
    assert exc.value.error["errorcode"] == 431 and "already running" in exc.value.error["errortext"]

    cloudstack.set_job_delay(0.5, "stopVirtualMachine")
    stopping = c.stopVirtualMachine(id=vm["id"])
    assert c.listVirtualMachines(id=vm["id"])["virtualmachine"][0]["state"] == "Stopping"
    assert cloudstack.wait_for_jobs()
    assert c.queryAsyncJobResult(jobid=stopping["jobid"])["jobresult"]["virtualmachine"][
        "state"] == "Stopped"

    c.destroyVirtualMachine(id=vm["id"], expunge=True, fetch_result=True)
    assert c.listVirtualMachines(id=vm["id"]) == {}
    assert c.listVolumes(id=replica["id"]) == {}
    assert not cloudstack.volume_path(replica["id"]).exists()


@FAST
def test_deploy_validation(cloudstack_client, cloudstack):
    c, ids = cloudstack_client, cloudstack.ids
    base = {"zoneid": cloudstack.zone_id, "templateid": cloudstack.template_id,
            "networkids": ids["network"]}
    with pytest.raises(CloudStackApiException) as exc:  # template is 1.5 GiB -> at least 2 GB
        c.deployVirtualMachine(serviceofferingid=ids["service_offering_small"], rootdisksize=1,
                               **base)
    assert api_error(exc)[1]["cserrorcode"] == 4350
    with pytest.raises(CloudStackApiException) as exc:
        c.deployVirtualMachine(serviceofferingid=cloudstack.service_offering_id, **base)
    assert "custom parameter values" in api_error(exc)[1]["errortext"]
    with pytest.raises(CloudStackApiException) as exc:
        c.deployVirtualMachine(serviceofferingid=ids["service_offering_small"],
                               **{**base, "templateid": ids["template_not_ready"]})
    assert api_error(exc)[0] == 431

    vm = c.deployVirtualMachine(serviceofferingid=cloudstack.service_offering_id,
                                details={"cpuNumber": "4", "memory": "8192"}, name="custom-vm",
                                fetch_result=True, **base)["virtualmachine"]
    assert (vm["cpunumber"], vm["memory"], vm["state"]) == (4, 8192, "Running")


@FAST
def test_snapshot_create_revert_delete(cloudstack_client, cloudstack):
    c = cloudstack_client
    vol = new_volume(c, cloudstack, 1)
    with pytest.raises(CloudStackApiException) as exc:  # never attached: still Allocated
        c.createSnapshot(volumeid=vol["id"])
    assert "is not in Ready state but Allocated" in api_error(exc)[1]["errortext"]

    c.attachVolume(id=vol["id"], virtualmachineid=cloudstack.oma_vm_id, fetch_result=True)
    device = cloudstack.device_path(vol["id"])
    with open(device, "r+b") as dev:
        dev.seek(1 << 20)
        dev.write(b"original")
    snap = c.createSnapshot(volumeid=vol["id"], fetch_result=True)["snapshot"]
    assert (snap["volumeid"], snap["state"]) == (vol["id"], "BackedUp")
    assert cloudstack.snapshot_path(snap["id"]).exists()
    with open(device, "r+b") as dev:
        dev.seek(1 << 20)
        dev.write(b"CHANGED!")
        dev.seek(512 << 20)
        dev.write(b"new data")

    with pytest.raises(CloudStackApiException) as exc:  # the OMA VM is running
        c.revertSnapshot(id=snap["id"], fetch_result=True)
    assert exc.value.error == {
        "errorcode": 431,
        "errortext": "The VM the specified disk is attached to is not in the shutdown state."}

    c.detachVolume(id=vol["id"], fetch_result=True)
    assert c.revertSnapshot(id=snap["id"], fetch_result=True)["snapshot"]["id"] == snap["id"]
    with open(cloudstack.volume_path(vol["id"]), "rb") as f:
        f.seek(1 << 20)
        assert f.read(8) == b"original"
        f.seek(512 << 20)
        assert f.read(8) == bytes(8)

    assert [s["id"] for s in c.listSnapshots(volumeid=vol["id"])["snapshot"]] == [snap["id"]]
    assert c.deleteSnapshot(id=snap["id"], fetch_result=True) == {"success": True}
    assert c.listSnapshots(volumeid=vol["id"]) == {}
    assert not cloudstack.snapshot_path(snap["id"]).exists()


# ============================================================================ helpers, script mode


def test_byid_name():
    assert byid_name("51eaaf3c-1529-4397-ab99-6c69d50957ce") == "virtio-51eaaf3c15294397ab99"


def test_runs_as_a_script(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "omalab.cloudstack_emulator", "--port", "0", "--state-dir",
         str(tmp_path / "cs"), "--job-delay", "0.05"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        assert info["url"].endswith("/client/api")
        client = cs.CloudStack(info["url"], info["api_key"], info["secret_key"],
                               fetch_result=True, poll_interval=0.05)
        assert client.listZones()["count"] == 2
        vol = client.createVolume(zoneid=info["zone_id"], diskofferingid=info["disk_offering_id"],
                                  size=1)["volume"]
        client.attachVolume(id=vol["id"], virtualmachineid=info["oma_vm_id"])
        assert (Path(info["byid_dir"]) / byid_name(vol["id"])).is_symlink()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
