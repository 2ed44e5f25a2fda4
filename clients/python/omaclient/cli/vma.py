"""omactl vma: VMA enrollment (pairing codes, approval, revocation, audit)."""
from __future__ import annotations

import argparse
from typing import Any

import grpc
from oma.v1 import enrollment_admin_pb2 as enrollment_pb

from omaclient import output
from omaclient.cli.common import CliError, Session, add_command, add_family, add_limit, limited, set_present


def _enrollment_id(s: Session, ref: str, *, pending: bool) -> str:
    """An enrollment id, or the name of a VMA among the pending enrollments (or the connections)."""
    if pending:
        items = s.client.pages(s.client.enrollment_admin.ListPendingEnrollments,
                               enrollment_pb.ListPendingEnrollmentsRequest(), "enrollments")
        named = {(e.id, e.vma_name) for e in items}
    else:
        request = enrollment_pb.ListActiveVMAsRequest(include_disconnected=True)
        named = {(c.enrollment_id, c.vma_name) for c in
                 s.client.pages(s.client.enrollment_admin.ListActiveVMAs, request, "connections")}
    if any(ref == enrollment_id for enrollment_id, _ in named):
        return ref
    matches = sorted({enrollment_id for enrollment_id, name in named if name == ref})
    if len(matches) > 1:
        raise CliError(grpc.StatusCode.FAILED_PRECONDITION,
                       f"several enrollments of a VMA named {ref!r} ({', '.join(matches)}); give the ID")
    return matches[0] if matches else ref  # unknown: the server says NOT_FOUND


def _vma_pairing_code(s: Session, args: argparse.Namespace) -> None:
    request = set_present(enrollment_pb.GeneratePairingCodeRequest(), valid_for=args.valid_for)
    response = s.call(s.client.enrollment_admin.GeneratePairingCode, request)
    s.show(response, lambda r: f"pairing code: {r.pairing_code}\nvalid for {output.duration(r.valid_for)}, until "
                               f"{output.when(r.expires_at)}; enter it on the VMA once, then approve the VMA with: "
                               f"omactl vma pending && omactl vma approve ID"
                               + (f"\nOMA TLS certificate sha256: {r.oma_certificate_sha256} (give it to the VMA "
                                  f"with the code, so it pins this OMA)" if r.oma_certificate_sha256
                                  else "\nthe OMA serves no TLS listener: the VMA can only enroll over plaintext"))


def _vma_pending(s: Session, args: argparse.Namespace) -> None:
    enrollments = list(s.client.pages(s.client.enrollment_admin.ListPendingEnrollments,
                                      enrollment_pb.ListPendingEnrollmentsRequest(), "enrollments"))
    s.show(enrollment_pb.ListPendingEnrollmentsResponse(enrollments=enrollments, count=len(enrollments)),
           lambda r: output.table(r.enrollments, output.ENROLLMENT_COLUMNS, empty="no VMA awaits approval"))


def _vma_approve(s: Session, args: argparse.Namespace) -> None:
    request = enrollment_pb.ApproveEnrollmentRequest(enrollment_id=_enrollment_id(s, args.id, pending=True),
                                                     notes=args.notes or "")
    response = s.call(s.client.enrollment_admin.ApproveEnrollment, request)

    def render(r: Any) -> str:
        e, c = r.enrollment, r.connection
        return (f"approved VMA {e.vma_name} ({e.vma_fingerprint}): enrollment {e.id}, tunnel user {c.ssh_user}, "
                f"reverse port {c.reverse_tunnel_port}")

    s.show(response, render)


def _vma_reject(s: Session, args: argparse.Namespace) -> None:
    request = enrollment_pb.RejectEnrollmentRequest(enrollment_id=_enrollment_id(s, args.id, pending=True),
                                                    reason=args.reason)
    response = s.call(s.client.enrollment_admin.RejectEnrollment, request)
    s.show(response, lambda r: f"rejected VMA {r.enrollment.vma_name} (enrollment {r.enrollment.id})")


def _vma_revoke(s: Session, args: argparse.Namespace) -> None:
    request = enrollment_pb.RevokeVMARequest(enrollment_id=_enrollment_id(s, args.id, pending=False),
                                             reason=args.reason or "")
    response = s.call(s.client.enrollment_admin.RevokeVMA, request)
    s.show(response, lambda r: f"revoked VMA {r.connection.vma_name} (enrollment {r.connection.enrollment_id}): "
                               f"{r.message}")


def _vma_list(s: Session, args: argparse.Namespace) -> None:
    request = enrollment_pb.ListActiveVMAsRequest(include_disconnected=args.all or args.disconnected,
                                                  include_revoked=args.all)
    connections = list(s.client.pages(s.client.enrollment_admin.ListActiveVMAs, request, "connections"))
    s.show(enrollment_pb.ListActiveVMAsResponse(connections=connections, count=len(connections)),
           lambda r: output.table(r.connections, output.VMA_CONNECTION_COLUMNS, empty="no VMA connections"))


def _vma_audit(s: Session, args: argparse.Namespace) -> None:
    request = enrollment_pb.GetAuditLogRequest(event_type=args.type or "", enrollment_id=args.enrollment or "")
    events = limited(s, s.client.enrollment_admin.GetAuditLog, request, "events", args.limit)
    s.show(enrollment_pb.GetAuditLogResponse(events=events, count=len(events)),
           lambda r: output.table(r.events, output.VMA_AUDIT_COLUMNS, empty="no audit events"))


def register_vma(commands: Any) -> None:
    actions = add_family(commands, "vma", "VMA enrollment: pairing codes, approval, tunnel access, audit trail")
    p = add_command(actions, "pairing-code", _vma_pairing_code, "create a one-time pairing code for a new VMA")
    p.add_argument("--valid-for", type=int, metavar="SECONDS", help="60-86400 (default 600)")
    add_command(actions, "pending", _vma_pending, "list enrolled VMAs awaiting approval")
    p = add_command(actions, "approve", _vma_approve, "approve a VMA: install its tunnel key")
    p.add_argument("id", metavar="ID", help="enrollment id (or the VMA name, when one pending VMA has it)")
    p.add_argument("--notes", help="recorded in the audit trail")
    p = add_command(actions, "reject", _vma_reject, "reject a pending VMA")
    p.add_argument("id", metavar="ID", help="enrollment id (or the VMA name, when one pending VMA has it)")
    p.add_argument("--reason", required=True, help="recorded in the audit trail")
    p = add_command(actions, "revoke", _vma_revoke, "revoke a VMA: remove its tunnel key and end its sessions")
    p.add_argument("id", metavar="ID", help="enrollment id (or the VMA name)")
    p.add_argument("--reason", help="recorded in the audit trail")
    p = add_command(actions, "list", _vma_list, "list VMA connections (connected ones unless asked)")
    p.add_argument("--disconnected", action="store_true", help="also disconnected ones")
    p.add_argument("--all", action="store_true", help="also disconnected and revoked ones")
    p = add_command(actions, "audit", _vma_audit, "the enrollment audit trail, newest first")
    p.add_argument("--type", choices=["enrollment", "verification", "approval", "rejection", "connection",
                                      "disconnection", "revocation"])
    p.add_argument("--enrollment", metavar="ID", help="events of one enrollment")
    add_limit(p)
