"""NBD exports bound to their job (issue 9, item 10): TLS with a per-job pre-shared key enforced by the
real nbdkit, and each approved VMA's permitopen limited to the export ports of its running jobs —
rewritten when a job starts and ends, and enforced by a real sshd."""
from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import socket
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from oma_server.config import load_settings
from oma_server.db import models
from oma_server.domain import enrollment, job_lifecycle, nbd_access
from oma_server.domain.crypto import SecretBox
from oma_server.integrations import ssh_keys
from oma_server.integrations.nbd_exports import ExportManager
from tests import factories
from tests.fixtures.sshd import start_sshd
from vma_agent import errors as vma_errors
from vma_agent.integrations import vsphere
from vma_agent.integrations.nbd_client import NbdConnection, NbdError
from vma_agent.replication import DiskRequest, JobRequest, ReplicationJobs, TargetTls, tls_target_uri

USER = getpass.getuser()


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _free_range(count: int) -> int:
    """A port p with p … p+count-1 free."""
    for _ in range(50):
        first = _free_ports(1)[0]
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return first
    raise AssertionError("no free port range")


def _psk_file(directory: Path, identity: str, psk: bytes) -> str:
    path = directory / f"{identity}-{secrets.token_hex(2)}.psk"
    path.write_text(f"{identity}:{psk.hex()}\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def exports(tmp_path):
    box = SecretBox(secrets.token_bytes(32))
    port = _free_ports(1)[0]
    manager = ExportManager(bind_host="127.0.0.1", public_host="127.0.0.1", port_min=port, port_max=port,
                            psk_dir=tmp_path / "nbd-tls", psk_for=lambda job_id: nbd_access.export_psk(box, job_id))
    disk = tmp_path / "volume.img"
    disk.write_bytes(b"replica!" * 8192)
    yield manager, disk, box
    manager.stop()


def test_a_process_stopping_its_export_leaves_the_key_file_of_another_processes_export(exports, tmp_path):
    """Two OMA processes of one appliance share the data dir: when one stops its server for an export (a
    takeover), the nbdkit the other one started for the same export keeps its key file."""
    manager, disk, box = exports
    port = _free_ports(1)[0]
    other = ExportManager(bind_host="127.0.0.1", public_host="127.0.0.1", port_min=port, port_max=port,
                          psk_dir=tmp_path / "nbd-tls", psk_for=lambda job_id: nbd_access.export_psk(box, job_id))
    try:
        manager.ensure("migration-vol-1", str(disk), job_id="job-one")
        other.ensure("migration-vol-1", str(disk), job_id="job-one")
        manager.stop()
        _, argv = other.current("migration-vol-1")
        key_file = next(a.split("=", 1)[1] for a in argv if a.startswith("--tls-psk="))
        assert Path(key_file).exists()
    finally:
        other.stop()
    assert list((tmp_path / "nbd-tls").iterdir()) == []


def test_nbdkit_serves_a_jobs_export_only_to_a_client_with_that_jobs_key(exports, tmp_path):
    manager, disk, box = exports
    export = manager.ensure("migration-vol-1", str(disk), job_id="job-one")
    psk = nbd_access.export_psk(box, "job-one")
    assert export.tls.identity == "job-one" and export.tls.psk == psk and psk.hex() not in repr(export)
    psk_dir = tmp_path / "nbd-tls"
    assert stat.S_IMODE(psk_dir.stat().st_mode) == 0o700
    assert [(p.name.split(".")[0], p.suffix, stat.S_IMODE(p.stat().st_mode))
            for p in psk_dir.iterdir()] == [("migration-vol-1", ".psk", 0o600)]
    _, argv = manager.current("migration-vol-1")
    assert "--tls=require" in argv and not any(psk.hex() in arg for arg in argv)  # never on a command line

    right = tls_target_uri(export.uri, TargetTls("job-one", psk), _psk_file(tmp_path, "job-one", psk))
    with NbdConnection(right, name="agent", write=True, connect_timeout=10) as conn:
        assert conn.size == disk.stat().st_size

    other_job = nbd_access.export_psk(box, "job-two")
    refused = {
        "plain NBD": export.uri,
        "wrong key": tls_target_uri(export.uri, TargetTls("job-one", other_job),
                                    _psk_file(tmp_path, "job-one", other_job)),
        "another job's identity and key": tls_target_uri(export.uri, TargetTls("job-two", other_job),
                                                         _psk_file(tmp_path, "job-two", other_job)),
    }
    for what, uri in refused.items():
        with pytest.raises(NbdError):
            NbdConnection(uri, name=what, connect_timeout=10).close()

    # The next job of the volume gets the export on the same port with its own key; the old key is refused.
    again = manager.ensure("migration-vol-1", str(disk), job_id="job-two")
    assert again.port == export.port and again.tls.identity == "job-two"
    with pytest.raises(NbdError):
        NbdConnection(right, name="previous job", connect_timeout=10).close()
    # Served for no job (a volume back on the OMA after a failover): nobody's key opens it.
    unbound = manager.ensure("migration-vol-1", str(disk), job_id=None)
    assert unbound.tls.identity == "no-job" and manager.ensure("migration-vol-1", str(disk)) == unbound
    with pytest.raises(NbdError):
        NbdConnection(export.uri, name="plain client", connect_timeout=10).close()
    manager.remove("migration-vol-1")
    assert list(psk_dir.iterdir()) == []  # the key file lives only as long as the export


def test_the_key_is_the_same_in_every_oma_process_and_differs_per_job():
    key = secrets.token_bytes(32)
    assert nbd_access.export_psk(SecretBox(key), "job-a") == nbd_access.export_psk(SecretBox(key), "job-a")
    assert nbd_access.export_psk(SecretBox(key), "job-a") != nbd_access.export_psk(SecretBox(key), "job-b")
    assert len(nbd_access.export_psk(SecretBox(key), "job-a")) == 32


# --- permitopen ---------------------------------------------------------------------------------------------


class _Listener:
    """A TCP server on 127.0.0.1:port that greets every connection with its own name."""

    def __init__(self, port: int, name: str):
        self.sock = socket.create_server(("127.0.0.1", port))
        self.name = name
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(f"{self.name}\n".encode())

    def close(self) -> None:
        self.sock.close()


def _key(tmp_path: Path, name: str) -> tuple[Path, ssh_keys.Ed25519PublicKey]:
    private = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(private)], check=True)
    return private, ssh_keys.parse_public_key(private.with_suffix(".pub").read_text())[0]


