"""A typed convenience layer over the generated OMA stubs.

``OmaClient`` owns one channel with the bearer token attached to every call, gRPC's own retry policy
for UNAVAILABLE (a service config, not a hand-written loop), TLS when asked, and one attribute per
service (``client.contexts``, ``client.replications`` …) returning the generated stub. Helpers turn
paged lists and progress streams into iterators.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from oma.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    cloudstack_settings_pb2_grpc,
    debug_pb2_grpc,
    discovery_pb2_grpc,
    enrollment_admin_pb2_grpc,
    enrollment_pb2_grpc,
    failover_pb2,
    failover_pb2_grpc,
    job_log_pb2_grpc,
    machine_groups_pb2_grpc,
    network_mappings_pb2_grpc,
    ossea_config_pb2_grpc,
    progress_pb2,
    progress_pb2_grpc,
    replications_pb2_grpc,
    schedules_pb2_grpc,
    users_pb2_grpc,
    validation_pb2_grpc,
    vm_contexts_pb2_grpc,
    vmware_credentials_pb2_grpc,
)

DEFAULT_TARGET = "127.0.0.1:9090"


def config_path() -> Path:
    """Where omactl keeps its login: ``$OMACTL_CONFIG``, else ~/.config/omactl/config.json (read at each
    call, so a changed environment is honoured)."""
    return Path(os.environ.get("OMACTL_CONFIG") or Path.home() / ".config" / "omactl" / "config.json")


_RETRY_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{}],
        "retryPolicy": {
            "maxAttempts": 4,
            "initialBackoff": "0.2s",
            "maxBackoff": "3s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]
})


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token_source: Callable[[], str | None]):
        self._token_source = token_source

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        token = self._token_source()
        if not token:
            return details
        metadata = [m for m in (details.metadata or []) if m[0] != "authorization"]
        metadata.append(("authorization", f"Bearer {token}"))
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _CallDetails(
            details.method, details.timeout, metadata, details.credentials,
            getattr(details, "wait_for_ready", None), getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def _pem(ca: bytes | str | os.PathLike[str]) -> bytes:
    """Root certificates as PEM bytes: given as bytes, as PEM text, or as the path of a PEM file."""
    if isinstance(ca, bytes):
        return ca
    if isinstance(ca, str) and ca.lstrip().startswith("-----BEGIN"):
        return ca.encode()
    path = Path(ca).expanduser()
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS CA file {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ValueError(f"the TLS CA file {path} holds no PEM certificate")
    return pem


def retry_delay(error: grpc.RpcError) -> float | None:
    """Seconds the server asks to wait before trying again (its ``google.rpc.RetryInfo`` detail, sent e.g. with
    RESOURCE_EXHAUSTED by a throttled login), or None when it sent none."""
    status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    for detail in status.details if status else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


def saved_settings() -> dict[str, Any]:
    """Target and token saved by ``omactl login`` (empty when none)."""
    try:
        return json.loads(config_path().read_text())
    except (OSError, ValueError):
        return {}


class OmaClient:
    """One connection to an OMA server.

    target/token default to ``OMA_TARGET``/``OMA_TOKEN`` from the environment, then the omactl
    config file. ``tls_ca`` switches to TLS trusting that root: PEM bytes or text, or the path of a PEM
    file — for an OMA with a self-signed certificate, the certificate itself (``<data_dir>/oma-tls.crt``).
    The server's certificate must name the host of ``target``; ``tls_server_name`` checks another name
    instead (e.g. when connecting through a tunnel or by an address the certificate does not list).
    """

    def __init__(
        self,
        target: str | None = None,
        token: str | None = None,
        *,
        tls_ca: bytes | str | os.PathLike[str] | None = None,
        tls_server_name: str | None = None,
        timeout: float = 30.0,
    ):
        saved = saved_settings()
        self.target = target or os.environ.get("OMA_TARGET") or saved.get("target") or DEFAULT_TARGET
        # token=None → from the environment or the omactl config; token="" → call without a token.
        self.token = token if token is not None else (os.environ.get("OMA_TOKEN") or saved.get("token"))
        self.timeout = timeout
        options = [("grpc.service_config", _RETRY_SERVICE_CONFIG), ("grpc.enable_retries", 1)]
        if tls_ca:
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            raw = grpc.secure_channel(self.target, grpc.ssl_channel_credentials(_pem(tls_ca)), options=options)
        else:
            raw = grpc.insecure_channel(self.target, options=options)
        self._raw_channel = raw
        self.channel = grpc.intercept_channel(raw, _BearerToken(lambda: self.token))
        stubs = {
            "auth": auth_pb2_grpc.AuthServiceStub,
            "contexts": vm_contexts_pb2_grpc.VMContextServiceStub,
            "replications": replications_pb2_grpc.ReplicationServiceStub,
            "progress": progress_pb2_grpc.ProgressServiceStub,
            "discovery": discovery_pb2_grpc.DiscoveryServiceStub,
            "credentials": vmware_credentials_pb2_grpc.VMwareCredentialServiceStub,
            "cloudstack": cloudstack_settings_pb2_grpc.CloudStackSettingsServiceStub,
            "ossea": ossea_config_pb2_grpc.OSSEAConfigServiceStub,
            "network_mappings": network_mappings_pb2_grpc.NetworkMappingServiceStub,
            "failover": failover_pb2_grpc.FailoverServiceStub,
            "schedules": schedules_pb2_grpc.ScheduleServiceStub,
            "groups": machine_groups_pb2_grpc.MachineGroupServiceStub,
            "validation": validation_pb2_grpc.ValidationServiceStub,
            "debug": debug_pb2_grpc.DebugServiceStub,
            "enrollment_admin": enrollment_admin_pb2_grpc.EnrollmentAdminServiceStub,
            "enrollment": enrollment_pb2_grpc.EnrollmentServiceStub,
            "jobs": job_log_pb2_grpc.JobLogServiceStub,
            "users": users_pb2_grpc.UserServiceStub,
        }
        for name, stub in stubs.items():
            setattr(self, name, stub(self.channel))

    # --- session ----------------------------------------------------------------------------
    def login(self, username: str, password: str) -> auth_pb2.LoginResponse:
        response = self.auth.Login(
            auth_pb2.LoginRequest(username=username, password=password), timeout=self.timeout
        )
        self.token = response.token
        return response

    def logout(self) -> auth_pb2.LogoutResponse:
        """End this client's token on the server (it is refused from now on) and forget it."""
        response = self.auth.Logout(auth_pb2.LogoutRequest(), timeout=self.timeout)
        self.token = None
        return response

    def wait_ready(self, timeout: float = 10.0) -> None:
        grpc.channel_ready_future(self._raw_channel).result(timeout=timeout)

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self) -> "OmaClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- iterators --------------------------------------------------------------------------
    def pages(self, method: Callable, request: Any, field: str, page_size: int = 200) -> Iterator[Any]:
        """Every item of a paged List RPC: ``client.pages(client.contexts.ListVMContexts,
        ListVMContextsRequest(), "vm_contexts")``."""
        request.page_size = page_size
        while True:
            response = method(request, timeout=self.timeout)
            yield from getattr(response, field)
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def watch_replication(self, job_id: str, timeout: float | None = None) -> Iterator[Any]:
        """Progress of one replication job until it ends (one ReplicationProgress per change)."""
        stream = self.progress.WatchReplicationProgress(
            progress_pb2.WatchReplicationProgressRequest(job_id=job_id), timeout=timeout
        )
        try:
            for item in stream:
                yield item.progress
        finally:
            stream.cancel()

    def watch_failover(self, job_id: str, timeout: float | None = None) -> Iterator[Any]:
        """A failover, cleanup or rollback job until it ends: one WatchFailoverJobResponse (the JobLog job
        with all its steps, and the failover record) per change; the last one has ``terminal`` set."""
        stream = self.failover.WatchFailoverJob(failover_pb2.WatchFailoverJobRequest(job_id=job_id), timeout=timeout)
        try:
            yield from stream
        finally:
            stream.cancel()
