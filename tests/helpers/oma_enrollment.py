"""A VMA as the OMA's enrollment API sees it (an Ed25519 key pair), and the calls that move it through
enrollment: pairing code, enroll, signed challenge, approval, audit log."""
from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from oma.v1 import enrollment_admin_pb2 as apb
from oma.v1 import enrollment_pb2 as pb

from oma_server.db import models
from oma_server.domain import enrollment as enrollment_domain


class Vma:
    """A VMA as the OMA sees it: an Ed25519 key pair and an enrollment."""

    def __init__(self, name: str):
        self.name = name
        self.private = ed25519.Ed25519PrivateKey.generate()
        public = self.private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                        serialization.PublicFormat.OpenSSH).decode()
        self.public_key = f"{public} vma-{name}"
        self.blob_b64 = public.split()[1]
        self.enrollment_id = ""
        self.challenge = ""

    def sign(self, challenge: str | None = None) -> str:
        return base64.b64encode(self.private.sign(base64.b64decode(challenge or self.challenge))).decode()


def code_row(server, code: str) -> models.VmaPairingCode:
    """The row of a pairing code, found as the OMA finds it: by its keyed hash."""
    return models.VmaPairingCode.get(models.VmaPairingCode.pairing_code == enrollment_domain.code_hash(
        server.runtime.secrets, enrollment_domain.normalise_code(code)))


def new_code(admin, **kw) -> str:
    return admin.enrollment_admin.GeneratePairingCode(apb.GeneratePairingCodeRequest(**kw), timeout=10).pairing_code


def enroll(public, vma: Vma, code: str) -> pb.EnrollResponse:
    response = public.enrollment.Enroll(pb.EnrollRequest(
        pairing_code=code, vma_public_key=vma.public_key, vma_name=vma.name, vma_version="1.0",
        vma_fingerprint="SHA256:placeholder-fingerprint"), timeout=10)
    vma.enrollment_id, vma.challenge = response.enrollment_id, response.challenge
    return response


def verify(public, vma: Vma, signature: str | None = None) -> pb.VerifyChallengeResponse:
    return public.enrollment.VerifyChallenge(pb.VerifyChallengeRequest(
        enrollment_id=vma.enrollment_id, signature=vma.sign() if signature is None else signature), timeout=10)


def approve(admin, vma: Vma, notes: str = "") -> apb.ApproveEnrollmentResponse:
    return admin.enrollment_admin.ApproveEnrollment(apb.ApproveEnrollmentRequest(
        enrollment_id=vma.enrollment_id, notes=notes), timeout=10)


def awaiting(admin, public, name: str) -> Vma:
    vma = Vma(name)
    enroll(public, vma, new_code(admin))
    assert verify(public, vma).status == "awaiting_approval"
    return vma


def audit_events(admin, **kw) -> list[apb.VMAAuditEvent]:
    return list(admin.enrollment_admin.GetAuditLog(apb.GetAuditLogRequest(page_size=200, **kw), timeout=10).events)
