"""VMA enrollment on the OMA (mapping: admin endpoints → vma_pairing_codes, vma_enrollments,
vma_active_connections, vma_connection_audit; public endpoints → enrollment transitions and pairing code
consumption), on both databases: the whole state machine with real Ed25519 keys and signatures, the tunnel
account's authorized_keys file, the audit trail and the expiry sweep."""
from __future__ import annotations

import base64
import json
import re
import stat
import subprocess
import threading
import time
import uuid
from datetime import timedelta

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf import json_format
from oma.v1 import enrollment_admin_pb2 as apb
from oma.v1 import enrollment_pb2 as pb

from oma_server.db import models
from oma_server.domain import enrollment as domain
from omaclient.client import OmaClient
from tests import factories
from tests.fixtures.servers import ADMIN_PASSWORD
from tests.helpers.oma_enrollment import Vma, approve, audit_events, awaiting, code_row, enroll, new_code, verify

CODE_FORMAT = re.compile(r"^[ABCDEFGHJKMNPQRSTVWXYZ23456789]{4}(-[ABCDEFGHJKMNPQRSTVWXYZ23456789]{4}){2}$")
NBD_PORTS = range(10809, 10812)


def _error(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


@pytest.fixture
def keys_file(tmp_path):
    return tmp_path / "vma_tunnel" / ".ssh" / "authorized_keys"


@pytest.fixture
def server(oma_factory, keys_file):
    return oma_factory(tunnel_authorized_keys=str(keys_file), nbd_port_min=NBD_PORTS.start,
                       nbd_port_max=NBD_PORTS.stop - 1, enrollment_sweep_interval_seconds=3600)


@pytest.fixture
def admin(server):
    with OmaClient(f"127.0.0.1:{server.port}", token="") as client:
        client.login("admin", ADMIN_PASSWORD)
        yield client


@pytest.fixture
def public(server):
    with OmaClient(f"127.0.0.1:{server.port}", token="") as client:
        yield client


def result(public, vma: Vma) -> pb.GetEnrollmentResultResponse:
    return public.enrollment.GetEnrollmentResult(pb.GetEnrollmentResultRequest(enrollment_id=vma.enrollment_id),
                                                 timeout=10)


def fingerprint_of(path) -> list[str]:
    """Fingerprints of the keys in an authorized_keys/public key file, as OpenSSH reads them."""
    out = subprocess.run(["ssh-keygen", "-lf", str(path)], check=True, capture_output=True, text=True).stdout
    return [line.split()[1] for line in out.splitlines()]


def test_pairing_codes_are_random_formatted_capped_and_audited(admin, server):
    response = admin.enrollment_admin.GeneratePairingCode(apb.GeneratePairingCodeRequest(), timeout=10)
    assert CODE_FORMAT.match(response.pairing_code) and response.valid_for == 600
    assert response.oma_certificate_sha256 == ""  # this OMA serves no TLS port: nothing to pin
    row = models.VmaPairingCode.get_by_id(response.pairing_code_id)
    assert (row.generated_by, row.used_at) == ("admin", None)
    # Only a keyed hash is stored: the code is nowhere in the row, and the hash needs the OMA's key.
    assert row.pairing_code == domain.code_hash(server.runtime.secrets, response.pairing_code)
    assert len(row.pairing_code) == 20 and response.pairing_code.replace("-", "") not in row.pairing_code
    assert abs((row.expires_at - row.created_at).total_seconds() - 600) < 1
    assert response.expires_at.ToDatetime() == row.expires_at

    caps = {5: 60, 3600: 3600, 10**6: 86400}
    for asked, granted in caps.items():
        assert admin.enrollment_admin.GeneratePairingCode(
            apb.GeneratePairingCodeRequest(valid_for=asked, generated_by="ops"), timeout=10).valid_for == granted
    before = factories.db_snapshot()
    assert _error(lambda: new_code(admin, valid_for=0))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert factories.db_snapshot() == before
    codes = {r.pairing_code for r in models.VmaPairingCode.select()}
    assert len(codes) == 4

    events = audit_events(admin)
    assert len(events) == 4 and {e.event_type for e in events} == {"enrollment"}
    first = events[-1]
    details = json_format.MessageToDict(first.event_details)
    assert details["action"] == "pairing_code_generated" and details["valid_for"] == 600
    assert (first.approved_by, first.source_ip, first.enrollment_id) == ("admin", "127.0.0.1", "")
    assert not any(code in str(e) for code in codes for e in events)  # codes are never in the audit trail


def test_enroll_verify_approve_result_revoke(admin, public, server, keys_file):
    vma = Vma("vma-site-a")
    code = new_code(admin)
    enrolled = enroll(public, vma, code)
    assert enrolled.status == "pending_verification"
    assert len(base64.b64decode(enrolled.challenge, validate=True)) == 32 and len(enrolled.challenge) == 44
    (tmp_pub := keys_file.parent.parent / "vma.pub").parent.mkdir(parents=True, exist_ok=True)
    tmp_pub.write_text(vma.public_key + "\n")
    assert enrolled.vma_fingerprint == fingerprint_of(tmp_pub)[0]  # server-computed, not the placeholder sent
    row = models.VmaEnrollment.get_by_id(enrolled.enrollment_id)
    assert (row.status, row.vma_ip_address, row.vma_fingerprint, row.challenge_nonce) == (
        "pending_verification", "127.0.0.1", enrolled.vma_fingerprint, enrolled.challenge)
    assert abs((row.expires_at - row.created_at) - timedelta(minutes=10)) < timedelta(seconds=1)
    used = code_row(server, code)
    assert row.pairing_code == used.pairing_code != code
    assert used.used_at is not None and used.used_by_enrollment_id == vma.enrollment_id
    assert result(public, vma).status == "pending_verification" and not result(public, vma).ssh_user

    verified = verify(public, vma)
    assert verified.status == "awaiting_approval"
    row = models.VmaEnrollment.get_by_id(vma.enrollment_id)
    assert row.challenge_nonce is None and row.expires_at - models.utcnow() > timedelta(hours=23)
    pending = admin.enrollment_admin.ListPendingEnrollments(apb.ListPendingEnrollmentsRequest(), timeout=10)
    assert [e.id for e in pending.enrollments] == [vma.enrollment_id] and pending.count == 1
    assert pending.enrollments[0].vma_public_key == vma.public_key
    assert code.encode() not in pending.SerializeToString()

    approved = approve(admin, vma, notes="site A rack 3")
    assert approved.enrollment.status == "approved" and approved.enrollment.approved_by == "admin"
    connection = approved.connection
    assert uuid.UUID(connection.id) and len(connection.id) == 36
    assert (connection.connection_status, connection.ssh_user, connection.reverse_tunnel_port) == (
        "connected", "vma_tunnel", 9081)
    lines = keys_file.read_text().splitlines()
    # No job runs for it yet: it may open no export (test_nbd_access: the grants follow its jobs).
    permit_open = 'permitopen="nothing.invalid:1"'
    assert lines == [f'command="/usr/local/sbin/vma-tunnel-wrapper",restrict,port-forwarding,{permit_open},'
                     f'permitlisten="127.0.0.1:9081" ssh-ed25519 {vma.blob_b64} '
                     f'vma-enrollment {enrolled.vma_fingerprint}']
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert fingerprint_of(keys_file) == [enrolled.vma_fingerprint]  # OpenSSH parses the line

    tunnel = result(public, vma)
    host_key = server.runtime.settings.data_dir / "ssh_host_ed25519_key.pub"
    assert (tunnel.status, tunnel.ssh_user, tunnel.ssh_port, tunnel.reverse_tunnel_port) == (
        "approved", "vma_tunnel", 443, 9081)
    assert tunnel.host_key_hash == fingerprint_of(host_key)[0]
    # The VMA is told every export it may ever be granted (it sets its local forwards up for them); its
    # key's line grants only the ports of its running jobs.
    every_export = ",".join(f'permitopen="127.0.0.1:{p}"' for p in NBD_PORTS)
    assert tunnel.ssh_options == f'restrict,port-forwarding,{every_export},permitlisten="127.0.0.1:9081"'
    active = admin.enrollment_admin.ListActiveVMAs(apb.ListActiveVMAsRequest(), timeout=10)
    assert [(c.id, c.enrollment_id, c.reverse_tunnel_port) for c in active.connections] == [
        (connection.id, vma.enrollment_id, 9081)]

    revoked = admin.enrollment_admin.RevokeVMA(apb.RevokeVMARequest(enrollment_id=vma.enrollment_id,
                                                                    reason="decommissioned"), timeout=10).connection
    assert (revoked.connection_status, revoked.revoked_by) == ("revoked", "admin") and revoked.HasField("revoked_at")
    assert keys_file.read_text() == ""
    assert not admin.enrollment_admin.ListActiveVMAs(apb.ListActiveVMAsRequest(), timeout=10).connections
    assert [c.connection_status for c in admin.enrollment_admin.ListActiveVMAs(
        apb.ListActiveVMAsRequest(include_revoked=True), timeout=10).connections] == ["revoked"]
    after = result(public, vma)
    assert after.status == "approved" and not after.ssh_user and "revoked" in after.message
    assert _error(lambda: admin.enrollment_admin.RevokeVMA(
        apb.RevokeVMARequest(enrollment_id=vma.enrollment_id), timeout=10))[0] == grpc.StatusCode.FAILED_PRECONDITION

    trail = audit_events(admin, enrollment_id=vma.enrollment_id)
    assert [e.event_type for e in reversed(trail)] == ["enrollment", "verification", "approval", "revocation"]
    assert [e.approved_by for e in reversed(trail)] == ["vma:vma-site-a", "vma:vma-site-a", "admin", "admin"]
    assert all(e.source_ip == "127.0.0.1" and e.vma_fingerprint == enrolled.vma_fingerprint for e in trail)
    details = [json_format.MessageToDict(e.event_details) for e in reversed(trail)]
    assert details[1]["success"] is True and details[2]["notes"] == "site A rack 3"
    assert details[3]["reason"] == "decommissioned"
    serialized = b"".join(e.SerializeToString() for e in audit_events(admin))
    assert code.encode() not in serialized and enrolled.challenge.encode() not in serialized


def test_admin_rpcs_need_a_token(public):
    assert _error(lambda: public.enrollment_admin.ListPendingEnrollments(
        apb.ListPendingEnrollmentsRequest(), timeout=10))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert _error(lambda: public.enrollment_admin.GeneratePairingCode(
        apb.GeneratePairingCodeRequest(), timeout=10))[0] == grpc.StatusCode.UNAUTHENTICATED


def test_two_vmas_get_their_own_keys_and_ports_and_revocation_removes_exactly_one(admin, public, keys_file):
    first, second = awaiting(admin, public, "vma-a"), awaiting(admin, public, "vma-b")
    assert approve(admin, first).connection.reverse_tunnel_port == 9081
    assert approve(admin, second).connection.reverse_tunnel_port == 9082
    lines = keys_file.read_text().splitlines()
    assert len(lines) == 2 and first.blob_b64 in lines[0] and 'permitlisten="127.0.0.1:9081"' in lines[0]
    assert second.blob_b64 in lines[1] and 'permitlisten="127.0.0.1:9082"' in lines[1]

    admin.enrollment_admin.RevokeVMA(apb.RevokeVMARequest(enrollment_id=first.enrollment_id), timeout=10)
    assert keys_file.read_text().splitlines() == [lines[1]]
    assert result(public, second).reverse_tunnel_port == 9082
    third = awaiting(admin, public, "vma-c")
    assert approve(admin, third).connection.reverse_tunnel_port == 9081  # the revoked VMA's port is free again
    assert [first.blob_b64 in line for line in keys_file.read_text().splitlines()] == [False, False]


def test_expired_used_and_unknown_codes_are_refused_without_writes(admin, public, server):
    expired = new_code(admin)
    models.VmaPairingCode.update(expires_at=models.utcnow() - timedelta(seconds=1)).where(
        models.VmaPairingCode.id == code_row(server, expired).id).execute()
    used = new_code(admin)
    enroll(public, Vma("first"), used)
    before = factories.db_snapshot()
    for code in (expired, used, "ABCD-EFGH-JKMN", "not a code", used.lower().replace("-", "")):
        assert _error(lambda: enroll(public, Vma("late"), code)) == (
            grpc.StatusCode.UNAUTHENTICATED, "Pairing code not found, expired, or already used")
    assert factories.db_snapshot() == before
    # A code typed in lower case without dashes is the same code.
    fresh = new_code(admin)
    assert enroll(public, Vma("typed"), fresh.lower().replace("-", "")).status == "pending_verification"


def test_one_code_admits_exactly_one_of_many_concurrent_enrollments(admin, public, server):
    code = new_code(admin)
    outcomes: list[object] = []
    barrier = threading.Barrier(8)

    def attempt(n: int) -> None:
        barrier.wait()
        try:
            outcomes.append(enroll(public, Vma(f"racer-{n}"), code).enrollment_id)
        except grpc.RpcError as exc:
            outcomes.append(exc.code())

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if isinstance(o, str)]
    assert len(winners) == 1 and outcomes.count(grpc.StatusCode.UNAUTHENTICATED) == 7
    assert [e.id for e in models.VmaEnrollment.select()] == winners
    assert code_row(server, code).used_by_enrollment_id == winners[0]


