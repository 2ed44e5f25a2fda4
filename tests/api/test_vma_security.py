"""Who may call the VMA agent and how much it accepts (issue 9, item 2): no token means loopback only (the
agent refuses to start otherwise, naming the setting), anonymous callers cannot touch progress, every
string/bytes/repeated field of every vma.v1 RPC has a limit (INVALID_ARGUMENT naming the field, quoting at
most 100 characters, never a password), the progress store is capped with eviction of ended jobs, and a
job this agent's data mover runs cannot be overwritten through UpdateProgress."""
from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import vma.v1
from google.protobuf import descriptor_pool, message_factory
from vma.v1 import progress_pb2 as pb
from vma.v1 import progress_pb2_grpc, replication_pb2_grpc, vcenter_pb2
from vma.v1 import replication_pb2 as rpb

from tests.fixtures.servers import VMA_TOKEN, start_vma
from vma_agent import errors, request_limits
from vma_agent.config import ConfigError, Settings, load_settings
from vma_agent.integrations.nbdkit import NbdkitServer, file_plugin_args
from vma_agent.progress_store import MAX_DISKS_PER_JOB, MAX_ERRORS_PER_JOB, JobStatus, ProgressStore, ProgressUpdate
from vma_agent.server import build_server

META = (("authorization", f"Bearer {VMA_TOKEN}"),)
LONG_TOKEN = "a-token-of-at-least-16-characters"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


# --- no token: loopback only ------------------------------------------------------------------------------

@pytest.mark.parametrize("listen", ["0.0.0.0:{port}", "[::]:{port}", ":{port}", "vma.example:{port}"])
def test_the_agent_refuses_a_non_loopback_address_without_a_token(listen, tmp_path):
    port = _free_port()
    with pytest.raises(ConfigError) as err:
        build_server(Settings(listen=listen.format(port=port), work_dir=tmp_path))
    assert "is not a loopback address and auth_token (VMA_AUTH_TOKEN) is empty" in str(err.value)
    assert not _listening(port)
    with pytest.raises(ConfigError) as err:
        build_server(Settings(listen=listen.format(port=port), auth_token="short", work_dir=tmp_path))
    assert str(err.value) == (f"auth_token (VMA_AUTH_TOKEN) must be at least 16 characters when listen "
                              f"({listen.format(port=port)!r}) is not a loopback address")
    assert not _listening(port)


def test_the_vma_agent_command_exits_with_the_reason_and_starts_with_a_token(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMA_")}
    env.update(VMA_LISTEN=f"0.0.0.0:{port}", VMA_WORK_DIR=str(tmp_path))
    agent = str(Path(sys.executable).with_name("vma-agent"))
    refused = subprocess.run([agent], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"vma-agent: not started: listen = '0.0.0.0:{port}' is not a loopback address "
                                     f"and auth_token (VMA_AUTH_TOKEN) is empty"), refused.stderr
    assert not _listening(port)
    with subprocess.Popen([agent], env={**env, "VMA_AUTH_TOKEN": LONG_TOKEN}, stdout=subprocess.PIPE, text=True) \
            as started:
        try:
            assert started.stdout.readline().strip() == f"vma-agent: serving on port {port}"
            assert _listening(port)
        finally:
            started.terminate()
            started.wait(30)


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "localhost:0", "[::1]:0", "127.0.0.2:0"])
def test_loopback_without_a_token_starts(listen, tmp_path):
    with start_vma(listen=listen, auth_token="", work_dir=tmp_path) as agent:
        assert agent.port > 0


def test_progress_max_jobs_must_be_positive():
    with pytest.raises(ConfigError, match=r"progress_max_jobs \(VMA_PROGRESS_MAX_JOBS\) must be at least 1"):
        load_settings(environ={"VMA_PROGRESS_MAX_JOBS": "0"}).check()


# --- anonymous callers, limits on every RPC -----------------------------------------------------------------

