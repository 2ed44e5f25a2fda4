"""omactl against the real OMA server: login and its saved config, the commands of the built families
(text and --json), and the exit-code scheme (100 + gRPC status, 2 usage, 1 reported failure).

Commands run in-process through ``main()`` (fast, output captured); one test runs the installed
console script. VMs are inserted through the models, so no vCenter is needed.
"""
from __future__ import annotations

import io
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from oma.v1 import resources_pb2

from oma_server import server as server_module
from oma_server.db.models import (
    JobStep,
    JobTracking,
    JobTrackingStatus,
    JobType,
    StepStatus,
)
from oma_server.services import service_of
from omaclient import cli, progress
from tests.fixtures.servers import ADMIN_PASSWORD
from tests.helpers.omactl import (
    EXIT_ALREADY_EXISTS,
    EXIT_FAILED_PRECONDITION,
    EXIT_NOT_FOUND,
    EXIT_UNAUTHENTICATED,
    EXIT_UNIMPLEMENTED,
    add_disk,
    add_vm,
    table_rows,
)

REPO = Path(__file__).resolve().parents[2]
VC_PASSWORD = "vc-Secret-0451"  # must never be printed


@pytest.fixture
def target(oma_server) -> str:
    return f"127.0.0.1:{oma_server.port}"


@pytest.fixture
def omactl(run_omactl, target):
    """omactl logged in as admin: later commands find target and token in the saved config."""
    result = run_omactl("--target", target, "login", "--password-stdin", stdin=ADMIN_PASSWORD + "\n")
    assert result.code == 0, result.err
    return run_omactl


# --- session --------------------------------------------------------------------------------------
def test_login_saves_a_private_config_that_later_commands_use(run_omactl, target, tmp_path):
    result = run_omactl("--target", target, "login", "--username", "admin", "--password-stdin",
                        stdin=ADMIN_PASSWORD + "\n")
    assert result.code == 0 and f"logged in to {target} as admin" in result.out
    config = tmp_path / "omactl" / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    saved = json.loads(config.read_text())
    assert saved["target"] == target and saved["token"] and saved["username"] == "admin"
    assert ADMIN_PASSWORD not in config.read_text() + result.out + result.err

    # No --target, no --token: both come from the config.
    listed = run_omactl("vms", "list")
    assert (listed.code, listed.out.strip()) == (0, "no VMs")

    # The saved token is only sent to the target it was issued for (the same server by another name here).
    other = run_omactl("--target", target.replace("127.0.0.1", "localhost"), "vms", "list")
    assert other.code == EXIT_UNAUTHENTICATED

    logout = run_omactl("logout")
    assert logout.code == 0 and "removed the saved token" in logout.out
    assert json.loads(config.read_text()) == {"target": target}
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    after = run_omactl("vms", "list")
    assert after.code == EXIT_UNAUTHENTICATED
    assert "error: UNAUTHENTICATED: missing bearer token" in after.err and "hint: log in with: omactl login" in after.err


def test_wrong_password_and_bad_token_are_unauthenticated(run_omactl, target, tmp_path, monkeypatch):
    result = run_omactl("--target", target, "login", "--password-env", "OMACTL_TEST_PASSWORD")
    assert result.code == cli.EXIT_USAGE and "OMACTL_TEST_PASSWORD is not set" in result.err
    monkeypatch.setenv("OMACTL_TEST_PASSWORD", "wrong")
    result = run_omactl("--target", target, "login", "--password-env", "OMACTL_TEST_PASSWORD")
    assert result.code == EXIT_UNAUTHENTICATED
    assert result.err.startswith("error: UNAUTHENTICATED: invalid username or password")
    assert not (tmp_path / "omactl" / "config.json").exists()

    result = run_omactl("--target", target, "--token", "not-a-token", "groups", "list")
    assert result.code == EXIT_UNAUTHENTICATED and "error: UNAUTHENTICATED:" in result.err