def test_keys_must_be_well_formed_ed25519_and_not_in_use(admin, public, server):
    code = new_code(admin)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    vma = Vma("ok")
    blob = base64.b64decode(vma.blob_b64)
    bad_keys = {
        rsa_key: "only ssh-ed25519",
        f"ssh-ed25519 {base64.b64encode(blob + b'x').decode()}": "key blob",  # trailing bytes
        f"ssh-ed25519 {base64.b64encode(blob[:-1]).decode()}": "key blob",  # short key
        f"ssh-ed25519 {base64.b64encode(blob.replace(b'ssh-ed25519', b'ssh-ed25518')).decode()}": "key blob",
        "ssh-ed25519 not-base64!": "base64",
        f"ssh-ed25519 {vma.blob_b64} bad\x07comment": "control characters",
    }
    before = factories.db_snapshot()
    for key, reason in bad_keys.items():
        code_, details = _error(lambda: public.enrollment.Enroll(pb.EnrollRequest(
            pairing_code=code, vma_public_key=key, vma_name="x"), timeout=10))
        assert code_ == grpc.StatusCode.INVALID_ARGUMENT and reason in details, (key, details)
    assert factories.db_snapshot() == before

    enroll(public, vma, code)
    again = new_code(admin)
    assert _error(lambda: enroll(public, _same_key(vma), again))[0] == \
        grpc.StatusCode.ALREADY_EXISTS
    assert code_row(server, again).used_at is None  # not consumed
    admin.enrollment_admin.RejectEnrollment(apb.RejectEnrollmentRequest(enrollment_id=vma.enrollment_id), timeout=10)
    assert enroll(public, _same_key(vma), again).status == "pending_verification"  # a rejected key may come back


