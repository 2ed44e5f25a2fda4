"""The server kit both servers are built from (issue 10 item 3): settings converted strictly and refused by
name on both servers, domain errors mapped to statuses by the one interceptor (with the OMA's and the
agent's parts plugged in), reflection under ``grpc.reflection.v1`` and ``v1alpha``, and the one private-file
writer (mode 0600, atomic, exclusive creation)."""
from __future__ import annotations

import ast
import base64
import os
import socket
import stat
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

import oma_server.config
import vma_agent.config
from oma_server.domain.crypto import load_or_create_key_file
from server_kit import errors, metrics, private_files, serving, settings
from server_kit.rpc import STATUS_MESSAGE_MAX_CHARS, CallInterceptor, shared_token
from tests.fixtures.servers import VMA_TOKEN, start_vma

KIT = Path(settings.__file__).parent
GRPCURL = Path(sys.executable).parent / "grpcurl"


# --- settings ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "value"), [("1", True), ("true", True), (" YES ", True), ("True", True),
                                            ("0", False), ("false", False), ("No", False)])
def test_booleans_take_exactly_the_six_spellings(raw, value):
    assert settings.convert(raw, bool) is value


@pytest.mark.parametrize("raw", ["ture", "on", "off", "", "2", "y", "enabled"])
def test_any_other_boolean_is_refused(raw):
    with pytest.raises(ValueError, match="not a boolean"):
        settings.convert(raw, bool)


def test_numbers_paths_and_lists_convert_strictly(tmp_path):
    assert settings.convert(" 42 ", int) == 42
    assert settings.convert("2.5", float) == 2.5
    for raw, kind, says in (("4.5", int, "not a whole number"), ("", int, "not a whole number"),
                            ("ten", float, "not a number"), ("nan", float, "not a finite number"),
                            ("inf", float, "not a finite number"), ("  ", Path, "an empty path")):
        with pytest.raises(ValueError, match=says):
            settings.convert(raw, kind)
    assert settings.convert("~/x", Path) == Path.home() / "x"
    assert settings.convert(" a, b ,,c ", tuple[str, ...]) == ("a", "b", "c")
    assert settings.convert("a,b", list[str]) == ["a", "b"]
    assert settings.convert("", tuple[str, ...]) == ()
    assert settings.convert(" kept as is ", str) == " kept as is "


@pytest.mark.parametrize(("load", "variable"), [(oma_server.config.load_settings, "OMA_PRODUCTION"),
                                                (oma_server.config.load_settings, "OMA_NBD_TLS"),
                                                (vma_agent.config.load_settings, "VMA_TUNNEL_ENABLED")])
def test_both_servers_refuse_a_mistyped_boolean_by_name(load, variable):
    with pytest.raises(settings.ConfigError) as refused:
        load(environ={variable: "ture"})
    assert str(refused.value) == f"invalid {variable}='ture': not a boolean (use 1/0, true/false or yes/no)"


def test_both_servers_read_numbers_and_paths_and_let_flags_win(tmp_path):
    oma = oma_server.config.load_settings({"listen": "127.0.0.1:1"}, environ={
        "OMA_LISTEN": "127.0.0.1:2", "OMA_MAX_WORKERS": "7", "OMA_DATA_DIR": str(tmp_path),
        "OMA_TOKEN_REVOCATION_CACHE_SECONDS": "0.5", "OMA_NBD_TLS": "no"})
    assert (oma.listen, oma.max_workers, oma.data_dir, oma.token_revocation_cache_seconds, oma.nbd_tls) == \
        ("127.0.0.1:1", 7, tmp_path, 0.5, False)
    assert oma_server.config.load_settings({"data_dir": "~/oma"}, environ={}).data_dir == Path.home() / "oma"
    vma = vma_agent.config.load_settings(environ={"VMA_WORK_DIR": str(tmp_path), "VMA_PARALLEL_DISKS": "3",
                                                  "VMA_TUNNEL_ENABLED": "0"})
    assert (vma.work_dir, vma.parallel_disks, vma.tunnel_enabled) == (tmp_path, 3, False)
    with pytest.raises(settings.ConfigError, match=r"^invalid VMA_PARALLEL_DISKS='two': not a whole number$"):
        vma_agent.config.load_settings(environ={"VMA_PARALLEL_DISKS": "two"})