def test_usage_errors_exit_2(run_omactl):
    assert run_omactl("vms", "show").code == cli.EXIT_USAGE  # neither NAME nor --id
    assert run_omactl("credentials", "default", "set").code == cli.EXIT_USAGE
    assert run_omactl("frobnicate").code == cli.EXIT_USAGE
    assert run_omactl("--help").code == 0


# --- credentials ----------------------------------------------------------------------------------
def test_credentials_add_list_default_update_delete_never_show_the_password(omactl, monkeypatch):
    outputs = []

    def run(*argv, stdin=""):
        result = omactl(*argv, stdin=stdin)
        outputs.append(result.out + result.err)
        return result

    added = run("credentials", "add", "lab", "--vcenter", "vc.lab", "--username", "administrator@vsphere.local",
                "--datacenter", "DC1", "--password-stdin", stdin=VC_PASSWORD + "\n")
    assert added.code == 0 and added.out.startswith("added credential ")
    lab_id = added.out.split()[2]
    monkeypatch.setenv("VC_PASSWORD", VC_PASSWORD)
    second = run("--json", "credentials", "add", "dr", "--vcenter", "vc-dr.lab", "--username", "svc",
                 "--datacenter", "DR", "--insecure", "--password-env", "VC_PASSWORD")
    assert second.code == 0
    dr = second.json()["credential"]
    assert dr["credential_name"] == "dr" and dr["tls_insecure"] is True and dr["is_default"] is False

    listed = run("credentials", "list")
    rows = table_rows(listed.out)
    assert rows[0][:4] == ["ID", "NAME", "VCENTER", "USERNAME"]
    assert {r[1] for r in rows[1:]} == {"lab", "dr"}
    as_json = run("credentials", "list", "--json").json()
    assert {c["credential_name"] for c in as_json["credentials"]} == {"lab", "dr"}
    assert all("password" not in c for c in as_json["credentials"])

    assert run("credentials", "default", "set", dr["id"]).code == 0
    shown = run("credentials", "default")
    assert shown.code == 0 and "Name:" in shown.out and "dr" in shown.out and "not verified (insecure)" in shown.out

    updated = run("credentials", "update", dr["id"], "--datacenter", "DR2", "--password-stdin",
                  stdin=VC_PASSWORD + "-new\n")
    assert updated.code == 0
    assert run("--json", "credentials", "show", dr["id"]).json()["credential"]["datacenter"] == "DR2"

    deleted = run("credentials", "delete", lab_id)
    assert deleted.code == 0 and deleted.out.strip() == f"deleted credential {lab_id}"
    missing = run("credentials", "show", lab_id)
    assert missing.code == EXIT_NOT_FOUND and missing.err.startswith("error: NOT_FOUND: ")

    assert not any(VC_PASSWORD in text for text in outputs)


# --- VMs and the JobLog ---------------------------------------------------------------------------
def test_vms_list_and_show(omactl, db):
    web = add_vm("web-01")
    add_disk(web, 2000, 40, ("VM Network",))
    add_disk(web, 2001, 100)
    add_vm("db-01", current_status="ready_for_failover", cpu_count=8, memory_mb=32768)

    listed = omactl("vms", "list")
    rows = table_rows(listed.out)
    assert listed.code == 0 and rows[0][:3] == ["NAME", "STATUS", "POWER"]
    assert sorted(r[0] for r in rows[1:]) == ["db-01", "web-01"]
    assert table_rows(omactl("vms", "list", "--status", "ready_for_failover").out)[1][0] == "db-01"
    as_json = omactl("vms", "list", "--name", "WEB", "--json").json()
    assert [c["vm_name"] for c in as_json["vm_contexts"]] == ["web-01"] and as_json["count"] == 1

    shown = omactl("vms", "show", "web-01")
    assert shown.code == 0
    assert "Context ID:" in shown.out and web.context_id in shown.out
    assert "Disks\nDISK" in shown.out and "Hard disk 2" in shown.out and "100.0 GiB" in shown.out
    by_id = omactl("vms", "show", "--id", web.context_id, "--json").json()["details"]
    assert [d["disk_id"] for d in by_id["disks"]] == ["disk-2000", "disk-2001"]

    missing = omactl("vms", "show", "nope")
    assert missing.code == EXIT_NOT_FOUND
    assert missing.err.strip() == "error: NOT_FOUND: no managed VM named 'nope'"


