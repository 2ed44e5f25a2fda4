"""The OMA server's TLS listener (docs/design/enrollment.md#transport: enrollment RPCs over TLS, the
certificate pinned by the VMAs): the same services, health and reflection as the plaintext port; a
self-signed certificate generated once into the data dir (key 0600) and reused across restarts, naming
127.0.0.1 and localhost; configured certificate files; its fingerprint logged, never the key; clear startup
errors for unusable files; and production refusing a non-loopback plaintext listen."""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from oma.v1 import vm_contexts_pb2

from oma_server import tls
from oma_server.config import load_settings
from omaclient.client import OmaClient
from tests.fixtures.servers import ADMIN_PASSWORD, start_oma

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING


def _health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _sha256(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@pytest.fixture
def tls_oma(oma_factory):
    return oma_factory(tls_listen="127.0.0.1:0")


def test_health_and_reflection_over_tls_with_the_certificate_as_root(tls_oma):
    cert_path = tls_oma.tls_identity.cert_path
    assert cert_path == tls_oma.runtime.settings.data_dir / "oma-tls.crt" and tls_oma.tls_port != tls_oma.port
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    credentials = grpc.ssl_channel_credentials(cert_path.read_bytes())
    for host in ("127.0.0.1", "localhost"):  # the name is checked against the SANs: no override needed
        with grpc.secure_channel(f"{host}:{tls_oma.tls_port}", credentials) as channel:
            assert _health(channel) == SERVING
    with grpc.secure_channel(f"127.0.0.1:{tls_oma.tls_port}", credentials) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=5)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"oma.v1.EnrollmentService", "oma.v1.AuthService", "grpc.health.v1.Health"} <= names
    with grpc.insecure_channel(f"127.0.0.1:{tls_oma.port}") as channel:  # the plaintext port stays
        assert _health(channel) == SERVING


