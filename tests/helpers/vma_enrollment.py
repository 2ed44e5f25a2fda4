"""A real VMA agent enrolling with the OMA: start (and restart) it on a fixed port, and drive its
enrollment API (enroll, status, wait for a state)."""
from __future__ import annotations

import contextlib
import time

import grpc
from oma.v1 import enrollment_admin_pb2 as apb
from vma.v1 import enrollment_pb2 as pb
from vma.v1 import enrollment_pb2_grpc

from omalab.processes import free_port
from omalab.servers import VMA_TOKEN, start_vma

META = (("authorization", f"Bearer {VMA_TOKEN}"),)


def agent_runner(tmp_path, **settings):
    """``with run() as stub``: start (and restart) an agent on one fixed port (its tunnel forwards to it)
    with one enrollment directory; ``run.port``, ``run.dir``."""
    port = free_port()

    @contextlib.contextmanager
    def run():
        with start_vma(listen=f"127.0.0.1:{port}", work_dir=tmp_path / "vma-work",
                       enrollment_dir=tmp_path / "enrollment", enrollment_poll_interval_seconds=0.05,
                       **settings) as running:
            channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
            try:
                yield enrollment_pb2_grpc.EnrollmentServiceStub(channel)
            finally:
                channel.close()

    run.port = port
    run.dir = tmp_path / "enrollment"
    return run


def new_code(admin) -> str:
    return admin.enrollment_admin.GeneratePairingCode(apb.GeneratePairingCodeRequest(), timeout=10).pairing_code


def status(stub) -> pb.GetEnrollmentStatusResponse:
    return stub.GetEnrollmentStatus(pb.GetEnrollmentStatusRequest(), metadata=META, timeout=10)


def wait_for(stub, state: str, timeout: float = 20) -> pb.GetEnrollmentStatusResponse:
    deadline = time.monotonic() + timeout
    while (current := status(stub)).state != state:
        assert time.monotonic() < deadline, f"still {current.state}: {current.message}"
        time.sleep(0.05)
    return current


def enroll(stub, oma_port: int, code: str, **kw) -> pb.EnrollResponse:
    return stub.Enroll(pb.EnrollRequest(oma_host="127.0.0.1", oma_port=oma_port, pairing_code=code,
                                        vma_name=kw.pop("vma_name", "site-a"), vma_version="1.2.3", **kw),
                       metadata=META, timeout=30)