def test_vms_delete_and_jobs_list_show(omactl, db):
    web = add_vm("web-01")
    add_vm("db-01")
    job = JobTracking.create(job_type=JobType.MIGRATION, operation="replicate-vm", status=JobTrackingStatus.FAILED,
                             context_id=web.context_id, owner="admin", error_message="NBD export failed")
    JobStep.create(job=job, name="create-volumes", seq=1, status=StepStatus.COMPLETED)
    JobStep.create(job=job, name="start-export", seq=2, status=StepStatus.FAILED, error_message="port in use")

    deleted = omactl("vms", "delete", "db-01")
    assert deleted.code == 0 and deleted.out.startswith("removed db-01 from management (job ")
    cleanup_job = deleted.out.strip().rstrip(")").rsplit(" ", 1)[1]
    assert [r[0] for r in table_rows(omactl("vms", "list").out)[1:]] == ["web-01"]

    listed = omactl("jobs", "list")
    rows = table_rows(listed.out)
    assert rows[0][:4] == ["ID", "TYPE", "OPERATION", "STATUS"]
    assert {(r[0], r[2], r[3]) for r in rows[1:]} == {
        (cleanup_job, "delete-vm-context", "completed"), (job.id, "replicate-vm", "failed")}
    for_web = omactl("--json", "jobs", "list", "--vm", "web-01")
    assert [j["id"] for j in for_web.json()["jobs"]] == [job.id]
    assert omactl("jobs", "list", "--status", "completed", "--json").json()["jobs"][0]["id"] == cleanup_job

    shown = omactl("jobs", "show", job.id)
    assert shown.code == 0 and "Error:" in shown.out and "NBD export failed" in shown.out
    steps = table_rows(shown.out.split("Steps\n", 1)[1])
    assert [(s[0], s[1], s[2]) for s in steps[1:]] == [("1", "create-volumes", "completed"),
                                                        ("2", "start-export", "failed")]
    assert "port in use" in steps[2]
    assert omactl("jobs", "show", "no-such-job").code == EXIT_NOT_FOUND


# --- groups and network mappings ------------------------------------------------------------------
def test_groups_create_assign_list_show_delete(omactl, db):
    for name in ("web-01", "web-02", "db-01"):
        add_vm(name)
    created = omactl("groups", "create", "wave-1", "--priority", "10", "--description", "first wave")
    assert created.code == 0 and created.out.startswith("created group wave-1 (")
    assert omactl("groups", "create", "wave-1").code == EXIT_ALREADY_EXISTS

    assigned = omactl("groups", "assign", "wave-1", "web-01", "web-02")
    assert assigned.code == 0 and assigned.out.splitlines() == ["assigned web-01 to wave-1",
                                                                "assigned web-02 to wave-1"]
    rows = table_rows(omactl("groups", "list").out)
    assert rows[0][:3] == ["NAME", "VMS", "ENABLED"] and rows[1][:4] == ["wave-1", "2", "2", "10"]
    shown = omactl("groups", "show", "wave-1")
    assert "first wave" in shown.out
    members = table_rows(shown.out.split("Members\n", 1)[1])
    assert [m[0] for m in members[1:]] == ["web-01", "web-02"]
    group = omactl("--json", "groups", "list").json()["groups"][0]
    assert group["name"] == "wave-1" and group["total_vms"] == 2

    # VMs are named by name, groups by name or id.
    unassigned = omactl("groups", "unassign", group["id"], "web-02", "--json")
    assert unassigned.code == 0 and [m["vm_name"] for m in unassigned.json()["group"]["memberships"]] == ["web-01"]
    unknown = omactl("groups", "assign", "wave-9", "db-01")
    assert unknown.code == EXIT_NOT_FOUND and unknown.err.startswith("error: NOT_FOUND: no machine group named 'wave-9'")
    busy = omactl("groups", "delete", "wave-1")
    assert busy.code == EXIT_FAILED_PRECONDITION and busy.err.startswith("error: FAILED_PRECONDITION: ")
    assert omactl("groups", "unassign", "wave-1", "web-01").code == 0
    assert omactl("groups", "delete", "wave-1").code == 0
    assert omactl("groups", "list").out.strip() == "no machine groups"