def test_the_original_key_variable_is_read_only_without_the_own_one():
    key = base64.b64encode(b"k" * 32).decode()
    assert oma_server.config.load_settings(environ={"MIGRATEKIT_CRED_ENCRYPTION_KEY": key}).encryption_key == key
    assert oma_server.config.load_settings(environ={"MIGRATEKIT_CRED_ENCRYPTION_KEY": key,
                                                   "OMA_ENCRYPTION_KEY": "own"}).encryption_key == "own"


def test_a_long_bad_value_is_quoted_cut():
    with pytest.raises(settings.ConfigError) as refused:
        vma_agent.config.load_settings(environ={"VMA_MAX_WORKERS": "9" * 50 + "x" * 5000})
    assert len(str(refused.value)) < 200 and "…" in str(refused.value)


@pytest.mark.parametrize(("command", "variable"), [("oma-server", "OMA_PRODUCTION"), ("vma-agent", "VMA_TUNNEL_ENABLED")])
def test_both_commands_stop_before_listening_naming_the_variable(tmp_path, command, variable):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMA_", "VMA_"))}
    env.update({variable: "ture", "OMA_DATA_DIR": str(tmp_path / "oma"), "VMA_WORK_DIR": str(tmp_path)})
    done = subprocess.run([str(Path(sys.executable).with_name(command))], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().endswith(f"not started: invalid {variable}='ture': not a boolean (use 1/0, "
                                        "true/false or yes/no)"), done.stderr
    assert not (tmp_path / "oma").exists()  # nothing was created before the refusal


def test_loopback_addresses():
    for address in ("127.0.0.1:9090", "localhost:1", "[::1]:9090", "127.0.0.2:1", "unix:/run/x.sock"):
        assert settings.is_loopback(address), address
    for address in ("0.0.0.0:9090", "[::]:1", ":9090", "10.0.0.1:1", "oma.example.com:443"):
        assert not settings.is_loopback(address), address
    assert settings.listen_host("[fe80::1]:9") == "fe80::1"


def test_the_kit_imports_neither_server():
    imported = set()
    for path in KIT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
    assert "grpc" in imported and not imported & {"oma_server", "vma_agent", "omalab"}
    # the servers' domain modules import the kit's errors and private files, which must not pull in grpc
    for domain_module in ("errors.py", "private_files.py", "settings.py"):
        tree = ast.parse((KIT / domain_module).read_text())
        assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) and "grpc" in ast.unparse(n) for n in ast.walk(tree))


# --- the interceptor: errors → status ----------------------------------------------------------------------

class _Recorder:
    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def __call__(self, method: str, code: str, seconds: float | None) -> None:
        self.calls.append((method, code))


def _raising(request: bytes, context: grpc.ServicerContext) -> bytes:
    kind = request.decode()
    if kind == "ok":
        return b"fine"
    if kind == "retry":
        raise errors.ResourceExhausted("too many attempts, wait 3 s", retry_after_seconds=3.0)
    if kind == "long":
        raise errors.InvalidArgument("x" * 10_000)
    if kind == "bug":
        raise KeyError("a secret internal detail")
    if kind == "unbuilt":
        raise NotImplementedError
    raise getattr(errors, kind)(f"{kind} because of the test")


def _stream(request: bytes, context: grpc.ServicerContext):
    yield b"first"
    raise errors.NotFound("job vanished")