def _same_key(vma: Vma) -> Vma:
    twin = Vma(vma.name + "-again")
    twin.private, twin.public_key, twin.blob_b64 = vma.private, vma.public_key, vma.blob_b64
    return twin


def test_bad_signatures_are_counted_and_the_fifth_rejects(admin, public):
    vma = Vma("clumsy")
    enroll(public, vma, new_code(admin))
    impostor = Vma("impostor")
    bad = [impostor.sign(vma.challenge), base64.b64encode(b"\0" * 64).decode(), "not base64!", "AAAA"]
    for n, signature in enumerate(bad, start=1):
        response = verify(public, vma, signature)
        assert response.status == "pending_verification" and f"{n} of 5" in response.message
    assert _error(lambda: verify(public, vma, ""))[0] == grpc.StatusCode.INVALID_ARGUMENT  # not an attempt
    fifth = verify(public, vma, impostor.sign(vma.challenge))
    assert fifth.status == "rejected"
    row = models.VmaEnrollment.get_by_id(vma.enrollment_id)
    assert (row.status, row.challenge_nonce) == ("rejected", None)
    assert _error(lambda: verify(public, vma))[0] == grpc.StatusCode.FAILED_PRECONDITION  # too late now
    trail = list(reversed(audit_events(admin, enrollment_id=vma.enrollment_id)))
    assert [e.event_type for e in trail] == ["enrollment"] + ["verification"] * 5 + ["rejection"]
    assert [json_format.MessageToDict(e.event_details).get("success") for e in trail[1:6]] == [False] * 5
    assert trail[-1].approved_by == "system"