def test_mappings_add_list_status_delete(omactl, db):
    web = add_vm("web-01")
    add_disk(web, 2000, 40, ("VM Network", "Backup"))

    live = omactl("mappings", "add", "web-01", "VM Network", "net-1001", "--destination-name", "prod-net")
    assert live.code == 0 and live.out.strip() == "created live mapping of web-01: VM Network -> prod-net (pending)"
    test = omactl("mappings", "add", "web-01", "VM Network", "net-2002", "--test")
    assert test.code == 0 and "created test mapping" in test.out

    rows = table_rows(omactl("mappings", "list").out)
    assert rows[0][:3] == ["VM", "SOURCE NETWORK", "DESTINATION"]
    assert sorted((r[1], r[2], r[3]) for r in rows[1:]) == [
        ("VM Network", "net-2002", "test"), ("VM Network", "prod-net (net-1001)", "live")]
    only_test = omactl("mappings", "list", "--test", "--json").json()["network_mappings"]
    assert [m["destination_network_id"] for m in only_test] == ["net-2002"]

    status = omactl("mappings", "status", "web-01")
    assert status.code == 0 and "Readiness:" in status.out and "Backup" in status.out
    assert omactl("--json", "mappings", "status", "web-01").json()["unmapped_live_networks"] == ["Backup"]

    deleted = omactl("mappings", "delete", "web-01", "VM Network", "--test")
    assert deleted.code == 0 and deleted.out.startswith("deleted 1 mapping(s)")
    assert len(omactl("--json", "mappings", "list", "--vm", "web-01").json()["network_mappings"]) == 1
    assert omactl("mappings", "delete", "web-01", "Backup").code == EXIT_NOT_FOUND


# --- RPCs the server does not offer --------------------------------------------------------------
# One command per RPC family, with the RPC it calls (after resolving names through VMContextService).
COMMAND_RPCS = {
    ("credentials", "list"): "VMwareCredentialService.ListCredentials",
    ("credentials", "test", "1"): "VMwareCredentialService.TestCredential",
    ("discover", "--credential", "1"): "DiscoveryService.PreviewDiscovery",
    ("add", "web-02", "--credential", "1"): "DiscoveryService.AddVMs",
    ("replicate", "web-01", "--no-follow"): "ReplicationService.CreateReplication",
    ("watch", "job-1"): "ProgressService.WatchReplicationProgress",
    ("cancel", "job-1"): "ReplicationService.CancelReplication",
    ("replications", "list"): "ReplicationService.ListReplications",
    ("jobs", "show", "job-1"): "JobLogService.GetJob",
    ("mappings", "status", "web-01"): "NetworkMappingService.GetNetworkMappingStatus",
    ("groups", "list"): "MachineGroupService.ListGroups",
    ("cloudstack", "set", "prod", "--secret-key-stdin"): "OSSEAConfigService.ListConfigs",
    ("cloudstack", "activate", "1"): "OSSEAConfigService.ActivateConfig",
    ("cloudstack", "test"): "OSSEAConfigService.TestConfig",
    ("cloudstack", "detect-oma-vm", "--api-url", "http://cs:8080/client/api", "--api-key", "k",
     "--secret-key-stdin"): "CloudStackSettingsService.DetectOMAVM",
}