def _approved(tunnel: enrollment.Tunnel, name: str, key: ssh_keys.Ed25519PublicKey, reverse_port: int):
    row = models.VmaEnrollment.create(pairing_code=secrets.token_hex(10), vma_public_key=key.openssh(),
                                      vma_name=name, vma_fingerprint=key.fingerprint, status="approved",
                                      expires_at=models.utcnow())
    models.VmaActiveConnection.create(enrollment=row.id, vma_name=name, vma_fingerprint=key.fingerprint,
                                      reverse_tunnel_port=reverse_port, connected_at=models.utcnow())
    tunnel.keys.add(key, reverse_port)


def _forward(sshd_port: int, private: Path, target_port: int) -> subprocess.CompletedProcess:
    """``ssh -W``: one direct-tcpip channel to 127.0.0.1:target_port through sshd, as a local forward opens."""
    return subprocess.run(
        ["ssh", "-F", "none", "-i", str(private), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-p", str(sshd_port),
         "-W", f"127.0.0.1:{target_port}", f"{USER}@127.0.0.1"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def test_a_vma_may_forward_only_to_the_exports_of_its_running_jobs(db, tmp_path):
    sshd_port = _free_ports(1)[0]
    own_export = _free_range(2)  # the OMA's port ranges are contiguous
    other_export, reverse_a = own_export + 1, _free_range(2)
    reverse_b = reverse_a + 1
    settings = load_settings({
        "data_dir": tmp_path / "oma", "tunnel_authorized_keys": str(tmp_path / "home" / ".ssh" / "authorized_keys"),
        "tunnel_ssh_user": USER, "tunnel_ssh_port": sshd_port, "nbd_port_min": own_export,
        "nbd_port_max": other_export, "tunnel_reverse_port_min": reverse_a, "tunnel_reverse_port_max": reverse_b,
    }, environ={})
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    tunnel = enrollment.tunnel_for(settings)
    private_a, key_a = _key(tmp_path, "vma_a")  # the VMA this OMA drives (its tunnel is OMA_VMA_ADDRESS)
    private_b, key_b = _key(tmp_path, "vma_b")
    _approved(tunnel, "vma-a", key_a, reverse_a)
    _approved(tunnel, "vma-b", key_b, reverse_b)
    permits = nbd_access.ExportPermits(lambda: tunnel, f"127.0.0.1:{reverse_a}", "127.0.0.1")

    ctx = factories.context()
    running = factories.replication_job(ctx, status="replicating")
    ended = factories.replication_job(factories.context(), status="completed")
    for job, port, volume in ((running, own_export, "own"), (ended, other_export, "other")):
        models.NbdExport.create(job=job.id, export_name=f"migration-vol-{volume}", port=port, device_path="/dev/x")

    nbd_access.install(permits)
    try:
        nbd_access.job_started(running.id)
        lines = {line.split()[-1]: line for line in tunnel.keys.path.read_text().splitlines()}
        assert f'permitopen="127.0.0.1:{own_export}"' in lines[key_a.fingerprint]
        assert f":{other_export}" not in lines[key_a.fingerprint].split("permitlisten")[0]
        assert f'permitopen="{ssh_keys.NO_OPEN_TARGET}"' in lines[key_b.fingerprint]
        assert f'permitlisten="127.0.0.1:{reverse_b}"' in lines[key_b.fingerprint]
        assert stat.S_IMODE(tunnel.keys.path.stat().st_mode) == 0o600

        dropin = tmp_path / "sshd" / "oma-vma-tunnel.conf"
        dropin.parent.mkdir()
        dropin.write_text(tunnel.keys.sshd_config(USER, sshd_port, tunnel.reverse_ports))
        listeners = [_Listener(own_export, "own-export"), _Listener(other_export, "other-export")]
        try:
            with start_sshd(tmp_path / "sshd", settings.data_dir / "ssh_host_ed25519_key", dropin,
                            port=sshd_port) as sshd:
                own = _forward(sshd.port, private_a, own_export)
                assert own.returncode == 0 and own.stdout == "own-export\n", own.stderr
                for private, port in ((private_a, other_export), (private_b, own_export), (private_b, other_export)):
                    refused = _forward(sshd.port, private, port)
                    assert refused.returncode == 255 and "administratively prohibited" in refused.stderr, \
                        refused.stderr
                    assert "export" not in refused.stdout

                # The job ends: its VMA loses the port at once.
                assert job_lifecycle.finish(running.id, models.JobStatus.COMPLETED)
                line_a = next(line for line in tunnel.keys.path.read_text().splitlines()
                              if line.endswith(key_a.fingerprint))
                assert f'permitopen="{ssh_keys.NO_OPEN_TARGET}"' in line_a
                after = _forward(sshd.port, private_a, own_export)
                assert after.returncode == 255 and "administratively prohibited" in after.stderr, after.stderr
        finally:
            for listener in listeners:
                listener.close()
    finally:
        nbd_access.install(None)


def test_grants_are_not_written_without_approved_vmas_and_a_revoked_key_is_not_put_back(db, tmp_path):
    settings = load_settings({"data_dir": tmp_path / "oma", "nbd_port_min": 20000, "nbd_port_max": 20001,
                              "tunnel_reverse_port_min": 21000, "tunnel_reverse_port_max": 21001}, environ={})
    built = []
    permits = nbd_access.ExportPermits(lambda: built.append(1) or enrollment.tunnel_for(settings),
                                       "127.0.0.1:21000", "127.0.0.1")
    assert permits.sync() == 0 and built == []  # the lab: no tunnel VMA, nothing to grant or build

    tunnel = enrollment.tunnel_for(settings)
    _, key = _key(tmp_path, "vma")
    _approved(tunnel, "vma", key, 21000)
    job = factories.replication_job(factories.context(), status="replicating")
    models.NbdExport.create(job=job.id, export_name="migration-vol-x", port=20001, device_path="/dev/x")
    assert permits.sync() == 1 and 'permitopen="127.0.0.1:20001"' in tunnel.keys.path.read_text()
    assert permits.sync() == 0  # nothing changed: no write

    tunnel.keys.remove(key)  # revoked while the job runs
    assert permits.sync() == 0 and tunnel.keys.path.read_text() == ""
    assert not os.path.exists(f"{tunnel.keys.path}.tmp")


def test_the_agent_takes_the_key_only_in_target_tls_and_keeps_it_out_of_repr():
    def request(uri: str, tls: TargetTls | None) -> JobRequest:
        return JobRequest(job_id="job-1", context_id="ctx", connection=vsphere.VCenterParams("vc", "u", "p"),
                          datacenter="DC0", vm=vsphere.VMRef(uuid="u-1"),
                          disks=(DiskRequest("disk-2000", 2000, uri),), target_tls=tls)

    key = TargetTls("job-1", secrets.token_bytes(32))
    ReplicationJobs._validate(request("nbd://127.0.0.1:10809/migration-vol-1", key))
    assert key.psk.hex() not in repr(request("nbd://127.0.0.1:10809/x", key))
    refused = {
        "nbds://job-1@127.0.0.1:10809/x?tls-psk-file=/etc/shadow": None,  # the OMA may not name a local file
        "nbd+unix:///x?socket=/run/x.sock": key,  # TLS only over TCP
    }
    for uri, tls in refused.items():
        with pytest.raises(vma_errors.InvalidArgument):
            ReplicationJobs._validate(request(uri, tls))
    for bad in (TargetTls("a:b", key.psk), TargetTls("", key.psk), TargetTls("job-1", b"short")):
        with pytest.raises(vma_errors.InvalidArgument, match="target_tls"):
            ReplicationJobs._validate(request("nbd://127.0.0.1:10809/x", bad))
    assert tls_target_uri("nbd://127.0.0.1:10809/migration-vol-1", key, "/tmp/d/target.psk") == \
        "nbds://job-1@127.0.0.1:10809/migration-vol-1?tls-psk-file=/tmp/d/target.psk"


def test_the_server_serves_exports_with_tls_unless_configured_off(oma_factory):
    on = oma_factory(vma_address="127.0.0.1:9", vma_retries=0)
    tls = on.components.exports.tls_for("job-1")
    assert tls.identity == "job-1" and tls.psk == nbd_access.export_psk(on.runtime.secrets, "job-1")
    off = oma_factory(vma_address="127.0.0.1:9", vma_retries=0, nbd_tls=False)
    assert off.components.exports.tls_for("job-1") is None