def test_transitions_from_the_wrong_state_are_refused_without_writes(admin, public):
    unverified = Vma("unverified")
    enroll(public, unverified, new_code(admin))
    rejected = awaiting(admin, public, "rejected")
    admin.enrollment_admin.RejectEnrollment(apb.RejectEnrollmentRequest(
        enrollment_id=rejected.enrollment_id, reason="unknown site"), timeout=10)
    approved = awaiting(admin, public, "approved")
    approve(admin, approved)
    overdue = awaiting(admin, public, "overdue")
    models.VmaEnrollment.update(expires_at=models.utcnow() - timedelta(seconds=1)).where(
        models.VmaEnrollment.id == overdue.enrollment_id).execute()

    api = admin.enrollment_admin
    refused = [
        lambda: approve(admin, unverified),
        lambda: approve(admin, rejected),
        lambda: approve(admin, approved),
        lambda: approve(admin, overdue),
        lambda: api.RejectEnrollment(apb.RejectEnrollmentRequest(enrollment_id=approved.enrollment_id), timeout=10),
        lambda: api.RejectEnrollment(apb.RejectEnrollmentRequest(enrollment_id=rejected.enrollment_id), timeout=10),
        lambda: api.RevokeVMA(apb.RevokeVMARequest(enrollment_id=unverified.enrollment_id), timeout=10),
        lambda: verify(public, approved, approved.sign(base64.b64encode(b"x" * 32).decode())),
        lambda: verify(public, overdue, overdue.sign(base64.b64encode(b"x" * 32).decode())),
    ]
    before = factories.db_snapshot()
    for call in refused:
        assert _error(call)[0] == grpc.StatusCode.FAILED_PRECONDITION
    for call in (lambda: api.ApproveEnrollment(apb.ApproveEnrollmentRequest(enrollment_id="nope"), timeout=10),
                 lambda: api.RevokeVMA(apb.RevokeVMARequest(enrollment_id="nope"), timeout=10),
                 lambda: public.enrollment.GetEnrollmentResult(
                     pb.GetEnrollmentResultRequest(enrollment_id="nope"), timeout=10)):
        assert _error(call)[0] == grpc.StatusCode.NOT_FOUND
    assert factories.db_snapshot() == before
    # An unverified enrollment may be rejected (allowed from pending_verification or awaiting_approval).
    assert api.RejectEnrollment(apb.RejectEnrollmentRequest(enrollment_id=unverified.enrollment_id),
                                timeout=10).enrollment.status == "rejected"
    reasons = [json_format.MessageToDict(e.event_details).get("reason")
               for e in audit_events(admin, event_type="rejection")]
    assert reasons == [None, "unknown site"]