@pytest.fixture
def agent(tmp_path):
    with start_vma(work_dir=tmp_path / "vma", progress_max_jobs=3) as running:
        yield running


@pytest.fixture
def channel(agent):
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as ch:
        yield ch


def test_an_anonymous_caller_cannot_read_or_overwrite_progress(channel):
    stub = progress_pb2_grpc.ProgressServiceStub(channel)
    stub.UpdateProgress(pb.UpdateProgressRequest(job_id="job-1", status=pb.JOB_STATUS_RUNNING, percent=10),
                        metadata=META, timeout=5)
    for call in (lambda: stub.UpdateProgress(pb.UpdateProgressRequest(job_id="job-1", status=pb.JOB_STATUS_FAILED,
                                                                      error_message="forged"), timeout=5),
                 lambda: stub.UpdateProgress(pb.UpdateProgressRequest(job_id="job-1", status=pb.JOB_STATUS_FAILED),
                                             metadata=(("authorization", "Bearer wrong"),), timeout=5)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    got = stub.GetProgress(pb.GetProgressRequest(job_id="job-1"), metadata=META, timeout=5).progress
    assert (got.status, got.percentage, list(got.errors), got.sequence) == (pb.JOB_STATUS_RUNNING, 10.0, [], 1)


def _requests() -> list[tuple[str, object, bool]]:
    """(full method path, request class, server-streaming) of every vma.v1 RPC."""
    found = []
    for module in pkgutil.iter_modules(vma.v1.__path__):
        if module.name.endswith("_pb2") and not module.name.endswith("_grpc"):
            pb2 = importlib.import_module(f"vma.v1.{module.name}")
            for service in pb2.DESCRIPTOR.services_by_name.values():
                for method in service.methods:
                    request = message_factory.GetMessageClass(
                        descriptor_pool.Default().FindMessageTypeByName(method.input_type.full_name))
                    found.append((f"/{service.full_name}/{method.name}", request, method.server_streaming))
    return found


def _oversized(request_class) -> list[tuple[str, object, str]]:
    """For each string/bytes/repeated field (at any depth): (field path, a request with only that field over
    its limit, the secret it carries or '')."""
    cases = []

    def walk(descriptor, path, build):
        for field in descriptor.fields:
            name = f"{path}{field.name}"
            if field.message_type is not None and not field.is_repeated:
                walk(field.message_type, f"{name}.",
                     lambda m, f=field, b=build: b(m).__getattribute__(f.name))
                continue
            limit_key = field.full_name
            if field.is_repeated:
                count = request_limits.REPEATED_MAX.get(limit_key, request_limits.DEFAULT_REPEATED_MAX) + 1
                cases.append((name, _set(request_class, build, field, count=count), ""))
            elif field.type in (field.TYPE_STRING, field.TYPE_BYTES):
                size = request_limits.STRING_MAX.get(limit_key, request_limits.DEFAULT_STRING_MAX) + 1
                secret = "s3cret-" * (size // 7 + 1) if limit_key in request_limits.SECRET_FIELDS else ""
                cases.append((name, _set(request_class, build, field, size=size, secret=secret), secret))

    walk(request_class.DESCRIPTOR, "", lambda m: m)
    return cases


def _set(request_class, build, field, *, size=0, count=0, secret=""):
    message = request_class()
    target = build(message)
    if count:
        values = getattr(target, field.name)
        for _ in range(count):
            if field.message_type is not None:
                values.add()
            elif field.type == field.TYPE_STRING:
                values.append("x")
            elif field.type == field.TYPE_BYTES:
                values.append(b"x")
            else:
                values.append(0)
    elif field.type == field.TYPE_BYTES:
        setattr(target, field.name, b"x" * size)
    else:
        setattr(target, field.name, secret or "x" * size)
    return message


CASES = [(method, path, request, secret, streaming) for method, request_class, streaming in _requests()
         for path, request, secret in _oversized(request_class)]


def test_every_rpc_has_limited_fields():
    methods = {method for method, *_ in CASES}
    assert len(methods) >= 15 and "/vma.v1.ProgressService/UpdateProgress" in methods
    assert {path for method, path, *_ in CASES if method == "/vma.v1.ReplicationService/StartReplication"} >= {
        "job_id", "connection.password", "connection.ca_pem", "vm.path", "disks"}


@pytest.mark.parametrize(("method", "path", "request_message", "secret", "streaming"), CASES,
                         ids=[f"{c[0].rsplit('/', 1)[1]}:{c[1]}" for c in CASES])
def test_every_field_over_its_limit_is_refused_by_name(channel, method, path, request_message, secret, streaming):
    call = (channel.unary_stream if streaming else channel.unary_unary)(
        method, request_serializer=type(request_message).SerializeToString, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as err:
        result = call(request_message, metadata=META, timeout=10)
        if streaming:
            list(result)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    details = err.value.details()
    assert details.startswith(f"{path} "), details
    assert len(details) < 300
    if secret:
        assert "s3cret" not in details


def test_a_one_megabyte_job_id_is_refused_with_a_short_message(channel):
    stub = progress_pb2_grpc.ProgressServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.UpdateProgress(pb.UpdateProgressRequest(job_id="j" * 1_000_000), metadata=META, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == (f"job_id {'j' * 100!r}… (1000000 characters) is not valid: at most 128 "
                                   f"characters (got 1000000)")
    for bad in ("../etc", "job 1", "job\n1"):
        with pytest.raises(grpc.RpcError) as err:
            stub.UpdateProgress(pb.UpdateProgressRequest(job_id=bad), metadata=META, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "may contain only" in err.value.details()


# --- the progress store's cap ------------------------------------------------------------------------------

def test_the_progress_store_is_capped_and_evicts_the_longest_ended_job_first():
    store = ProgressStore(max_jobs=3)
    for job in ("a", "b", "c"):
        store.apply(ProgressUpdate(job_id=job, status=JobStatus.RUNNING))
    with pytest.raises(errors.ResourceExhausted, match="already tracks 3 running jobs"):
        store.apply(ProgressUpdate(job_id="d", status=JobStatus.RUNNING))
    assert store.get("d") is None
    store.apply(ProgressUpdate(job_id="b", status=JobStatus.SUCCEEDED))
    store.apply(ProgressUpdate(job_id="a", status=JobStatus.FAILED))
    store.apply(ProgressUpdate(job_id="d", status=JobStatus.RUNNING))  # evicts b, which ended first
    assert sorted(r.job_id for r in store.jobs()) == ["a", "c", "d"]
    store.apply(ProgressUpdate(job_id="e", status=JobStatus.RUNNING))  # then a
    assert sorted(r.job_id for r in store.jobs()) == ["c", "d", "e"]
    store.apply(ProgressUpdate(job_id="c", status=JobStatus.RUNNING))  # known jobs are always updated


def test_disks_and_errors_per_job_are_capped():
    store = ProgressStore()
    for i in range(MAX_DISKS_PER_JOB):
        store.apply(ProgressUpdate(job_id="j", disk_id=f"disk-{i}", bytes_transferred=1))
    with pytest.raises(errors.ResourceExhausted, match=f"already has {MAX_DISKS_PER_JOB} disks"):
        store.apply(ProgressUpdate(job_id="j", disk_id="disk-one-more"))
    store.apply(ProgressUpdate(job_id="j", disk_id="disk-0", bytes_transferred=2))  # known disks still update
    for i in range(MAX_ERRORS_PER_JOB + 50):
        store.apply(ProgressUpdate(job_id="j", error_message=f"error {i}"))
    record = store.get("j")
    assert len(record.disks) == MAX_DISKS_PER_JOB and len(record.errors) == MAX_ERRORS_PER_JOB
    assert record.errors[0] == "error 50" and record.last_error == f"error {MAX_ERRORS_PER_JOB + 49}"


def test_a_full_progress_store_answers_resource_exhausted(channel):
    stub = progress_pb2_grpc.ProgressServiceStub(channel)
    for job in ("job-1", "job-2", "job-3"):
        stub.UpdateProgress(pb.UpdateProgressRequest(job_id=job, status=pb.JOB_STATUS_RUNNING), metadata=META,
                            timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        stub.UpdateProgress(pb.UpdateProgressRequest(job_id="job-4"), metadata=META, timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details() == ("this agent already tracks 3 running jobs (progress_max_jobs); wait for one "
                                   "to end")
    stub.UpdateProgress(pb.UpdateProgressRequest(job_id="job-2", status=pb.JOB_STATUS_SUCCEEDED), metadata=META,
                        timeout=5)
    assert stub.UpdateProgress(pb.UpdateProgressRequest(job_id="job-4"), metadata=META, timeout=5).auto_initialized
    with pytest.raises(grpc.RpcError) as err:
        stub.GetProgress(pb.GetProgressRequest(job_id="job-2"), metadata=META, timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# --- a job the agent runs -----------------------------------------------------------------------------------

def test_update_progress_cannot_overwrite_a_job_this_agent_runs(vcsim_factory, tmp_path):
    sim = vcsim_factory(vms=1, data_vms=1, disks=1, disk_size="16MiB")
    target = tmp_path / "slow-target.img"
    with open(target, "wb") as f:
        f.truncate(16 << 20)
    slow = NbdkitServer(file_plugin_args(target, filters=["delay"], filter_params={"wdelay": "2"}))
    slow.start()
    datastores = ",".join(f"{name}={folder}" for name, folder in sim.datastores.items())
    try:
        with start_vma(source_mode="file", datastore_map=datastores, work_dir=tmp_path / "vma") as agent, \
                grpc.insecure_channel(f"127.0.0.1:{agent.port}") as ch:
            replication = replication_pb2_grpc.ReplicationServiceStub(ch)
            progress = progress_pb2_grpc.ProgressServiceStub(ch)
            vm = sim.vm("vm-0000")
            replication.StartReplication(rpb.StartReplicationRequest(
                job_id="job-run-here", connection=vcenter_pb2.VCenterConnection(
                    host=sim.address, username=sim.username, password=sim.password,
                    thumbprint=sim.thumbprint_sha1),
                vm=vcenter_pb2.VMReference(path=vm["path"]), enable_cbt=True,
                disks=[rpb.ReplicationDisk(disk_id="disk-2000", vmware_disk_key=2000, target_nbd_uri=slow.uri)]),
                metadata=META, timeout=30)
            with pytest.raises(grpc.RpcError) as err:
                progress.UpdateProgress(pb.UpdateProgressRequest(job_id="job-run-here", status=pb.JOB_STATUS_SUCCEEDED,
                                                                 percent=100), metadata=META, timeout=5)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details() == ("job job-run-here is run by this agent's data mover; only it reports "
                                           "the job's progress")
            got = progress.GetProgress(pb.GetProgressRequest(job_id="job-run-here"), metadata=META, timeout=5)
            assert got.progress.status != pb.JOB_STATUS_SUCCEEDED
            replication.CancelReplication(rpb.CancelReplicationRequest(job_id="job-run-here"), metadata=META,
                                          timeout=30)
            deadline = time.monotonic() + 60
            while replication.GetReplicationStatus(rpb.GetReplicationStatusRequest(job_id="job-run-here"),
                                                   metadata=META, timeout=10).running:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            # Once the job has ended it is no longer the data mover's: a report is accepted (and ignored, as
            # for any ended job).
            progress.UpdateProgress(pb.UpdateProgressRequest(job_id="job-run-here", status=pb.JOB_STATUS_RUNNING),
                                    metadata=META, timeout=5)
    finally:
        slow.stop()