@pytest.fixture
def kit_server():
    recorder, checked = _Recorder(), []
    interceptor = CallInterceptor(authenticate=shared_token("s" * 20, "this test server needs its token"),
                                  check_request=checked.append, record_rpc=recorder, server_name="test server")
    server = serving.new_server(interceptor, max_workers=4, max_concurrent_rpcs=8)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("kit.Test", {
        "Call": grpc.unary_unary_rpc_method_handler(_raising),
        "Watch": grpc.unary_stream_rpc_method_handler(_stream),
    }),))
    port = serving.bind(server, "127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, recorder, checked
    server.stop(None)


def _call(channel: grpc.Channel, kind: str, token: str = "s" * 20):
    call = channel.unary_unary("/kit.Test/Call")
    try:
        return call(kind.encode(), metadata=(("authorization", f"Bearer {token}"),), timeout=10), None
    except grpc.RpcError as exc:
        return None, exc


@pytest.mark.parametrize("name", ["InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition", "Unavailable",
                                  "DeadlineExceeded", "Unauthenticated", "PermissionDenied", "ResourceExhausted",
                                  "NotBuiltYet"])
def test_each_domain_error_becomes_its_status(kit_server, name):
    channel, recorder, _ = kit_server
    _, error = _call(channel, name)
    assert error.code() == getattr(grpc.StatusCode, getattr(errors, name).code)
    assert error.details() == f"{name} because of the test"
    assert recorder.calls == [("/kit.Test/Call", error.code().name)]
    pushback = dict(error.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
    assert pushback == ("-1" if name == "Unavailable" else None)


def test_ok_retry_info_bounds_bugs_and_unbuilt(kit_server):
    channel, recorder, checked = kit_server
    assert _call(channel, "ok") == (b"fine", None) and checked == [b"ok"]
    _, error = _call(channel, "retry")
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    detail = rpc_status.from_call(error).details[0]
    info = error_details_pb2.RetryInfo()
    assert detail.Unpack(info) and info.retry_delay.seconds == 3
    _, error = _call(channel, "long")
    assert len(error.details()) == STATUS_MESSAGE_MAX_CHARS and error.details().endswith("(10000 characters)")
    _, error = _call(channel, "bug")
    assert (error.code(), error.details()) == (grpc.StatusCode.INTERNAL, "internal error (logged on the test server)")
    _, error = _call(channel, "unbuilt")
    assert (error.code(), error.details()) == (grpc.StatusCode.UNIMPLEMENTED, "kit.Test.Call is not built yet")
    assert [code for _, code in recorder.calls] == ["OK", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "INTERNAL",
                                                    "UNIMPLEMENTED"]


def test_the_shared_token_is_required_and_streams_map_errors(kit_server):
    channel, recorder, checked = kit_server
    for token in ("wrong-token-of-twenty", ""):
        _, error = _call(channel, "ok", token=token)
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, "this test server needs its token")
    with pytest.raises(grpc.RpcError) as no_header:
        channel.unary_unary("/kit.Test/Call")(b"ok", timeout=10)
    assert no_header.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert checked == []  # refused before the request was even looked at
    stream = channel.unary_stream("/kit.Test/Watch")(b"", metadata=(("authorization", "Bearer " + "s" * 20),),
                                                     timeout=10)
    assert next(stream) == b"first"
    with pytest.raises(grpc.RpcError) as ended:
        next(stream)
    assert (ended.value.code(), ended.value.details()) == (grpc.StatusCode.NOT_FOUND, "job vanished")
    assert recorder.calls[-1] == ("/kit.Test/Watch", "NOT_FOUND")


def test_rpc_metrics_are_counted_and_served():
    rpcs = metrics.RpcMetrics("kit_test")
    rpcs.record("/kit.Test/Call", "OK", 0.02)
    rpcs.record("/kit.Test/Call", "NOT_FOUND", None)
    rpcs.record("/kit.Test/Call", "NOT_FOUND", None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics.serve(f"127.0.0.1:{port}")
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'kit_test_rpc_handled_total{code="OK",method="/kit.Test/Call"} 1.0' in scraped
    assert 'kit_test_rpc_handled_total{code="NOT_FOUND",method="/kit.Test/Call"} 2.0' in scraped
    assert 'kit_test_rpc_handling_seconds_count{method="/kit.Test/Call"} 1.0' in scraped


# --- reflection: v1 and v1alpha ------------------------------------------------------------------------------

def _reflect(channel: grpc.Channel, request_class: type, response_class: type, path: str, **request):
    call = channel.stream_stream(path, request_serializer=request_class.SerializeToString,
                                 response_deserializer=response_class.FromString)
    return next(iter(call(iter([request_class(**request)]), timeout=30)))


def test_reflection_answers_under_v1_and_v1alpha(tmp_path):
    request_v1, response_v1 = serving.reflection_v1_messages()
    assert request_v1.DESCRIPTOR.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    with start_vma(work_dir=tmp_path) as agent, grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        v1 = _reflect(channel, request_v1, response_v1, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                      list_services="")
        alpha = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
        names_v1 = {s.name for s in v1.list_services_response.service}
        assert names_v1 == {s.name for s in next(alpha).list_services_response.service}
        assert {"vma.v1.ProgressService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"} <= names_v1
        for symbol in ("vma.v1.ProgressService", "grpc.reflection.v1.ServerReflection"):
            found = _reflect(channel, request_v1, response_v1,
                             "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", file_containing_symbol=symbol)
            assert found.file_descriptor_response.file_descriptor_proto, symbol

        listed = subprocess.run([str(GRPCURL), "-plaintext", "-H", f"authorization: Bearer {VMA_TOKEN}",
                                 f"127.0.0.1:{agent.port}", "list"], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr  # grpcurl 1.8.6 speaks v1alpha
        assert {"vma.v1.ProgressService", "grpc.reflection.v1.ServerReflection"} <= set(listed.stdout.split())
        described = subprocess.run([str(GRPCURL), "-plaintext", f"127.0.0.1:{agent.port}", "describe",
                                    "grpc.reflection.v1.ServerReflection"], capture_output=True, text=True, timeout=60)
        assert described.returncode == 0 and "rpc ServerReflectionInfo" in described.stdout, described.stderr


# --- private files -------------------------------------------------------------------------------------------

def test_a_private_file_is_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        private_files.write_private(tmp_path / "key", "secret\n")
        private_files.write_private(tmp_path / "cert", b"public", mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "cert").stat().st_mode) == 0o644
    assert (tmp_path / "key").read_text() == "secret\n" and (tmp_path / "cert").read_bytes() == b"public"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert", "key"]  # no temporary file left


def test_a_reader_sees_the_old_or_the_new_file_never_a_mix(tmp_path):
    target = tmp_path / "state.json"
    versions = [bytes([65 + i]) * 4_000_000 for i in range(2)]
    private_files.write_private(target, versions[0])
    seen, done = set(), threading.Event()

    def read():
        while not done.is_set():
            data = target.read_bytes()
            seen.add((data[:1], data[-1:], len(data)))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(20):
        private_files.write_private(target, versions[i % 2])
    done.set()
    reader.join()
    assert seen <= {(b"A", b"A", 4_000_000), (b"B", b"B", 4_000_000)} and seen


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "authorized_keys"
    private_files.write_private(target, "old\n")
    if os.geteuid() == 0:  # root may give files away; an unknown directory fails for everyone
        with pytest.raises(FileNotFoundError):
            private_files.write_private(tmp_path / "missing" / "x", "new\n")
    else:
        with pytest.raises(PermissionError):
            private_files.write_private(target, "new\n", owner=(0, 0))
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["authorized_keys"]


def test_exclusive_creation_keeps_the_first_file(tmp_path):
    target = tmp_path / "token.secret"
    private_files.write_private(target, "first\n", exclusive=True)
    with pytest.raises(FileExistsError):
        private_files.write_private(target, "second\n", exclusive=True)
    assert target.read_text() == "first\n" and [p.name for p in tmp_path.iterdir()] == ["token.secret"]


def test_racing_starts_share_one_generated_key(tmp_path):
    path, keys, barrier = tmp_path / "data" / "encryption.key", [], threading.Barrier(8)

    def start():
        barrier.wait()
        keys.append(load_or_create_key_file(path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1 and len(keys[0]) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