def test_an_approval_whose_key_cannot_be_installed_commits_nothing(oma_factory, tmp_path):
    keys_file = tmp_path / "authorized_keys"
    keys_file.mkdir()  # a directory where the file should be: every write fails
    server = oma_factory(tunnel_authorized_keys=str(keys_file))
    with OmaClient(f"127.0.0.1:{server.port}", token="") as client:
        client.login("admin", ADMIN_PASSWORD)
        vma = awaiting(client, client, "unlucky")
        before = factories.db_snapshot()
        code, details = _error(lambda: approve(client, vma))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "nothing was approved" in details
        assert factories.db_snapshot() == before
        assert models.VmaEnrollment.get_by_id(vma.enrollment_id).status == "awaiting_approval"
        assert not models.VmaActiveConnection.select().exists()


def test_overdue_enrollments_read_expired_and_the_sweep_records_it(admin, public):
    pending = Vma("slow-verifier")
    enroll(public, pending, new_code(admin))
    waiting = awaiting(admin, public, "never-approved")
    fresh = awaiting(admin, public, "fresh")
    models.VmaEnrollment.update(expires_at=models.utcnow() - timedelta(seconds=1)).where(
        models.VmaEnrollment.id.in_([pending.enrollment_id, waiting.enrollment_id])).execute()
    assert result(public, pending).status == "expired" and result(public, waiting).status == "expired"
    assert [e.id for e in admin.enrollment_admin.ListPendingEnrollments(
        apb.ListPendingEnrollmentsRequest(), timeout=10).enrollments] == [fresh.enrollment_id]

    assert domain.expire_overdue() == 2
    assert domain.expire_overdue() == 0
    statuses = {e.id: (e.status, e.challenge_nonce) for e in models.VmaEnrollment.select()}
    assert statuses[pending.enrollment_id] == ("expired", None)
    assert statuses[waiting.enrollment_id] == ("expired", None)
    assert statuses[fresh.enrollment_id] == ("awaiting_approval", None)
    expiries = [e for e in audit_events(admin) if json_format.MessageToDict(e.event_details).get("action") == "expired"]
    assert sorted(e.enrollment_id for e in expiries) == sorted([pending.enrollment_id, waiting.enrollment_id])
    assert {e.approved_by for e in expiries} == {"system"}