def test_a_missing_rpc_exits_112_naming_it(run_omactl, oma_factory, monkeypatch, db):
    """The server answers UNIMPLEMENTED for every service it does not list as built; serve only login and
    VM contexts so that each family of commands meets that answer (and shows which RPC it calls)."""
    every_servicer = server_module.build_servicers
    monkeypatch.setattr(server_module, "build_servicers", lambda runtime, parts: [
        s for s in every_servicer(runtime, parts) if service_of(s) in {"oma.v1.AuthService", "oma.v1.VMContextService"}])
    server = oma_factory()
    login = run_omactl("--target", f"127.0.0.1:{server.port}", "login", "--password-stdin",
                       stdin=ADMIN_PASSWORD + "\n")
    assert login.code == 0, login.err
    add_vm("web-01")
    for argv, rpc in COMMAND_RPCS.items():
        result = run_omactl(*argv, stdin="secret\n")
        assert (result.code, result.err.strip()) == (
            EXIT_UNIMPLEMENTED, f"error: UNIMPLEMENTED: oma.v1.{rpc} is not built yet"), argv


# --- following a job ------------------------------------------------------------------------------
def _progress(status: str, pct: float, *, terminal: bool = False) -> resources_pb2.ReplicationProgress:
    """A progress update as the server sends it (for the display's rendering test)."""
    update = resources_pb2.ReplicationProgress(
        job_id="job-7", vm_name="web-01", status=status, replication_type="initial", progress_percent=pct,
        bytes_transferred=int(pct * 1024**3 / 10), total_bytes=10 * 1024**3, transfer_speed_bps=100 * 1024**2,
        terminal=terminal,
    )
    update.started_at.FromSeconds(1_700_000_000)
    update.disks.add(disk_id="disk-2000", label="Hard disk 1", sync_status="syncing", sync_progress_percent=pct,
                     bytes_synced=int(pct * 1024**3 / 10), total_bytes=10 * 1024**3, throughput_mbps=100)
    return update


def test_replicate_follows_a_real_job_and_watch_replays_it(lab_private, run_omactl, monkeypatch):
    lab = lab_private
    target = f"127.0.0.1:{lab.oma.port}"
    assert run_omactl("--target", target, "login", "--password-stdin", stdin=ADMIN_PASSWORD + "\n").code == 0
    vm = lab.vcenter.data_vms[0]
    added = run_omactl("add", vm, "--credential", str(lab.credential_id))
    assert added.code == 0, added.err
    done = run_omactl("replicate", vm, "--full")
    assert done.code == 0, done.err
    started, finished = done.out.strip().splitlines()
    job_id = started.rsplit(" ", 1)[1]
    assert started == f"started initial replication of {vm}: job {job_id}"
    assert finished.startswith(f"job {job_id} completed: 128.0 MiB")
    lines = done.err.splitlines()  # stderr is not a terminal here: plain progress lines
    assert lines and all(f"job {job_id}" in line for line in lines) and "completed" in lines[-1]

    as_json = run_omactl("--json", "watch", job_id)
    updates = [json.loads(line) for line in as_json.out.splitlines()]
    assert as_json.code == 0 and updates[-1]["status"] == "completed" and updates[-1]["terminal"]

    lab.vcenter.stop()  # vCenter goes away: the next job fails in its first step
    failed = run_omactl("replicate", vm)
    assert failed.code == cli.EXIT_FAILED and "step 'prepare-disks' failed" in failed.out, failed

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(progress, "follow", interrupted)
    stopped = run_omactl("watch", job_id)
    assert stopped.code == cli.EXIT_INTERRUPTED and f"Resume with: omactl watch {job_id}" in stopped.err