def test_the_tls_port_speaks_only_tls_with_its_certificate(tls_oma):
    with grpc.insecure_channel(f"127.0.0.1:{tls_oma.tls_port}") as channel, pytest.raises(grpc.RpcError) as err:
        _health(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    other_pem = tls.generate_self_signed(["localhost", "127.0.0.1"])[0]  # same names, another certificate
    for port, roots in ((tls_oma.tls_port, other_pem), (tls_oma.tls_port, None), (tls_oma.port, other_pem)):
        with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(roots)) as channel, \
                pytest.raises(grpc.RpcError) as err:
            _health(channel)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_login_and_an_authenticated_rpc_over_tls(tls_oma):
    cert_path = tls_oma.tls_identity.cert_path
    # The CA as a Path, a path string, PEM bytes and PEM text.
    for ca in (cert_path, str(cert_path), cert_path.read_bytes(), cert_path.read_text()):
        with OmaClient(f"localhost:{tls_oma.tls_port}", token="", tls_ca=ca) as client:
            assert client.login("admin", ADMIN_PASSWORD).token
            assert client.contexts.ListVMContexts(vm_contexts_pb2.ListVMContextsRequest(), timeout=5).count == 0
    with OmaClient(f"127.0.0.1:{tls_oma.tls_port}", token="", tls_ca=cert_path) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.contexts.ListVMContexts(vm_contexts_pb2.ListVMContextsRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # TLS does not replace the token
    with pytest.raises(ValueError, match="cannot read the TLS CA file"):
        OmaClient(f"127.0.0.1:{tls_oma.tls_port}", token="", tls_ca=cert_path.with_name("missing.crt"))


def test_the_generated_certificate_is_reused_across_restarts(db, tmp_path, caplog):
    caplog.set_level("INFO", logger="oma_server")
    data_dir = tmp_path / "oma"
    with start_oma(data_dir, db, tls_listen="127.0.0.1:0") as first:
        identity = first.tls_identity
        assert identity.generated and identity.sha256 == _sha256(identity.cert_path.read_bytes())
        with OmaClient(f"127.0.0.1:{first.tls_port}", token="", tls_ca=identity.cert_path) as client:
            client.wait_ready(5)
    key_bytes = identity.key_path.read_bytes()
    assert identity.key_path == data_dir / "oma-tls.key"
    assert stat.S_IMODE(identity.key_path.stat().st_mode) == 0o600
    assert not [p for p in data_dir.iterdir() if p.name.startswith(".oma-tls")]  # no temporary files left
    with start_oma(data_dir, db, tls_listen="127.0.0.1:0") as second:
        assert second.tls_identity.sha256 == identity.sha256
        assert identity.key_path.read_bytes() == key_bytes
        with grpc.secure_channel(f"127.0.0.1:{second.tls_port}",
                                 grpc.ssl_channel_credentials(identity.cert_pem)) as channel:
            assert _health(channel) == SERVING

    # The fingerprint is logged at every start for pinning; the key never is.
    started = [r.getMessage() for r in caplog.records if "listening with TLS" in r.getMessage()]
    assert len(started) == 2 and all(identity.fingerprint in line for line in started)
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", identity.fingerprint)
    key_body = "".join(key_bytes.decode().splitlines()[1:-1])
    assert "PRIVATE KEY" not in caplog.text and key_body[:40] not in caplog.text


def test_configured_certificate_files(oma_factory, tmp_path):
    cert_pem, key_pem = tls.generate_self_signed(["oma.lab"])
    (tmp_path / "oma.crt").write_bytes(cert_pem)
    (tmp_path / "oma.key").write_bytes(key_pem)
    running = oma_factory(tls_listen="127.0.0.1:0", tls_cert_file=str(tmp_path / "oma.crt"),
                          tls_key_file=str(tmp_path / "oma.key"))
    assert not running.tls_identity.generated and running.tls_identity.sha256 == _sha256(cert_pem)
    assert not (running.runtime.settings.data_dir / "oma-tls.key").exists()
    # The certificate names oma.lab only: a client connecting by address checks that name instead.
    with OmaClient(f"127.0.0.1:{running.tls_port}", token="", tls_ca=cert_pem) as client, \
            pytest.raises(grpc.RpcError):
        client.login("admin", ADMIN_PASSWORD)
    with OmaClient(f"127.0.0.1:{running.tls_port}", token="", tls_ca=cert_pem, tls_server_name="oma.lab") as client:
        assert client.login("admin", ADMIN_PASSWORD).token


def test_unusable_certificate_files_stop_the_start_with_a_clear_message(tmp_path):
    cert_pem, key_pem = tls.generate_self_signed(["oma.lab"])
    other_key = tls.generate_self_signed(["oma.lab"])[1]
    files = {"cert.pem": cert_pem, "key.pem": key_pem, "other.key": other_key, "garbage.pem": b"not a cert\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cases = [
        ({"tls_cert_file": str(tmp_path / "missing.pem"), "tls_key_file": str(tmp_path / "key.pem")},
         f"cannot read the TLS certificate file {tmp_path / 'missing.pem'}: No such file or directory"),
        ({"tls_cert_file": str(tmp_path / "cert.pem"), "tls_key_file": str(tmp_path / "missing.key")},
         f"cannot read the TLS key file {tmp_path / 'missing.key'}"),
        ({"tls_cert_file": str(tmp_path / "cert.pem")}, "needs both a certificate file and a key file"),
        ({"tls_cert_file": str(tmp_path / "garbage.pem"), "tls_key_file": str(tmp_path / "key.pem")},
         "holds no PEM certificate"),
        ({"tls_cert_file": str(tmp_path / "cert.pem"), "tls_key_file": str(tmp_path / "garbage.pem")},
         "holds no PEM private key"),
        ({"tls_cert_file": str(tmp_path / "cert.pem"), "tls_key_file": str(tmp_path / "other.key")},
         "does not belong to the certificate"),
    ]
    for settings, message in cases:
        with pytest.raises(SystemExit) as exc, start_oma(tmp_path / "oma", tls_listen="127.0.0.1:0", **settings):
            pass
        assert str(exc.value.code).startswith("cannot serve TLS on 127.0.0.1:0: ") and message in str(exc.value.code)
    assert not (tmp_path / "oma" / "oma.db").exists()  # refused before touching the database


def test_a_tls_address_in_use_stops_the_start(db, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        with pytest.raises(SystemExit) as exc, start_oma(tmp_path / "oma", db, tls_listen=address):
            pass
    assert str(exc.value.code).startswith(f"cannot listen on {address} (TLS)")


def test_production_refuses_a_non_loopback_plaintext_listen(tmp_path):
    keys = {"production": True, "token_secret": "t" * 32, "encryption_key": "A" * 43 + "="}
    for listen in ("0.0.0.0:9090", "[::]:9090", ":9090", "10.1.2.3:9090", "oma.example.com:9090"):
        with pytest.raises(SystemExit) as exc, start_oma(tmp_path / "oma", listen=listen, **keys):
            pass
        assert f"refuses plaintext gRPC on the non-loopback address {listen}" in str(exc.value.code)
        assert "OMA_TLS_LISTEN" in str(exc.value.code)
    for listen in ("127.0.0.1:9090", "localhost:9090", "[::1]:9090", "127.0.0.2:1", "unix:/run/oma.sock"):
        assert tls.is_loopback(listen), listen
    # Explicitly allowed (a TLS-terminating proxy in front), or not production: the listen is accepted.
    settings = load_settings({"listen": "0.0.0.0:9090"}, environ={
        "OMA_PRODUCTION": "1", "OMA_ALLOW_PLAINTEXT_LISTEN": "1", "OMA_TLS_LISTEN": "0.0.0.0:8443"})
    assert settings.allow_plaintext_listen and settings.tls_listen == "0.0.0.0:8443"
    from oma_server.server import _check_listen

    _check_listen(settings)
    _check_listen(load_settings({"listen": "0.0.0.0:9090"}, environ={}))


def test_oma_server_flags_and_startup_lines(tmp_path):
    """``oma-server --tls-listen``: both ports and the certificate's fingerprint on stdout; a bad certificate
    path ends the process with the message on stderr."""
    env = {**os.environ, "OMA_ADMIN_PASSWORD": ADMIN_PASSWORD}
    base = [sys.executable, "-m", "oma_server.cli", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "oma"),
            "--tls-listen", "127.0.0.1:0"]
    failed = subprocess.run([*base, "--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", str(tmp_path / "nope.key")],
                            env=env, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1
    assert f"cannot read the TLS certificate file {tmp_path / 'nope.crt'}" in failed.stderr

    proc = subprocess.Popen(base, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines, deadline = [], time.monotonic() + 30
        while len(lines) < 2 or "serving TLS" not in lines[-1]:
            assert time.monotonic() < deadline and proc.poll() is None, lines
            line = proc.stdout.readline()
            if "serving" in line:
                lines.append(line.strip())
        plain = re.fullmatch(r"oma-server: serving on port (\d+)", lines[0])
        secure = re.fullmatch(r"oma-server: serving TLS on port (\d+), certificate SHA-256 ([0-9A-F:]{95})",
                              lines[1])
        assert plain and secure, lines
        cert_pem = (tmp_path / "oma" / "oma-tls.crt").read_bytes()
        assert secure.group(2).replace(":", "").lower() == _sha256(cert_pem)
        with grpc.secure_channel(f"127.0.0.1:{secure.group(1)}", grpc.ssl_channel_credentials(cert_pem)) as ch:
            assert _health(ch) == SERVING
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_omactl_over_tls_saves_the_root_at_login_and_shows_the_pin_with_a_pairing_code(tls_oma, run_omactl,
                                                                                       tmp_path, monkeypatch):
    identity = tls_oma.tls_identity
    target = f"127.0.0.1:{tls_oma.tls_port}"
    # Plaintext to the TLS port fails as unreachable, with the hint to check the target.
    plain = run_omactl("--target", target, "login", "--password-stdin", stdin=ADMIN_PASSWORD + "\n")
    assert plain.code == 114 and "error: UNAVAILABLE" in plain.err, plain
    missing = run_omactl("--target", target, "--tls-ca", str(tmp_path / "nope.crt"), "login", "--password-stdin",
                         stdin=ADMIN_PASSWORD + "\n")
    assert (missing.code, missing.err.strip()) == (2, f"error: cannot read the TLS CA file {tmp_path / 'nope.crt'}: "
                                                      f"No such file or directory")

    monkeypatch.chdir(identity.cert_path.parent)  # a relative path is saved as an absolute one
    login = run_omactl("--target", target, "--tls-ca", identity.cert_path.name, "login", "--password-stdin",
                       stdin=ADMIN_PASSWORD + "\n")
    assert login.code == 0, login.err
    saved = json.loads(Path(os.environ["OMACTL_CONFIG"]).read_text())
    assert (saved["target"], saved["tls_ca"]) == (target, str(identity.cert_path))
    monkeypatch.chdir(tmp_path)

    code = run_omactl("vma", "pairing-code")  # target, token and TLS root all from the saved login
    assert code.code == 0, code.err
    assert f"OMA TLS certificate sha256: {identity.fingerprint} " in code.out
    as_json = json.loads(run_omactl("--json", "vma", "pairing-code").out)
    assert as_json["oma_certificate_sha256"] == identity.fingerprint

    logout = run_omactl("logout")
    assert logout.code == 0
    assert json.loads(Path(os.environ["OMACTL_CONFIG"]).read_text()) == {"target": target,
                                                                          "tls_ca": str(identity.cert_path)}


def test_a_pairing_code_from_an_oma_without_tls_says_the_vma_cannot_pin_it(oma_server, run_omactl):
    login = run_omactl("--target", f"127.0.0.1:{oma_server.port}", "login", "--password-stdin",
                       stdin=ADMIN_PASSWORD + "\n")
    assert login.code == 0, login.err
    code = run_omactl("vma", "pairing-code")
    assert code.code == 0 and "the OMA serves no TLS listener" in code.out, code
    assert json.loads(run_omactl("--json", "vma", "pairing-code").out)["oma_certificate_sha256"] == ""
