"""The OMA's client of the VMA agent: the only module that talks to the VMA's gRPC services.

Every call carries the VMA bearer token and a deadline. Calls are retried with backoff only when the
agent itself could not be reached: gRPC's built-in retry policy cannot be used because the agent
also answers UNAVAILABLE, on purpose, when *vCenter* is down, and repeating that only delays the
answer. The VMA's status codes come back as the OMA's domain errors with the VMA's message, so the
RPC that caused them answers with the same code.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from vma.v1 import (
    cbt_pb2,
    cbt_pb2_grpc,
    discovery_pb2,
    discovery_pb2_grpc,
    power_pb2,
    power_pb2_grpc,
    progress_pb2,
    progress_pb2_grpc,
    replication_pb2,
    replication_pb2_grpc,
    vcenter_pb2,
)

from oma_server import errors
from oma_server.integrations.vcenter_login import VCenterLogin

log = logging.getLogger("oma_server.vma")

_CODE_TO_ERROR = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
}


def connection(login: VCenterLogin) -> vcenter_pb2.VCenterConnection:
    return vcenter_pb2.VCenterConnection(
        host=login.host, username=login.username, password=login.password, datacenter=login.datacenter,
        thumbprint=login.thumbprint, insecure=login.insecure,
    )


def target_tls(tls: Any) -> replication_pb2.NbdTargetTls | None:
    """The TLS-PSK of a job's NBD targets for the agent (an ``nbd_exports.ExportTls``; None: plain NBD)."""
    return None if tls is None else replication_pb2.NbdTargetTls(psk_identity=tls.identity, psk=tls.psk)