def test_the_background_sweep_expires_enrollments(oma_factory, tmp_path):
    server = oma_factory(tunnel_authorized_keys=str(tmp_path / "ak"), enrollment_sweep_interval_seconds=0.1,
                         enrollment_verify_window_seconds=1)
    with OmaClient(f"127.0.0.1:{server.port}", token="") as client:
        client.login("admin", ADMIN_PASSWORD)
        vma = Vma("sleepy")
        enroll(client, vma, new_code(client))
        deadline = time.monotonic() + 15
        while models.VmaEnrollment.get_by_id(vma.enrollment_id).status != "expired":
            assert time.monotonic() < deadline, "the sweep did not expire the enrollment"
            time.sleep(0.1)
        assert result(client, vma).status == "expired"


def test_public_rpcs_are_rate_limited_per_address(oma_factory, tmp_path):
    server = oma_factory(tunnel_authorized_keys=str(tmp_path / "ak"), enrollment_rate_limit_per_minute=5)
    with OmaClient(f"127.0.0.1:{server.port}", token="") as client:
        codes = []
        for _ in range(7):
            try:
                client.enrollment.GetEnrollmentResult(pb.GetEnrollmentResultRequest(enrollment_id="x"), timeout=10)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert codes[:5] == [grpc.StatusCode.NOT_FOUND] * 5
        assert codes[5:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2


def test_audit_log_filters_and_pages(admin, public):
    vmas = [awaiting(admin, public, f"vma-{n}") for n in range(3)]
    approve(admin, vmas[0])
    api = admin.enrollment_admin
    everything = audit_events(admin)
    assert len(everything) == 3 * 3 + 1  # per VMA: code, enrollment, verification; one approval
    assert [e.created_at.ToDatetime() for e in everything] == sorted(
        (e.created_at.ToDatetime() for e in everything), reverse=True)
    assert [e.event_type for e in audit_events(admin, event_type="approval")] == ["approval"]
    assert {e.enrollment_id for e in audit_events(admin, enrollment_id=vmas[1].enrollment_id)} == {
        vmas[1].enrollment_id}
    middle = everything[4].created_at
    since = [e.id for e in audit_events(admin, since=middle)]
    until = [e.id for e in audit_events(admin, until=middle)]
    assert sorted(since + until) == sorted(e.id for e in everything)

    first = api.GetAuditLog(apb.GetAuditLogRequest(page_size=4), timeout=10)
    second = api.GetAuditLog(apb.GetAuditLogRequest(page_size=4, page_token=first.next_page_token), timeout=10)
    assert first.count == 10 and [e.id for e in [*first.events, *second.events]] == [e.id for e in everything[:8]]
    assert _error(lambda: api.GetAuditLog(apb.GetAuditLogRequest(event_type="login"), timeout=10))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert json.dumps([json_format.MessageToDict(e) for e in everything]).count("challenge") == 0