def test_terminal_display_redraws_one_bar_per_disk_in_place(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    screen = io.StringIO()
    display = progress.TerminalDisplay(screen)
    display.update(_progress("replicating", 25))
    display.update(_progress("replicating", 50))
    first, second = screen.getvalue().split("\x1b[2F\x1b[J")  # second draw: up 2 lines, clear
    assert "[######------------------]  25.0%" in first and "2.5 GiB of 10.0 GiB" in first
    assert "[############------------]  50.0%" in second and "100.0 MiB/s" in second and "ETA 51s" in second


# --- the installed console script -----------------------------------------------------------------
def test_console_script(target, tmp_path, db):
    add_vm("web-01")
    env = {**os.environ, "OMACTL_CONFIG": str(tmp_path / "config.json")}
    env.pop("OMA_TOKEN", None)
    omactl = [str(REPO / ".venv" / "bin" / "omactl")]
    login = subprocess.run([*omactl, "--target", target, "login", "--password-stdin"], input=ADMIN_PASSWORD + "\n",
                           env=env, capture_output=True, text=True, timeout=60)
    assert login.returncode == 0, login.stderr
    listed = subprocess.run([*omactl, "vms", "list", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert [c["vm_name"] for c in json.loads(listed.stdout)["vm_contexts"]] == ["web-01"]
    missing = subprocess.run([*omactl, "vms", "show", "nope"], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == EXIT_NOT_FOUND and "error: NOT_FOUND:" in missing.stderr


# --- terminal safety (issue 9, item 7) ------------------------------------------------------------
HOSTILE_NAMES = {"esc": "evil\x1b[2J\x1b[31m-vm", "cr": "shown\rhidden", "rtl": "invoice\u202egpj.exe"}
RAW = ("\x1b", "\r", "\u202e")


def test_names_with_control_and_bidi_characters_are_printed_escaped(omactl, db):
    """Rows written before the input checks (or text a peer sent) reach the terminal escaped, in
    tables, in record views and in error messages; --json stays valid JSON with the exact values."""
    contexts = {kind: add_vm(name, vmware_vm_id=f"4210-{kind}") for kind, name in HOSTILE_NAMES.items()}
    listed = omactl("vms", "list")
    assert listed.code == 0
    assert not any(raw in listed.out for raw in RAW)
    for escaped in ("evil\\x1b[2J\\x1b[31m-vm", "shown\\rhidden", "invoice\\u202egpj.exe"):
        assert escaped in listed.out
    assert len(table_rows(listed.out)) == 1 + len(HOSTILE_NAMES)  # no row broken apart by a CR

    for kind, ctx in contexts.items():
        shown = omactl("vms", "show", "--id", ctx.context_id)
        assert shown.code == 0 and not any(raw in shown.out for raw in RAW), kind
        as_json = omactl("vms", "show", "--id", ctx.context_id, "--json")
        assert not any(raw in as_json.out for raw in RAW), kind
        assert as_json.json()["details"]["context"]["vm_name"] == HOSTILE_NAMES[kind]  # the exact value, JSON-escaped

    listed_json = omactl("vms", "list", "--json")
    assert sorted(c["vm_name"] for c in listed_json.json()["vm_contexts"]) == sorted(HOSTILE_NAMES.values())

    refused = omactl("groups", "create", "wave\x1b[2J")  # the server refuses it; the error is escaped too
    assert refused.code == 103 and not any(raw in refused.err for raw in RAW) and "U+001B" in refused.err


def test_output_escapes_every_unsafe_character_and_json_keeps_the_value():
    from omaclient import output

    assert output.printable("a\x00b\x1bc\u202ed\u200be\u2028f\x85g\tok") == \
        "a\\x00b\\x1bc\\u202ed\\u200be\\u2028f\\x85g\\tok"
    assert output.printable("line 1\nline 2", keep_newlines=True) == "line 1\nline 2"
    assert output.printable("Zoë 東京 ok") == "Zoë 東京 ok"
    message = resources_pb2.VMContext(vm_name="rtl\u202eexe\U000e0001tag")
    text = output.to_json(message)
    assert "\u202e" not in text and "\U000e0001" not in text
    assert json.loads(text)["vm_name"] == "rtl\u202eexe\U000e0001tag"