class VmaClient:
    def __init__(self, address: str, token: str = "", *, timeout: float = 60.0, retries: int = 3):
        self.address = address
        self._timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._retries = retries
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.keepalive_time_ms", 30_000),
            # Discovery of thousands of VMs answers in tens of megabytes.
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
        ])
        self._discovery = discovery_pb2_grpc.DiscoveryServiceStub(self._channel)
        self._progress = progress_pb2_grpc.ProgressServiceStub(self._channel)
        self._replication = replication_pb2_grpc.ReplicationServiceStub(self._channel)
        self._power = power_pb2_grpc.PowerServiceStub(self._channel)
        self._cbt = cbt_pb2_grpc.CBTServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    stop = close

    def _call(self, method, request, timeout: float | None = None, retry: bool = True):
        delay = 0.25
        for attempt in range(self._retries + 1 if retry else 1):
            try:
                return method(request, timeout=timeout or self._timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                unreachable = exc.code() == grpc.StatusCode.UNAVAILABLE and "vcenter" not in (exc.details() or "").lower()
                if not unreachable or attempt == self._retries or not retry:
                    raise self._translate(exc) from None
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _translate(self, exc: grpc.RpcError) -> errors.DomainError:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            # Either the agent is down, or the agent reports vCenter unavailable (then it says so).
            if "vcenter" in details.lower():
                return errors.Unavailable(details)
            return errors.Unavailable(f"the VMA agent at {self.address} is unreachable ({details})")
        if code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in details:
            return errors.FailedPrecondition(f"the VMA agent at {self.address} refused the OMA's token")
        error_class = _CODE_TO_ERROR.get(code)
        if error_class is None:
            log.warning("VMA call failed with %s: %s", code.name, details)
            return errors.Unavailable(f"the VMA agent failed ({code.name}): {details}")
        return error_class(details)

    # --- discovery ------------------------------------------------------------------------------
    def discover(self, login: VCenterLogin, *, filter: str = "", names: tuple[str, ...] = ()) -> discovery_pb2.DiscoverResponse:
        return self._call(self._discovery.Discover, discovery_pb2.DiscoverRequest(
            connection=connection(login), filter=filter, names=list(names)))

    def check_connection(self, login: VCenterLogin) -> discovery_pb2.CheckConnectionResponse:
        return self._call(self._discovery.CheckConnection,
                          discovery_pb2.CheckConnectionRequest(connection=connection(login)))

    # --- replication ----------------------------------------------------------------------------
    def start_replication(self, request: replication_pb2.StartReplicationRequest) -> replication_pb2.StartReplicationResponse:
        # Not repeated blindly: the agent treats a second start of the same job as the same job anyway.
        return self._call(self._replication.StartReplication, request)

    def cancel_replication(self, job_id: str, reason: str) -> replication_pb2.CancelReplicationResponse:
        return self._call(self._replication.CancelReplication,
                          replication_pb2.CancelReplicationRequest(job_id=job_id, reason=reason), timeout=30)

    def list_interrupted_jobs(self) -> list[replication_pb2.InterruptedJob]:
        """The jobs the agent was running when it stopped or died (its journal), with their checkpoints."""
        return list(self._call(self._replication.ListInterruptedJobs,
                               replication_pb2.ListInterruptedJobsRequest(), timeout=30).jobs)

    def cleanup_snapshots(self, login: VCenterLogin, vm: vcenter_pb2.VMReference, job_id: str) -> None:
        """Remove the kept snapshot of a job that will not be resumed."""
        self._call(self._replication.CleanupSnapshots, replication_pb2.CleanupSnapshotsRequest(
            connection=connection(login), vm=vm, job_id=job_id), timeout=120)

    # --- progress -------------------------------------------------------------------------------
    def get_progress(self, job_id: str) -> progress_pb2.JobProgress:
        return self._call(self._progress.GetProgress, progress_pb2.GetProgressRequest(job_id=job_id),
                          timeout=10).progress

    def watch_progress(self, job_id: str) -> "ProgressWatch":
        return ProgressWatch(self, self._progress.WatchProgress(
            progress_pb2.WatchProgressRequest(job_id=job_id), metadata=self._metadata))

    # --- power and CBT --------------------------------------------------------------------------
    def power_off(self, login: VCenterLogin, vm_uuid: str, *, force: bool = False, timeout_seconds: int = 300,
                  force_after_timeout: bool = True) -> power_pb2.PowerOperationResult:
        return self._call(self._power.PowerOff, power_pb2.PowerOffRequest(
            connection=connection(login), vm=vcenter_pb2.VMReference(uuid=vm_uuid), force=force,
            timeout_seconds=timeout_seconds, force_after_timeout=force_after_timeout,
        ), timeout=timeout_seconds + 60).result

    def power_on(self, login: VCenterLogin, vm_uuid: str, *, timeout_seconds: int = 600) -> power_pb2.PowerOperationResult:
        return self._call(self._power.PowerOn, power_pb2.PowerOnRequest(
            connection=connection(login), vm=vcenter_pb2.VMReference(uuid=vm_uuid), timeout_seconds=timeout_seconds,
        ), timeout=timeout_seconds + 60).result

    def power_state(self, login: VCenterLogin, vm_uuid: str) -> power_pb2.GetPowerStateResponse:
        return self._call(self._power.GetPowerState, power_pb2.GetPowerStateRequest(
            connection=connection(login), vm=vcenter_pb2.VMReference(uuid=vm_uuid)), timeout=30)

    def cbt_status(self, login: VCenterLogin, vm_uuid: str) -> cbt_pb2.GetCBTStatusResponse:
        return self._call(self._cbt.GetCBTStatus, cbt_pb2.GetCBTStatusRequest(
            connection=connection(login), vm=vcenter_pb2.VMReference(uuid=vm_uuid)))


class ProgressWatch:
    """Iterates a VMA progress stream, translating its failure into a domain error; cancellable."""

    def __init__(self, client: VmaClient, call):
        self._client, self._call = client, call

    def __iter__(self) -> Iterator[progress_pb2.JobProgress]:
        try:
            for response in self._call:
                yield response.progress
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise self._client._translate(exc) from None

    def cancel(self) -> None:
        self._call.cancel()


def tunnel_probe(host: str, timeout: float):
    """``probe(port)``: True when a VMA agent answers SERVING on the standard health service at
    ``host:port`` (the OMA end of its reverse tunnel) within ``timeout``. One short-lived channel per
    probe: tunnel ports come and go with the VMAs, and a channel kept for a dead port only reconnects."""

    def probe(port: int) -> bool:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            except grpc.RpcError as exc:
                log.debug("no answer through the tunnel at %s:%d: %s", host, port, exc.code().name)
                return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    return probe
