"""EnrollmentService: Enroll starts pairing this agent with an OMA and answers at once (the flow goes on in the
background, see ``vma_agent.enrollment``); GetEnrollmentStatus reports the saved state."""
from __future__ import annotations

from datetime import datetime

from vma.v1 import enrollment_pb2, enrollment_pb2_grpc

from vma_agent import errors
from vma_agent.enrollment import Enrollment
from vma_agent.services import timestamp


def _time(value: str) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


class EnrollmentServicer(enrollment_pb2_grpc.EnrollmentServiceServicer):
    def __init__(self, enrollment: Enrollment):
        self._enrollment = enrollment

    def Enroll(self, request, context):
        record = self._enrollment.enroll(
            oma_host=request.oma_host, oma_port=request.oma_port, pairing_code=request.pairing_code,
            vma_name=request.vma_name, vma_version=request.vma_version,
            oma_certificate_sha256=request.oma_certificate_sha256)
        return enrollment_pb2.EnrollResponse(enrollment_id=record.enrollment_id, state=record.state,
                                             message=record.message)

    def GetEnrollmentStatus(self, request, context):
        record = self._enrollment.status()
        if record is None:
            raise errors.NotFound("this agent is not enrolled: call Enroll with a pairing code from the OMA")
        return enrollment_pb2.GetEnrollmentStatusResponse(
            enrollment_id=record.enrollment_id, state=record.state, message=record.message,
            oma_host=record.oma_host, oma_port=record.oma_port, vma_name=record.vma_name,
            vma_fingerprint=record.vma_fingerprint, ssh_user=record.ssh_user,
            enrolled_at=timestamp(_time(record.enrolled_at)), updated_at=timestamp(_time(record.updated_at)),
            tunnel_configured=record.tunnel_configured)
