"""VMwareCredentialService (mapping: CRUD /vmware-credentials reads/writes vmware_credentials and may
update vm_replication_contexts.credential_id; GET /vmware-credentials/default reads is_default=1)."""
from __future__ import annotations

import grpc
import pytest
from google.protobuf import json_format
from oma.v1 import vmware_credentials_pb2 as pb

from oma_server.db import models
from oma_server.domain.crypto import slot_of
from tests import factories

PASSWORD = "S3cret-vc-password!"


def _create(oma, name="lab", **kw):
    values = dict(credential_name=name, vcenter_host="vcenter.lab", username="administrator@vsphere.local",
                  password=PASSWORD, datacenter="DC0")
    values.update(kw)
    return oma.credentials.CreateCredential(pb.CreateCredentialRequest(**values), timeout=5).credential


def _error(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_create_encrypts_and_never_returns_the_password(oma, oma_server):
    cred = _create(oma, is_default=True, tls_thumbprint="AA:" * 19 + "AA")
    row = models.VmwareCredential.get_by_id(cred.id)
    assert row.password_encrypted.startswith("enc:v2:") and PASSWORD not in row.password_encrypted
    slot = slot_of(models.VmwareCredential.password_encrypted, row.id)
    assert oma_server.runtime.secrets.decrypt(row.password_encrypted, slot) == PASSWORD
    assert row.created_by == "admin" and row.is_default and row.is_active
    listed = oma.credentials.ListCredentials(pb.ListCredentialsRequest(), timeout=5)
    fetched = oma.credentials.GetCredential(pb.GetCredentialRequest(id=cred.id), timeout=5)
    for message in (cred, listed, fetched):
        text = json_format.MessageToJson(message)
        assert PASSWORD not in text and "enc:v" not in text
    assert "password" not in pb.VMwareCredential.DESCRIPTOR.fields_by_name
    # Admin reads have no side effects on the usage counters.
    row = models.VmwareCredential.get_by_id(cred.id)
    assert row.usage_count == 0 and row.last_used is None


def test_create_rejects_bad_input_and_duplicates_without_writing(oma):
    _create(oma, "first")
    before = models.VmwareCredential.select().count()
    for kw, needle in ((dict(password=""), "password"), (dict(vcenter_host=" "), "vcenter_host"),
                       (dict(tls_thumbprint="zz"), "tls_thumbprint"),
                       (dict(is_default=True, is_active=False), "inactive")):
        code, msg = _error(lambda: _create(oma, "second", **kw))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in msg
    code, msg = _error(lambda: _create(oma, "first"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "first" in msg
    assert models.VmwareCredential.select().count() == before


def test_exactly_one_default(oma):
    a = _create(oma, "a", is_default=True)
    b = _create(oma, "b", is_default=True)
    defaults = [c.credential_name for c in models.VmwareCredential.select().where(models.VmwareCredential.is_default)]
    assert defaults == ["b"]
    assert oma.credentials.GetDefaultCredential(pb.GetDefaultCredentialRequest(), timeout=5).credential.id == b.id
    oma.credentials.SetDefaultCredential(pb.SetDefaultCredentialRequest(id=a.id), timeout=5)
    assert [c.id for c in models.VmwareCredential.select().where(models.VmwareCredential.is_default)] == [a.id]
    # Deactivating the default removes the flag; then there is no default.
    oma.credentials.UpdateCredential(pb.UpdateCredentialRequest(id=a.id, is_active=False), timeout=5)
    code, _ = _error(lambda: oma.credentials.GetDefaultCredential(pb.GetDefaultCredentialRequest(), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND
    code, msg = _error(lambda: oma.credentials.SetDefaultCredential(pb.SetDefaultCredentialRequest(id=a.id), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "inactive" in msg


def test_update_is_partial_and_reencrypts_a_new_password(oma, oma_server):
    cred = _create(oma)
    old = models.VmwareCredential.get_by_id(cred.id).password_encrypted
    updated = oma.credentials.UpdateCredential(pb.UpdateCredentialRequest(id=cred.id, username="ops"), timeout=5)
    row = models.VmwareCredential.get_by_id(cred.id)
    assert updated.credential.username == "ops" and row.is_active  # omitted is_active is unchanged
    assert row.password_encrypted == old and row.vcenter_host == "vcenter.lab"
    oma.credentials.UpdateCredential(pb.UpdateCredentialRequest(id=cred.id, password="new-one"), timeout=5)
    row = models.VmwareCredential.get_by_id(cred.id)
    slot = slot_of(models.VmwareCredential.password_encrypted, row.id)
    assert row.password_encrypted != old and oma_server.runtime.secrets.decrypt(row.password_encrypted, slot) == "new-one"
    _create(oma, "taken")
    code, _ = _error(lambda: oma.credentials.UpdateCredential(
        pb.UpdateCredentialRequest(id=cred.id, credential_name="taken"), timeout=5))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, _ = _error(lambda: oma.credentials.UpdateCredential(
        pb.UpdateCredentialRequest(id=cred.id, username=""), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert models.VmwareCredential.get_by_id(cred.id).username == "ops"
    code, _ = _error(lambda: oma.credentials.UpdateCredential(pb.UpdateCredentialRequest(id=999), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND


def test_delete_refused_while_used_or_last_active(oma):
    used = _create(oma, "used")
    spare = _create(oma, "spare")
    ctx = factories.context(credential=used.id)
    code, msg = _error(lambda: oma.credentials.DeleteCredential(pb.DeleteCredentialRequest(id=used.id), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "1 VM context" in msg
    listed = {c.credential_name: c.context_count for c in
              oma.credentials.ListCredentials(pb.ListCredentialsRequest(), timeout=5).credentials}
    assert listed == {"spare": 0, "used": 1}
    models.VmReplicationContext.update(credential=None).where(
        models.VmReplicationContext.context_id == ctx.context_id).execute()
    oma.credentials.DeleteCredential(pb.DeleteCredentialRequest(id=spare.id), timeout=5)
    code, msg = _error(lambda: oma.credentials.DeleteCredential(pb.DeleteCredentialRequest(id=used.id), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "last active" in msg
    assert [c.credential_name for c in models.VmwareCredential.select()] == ["used"]


def test_deleting_a_credential_row_unlinks_contexts(db):
    cred = models.VmwareCredential.create(credential_name="x", vcenter_host="h", username="u",
                                          password_encrypted="enc:v1:AAAA", datacenter="d")
    ctx = factories.context(credential=cred.id)
    cred.delete_instance()
    assert models.VmReplicationContext.get_by_id(ctx.context_id).credential_id is None


def test_active_only_filter(oma):
    _create(oma, "on")
    _create(oma, "off", is_active=False)
    names = [c.credential_name for c in oma.credentials.ListCredentials(
        pb.ListCredentialsRequest(active_only=True), timeout=5).credentials]
    assert names == ["on"]


# --- the stored password only ever goes where it was saved for (issue 9, item 3) ----------------------
@pytest.mark.parametrize("change", [dict(vcenter_host="attacker.example"), dict(vcenter_host="vcenter.lab:8443"),
                                    dict(tls_insecure=True), dict(tls_thumbprint="BB:" * 31 + "BB"),
                                    dict(tls_thumbprint="")])
def test_redirecting_the_saved_password_needs_the_password_again(oma, change):
    cred = _create(oma, tls_thumbprint="AA:" * 31 + "AA")
    code = factories.refused_without_writes(lambda: oma.credentials.UpdateCredential(
        pb.UpdateCredentialRequest(id=cred.id, **change), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    _, msg = _error(lambda: oma.credentials.UpdateCredential(pb.UpdateCredentialRequest(id=cred.id, **change), timeout=5))
    assert "password" in msg and next(iter(change)) in msg
    # With the password in the same request the change is taken, host/pin and password together.
    oma.credentials.UpdateCredential(pb.UpdateCredentialRequest(id=cred.id, password="re-entered", **change), timeout=5)
    row = models.VmwareCredential.get_by_id(cred.id)
    for name, value in change.items():
        assert getattr(row, name) == value


def test_unchanged_target_fields_need_no_password(oma):
    cred = _create(oma, tls_thumbprint="AA:" * 31 + "AA")
    oma.credentials.UpdateCredential(pb.UpdateCredentialRequest(
        id=cred.id, vcenter_host="vcenter.lab", tls_thumbprint="AA:" * 31 + "AA", tls_insecure=False,
        username="ops"), timeout=5)
    assert models.VmwareCredential.get_by_id(cred.id).username == "ops"


@pytest.mark.parametrize("host", ["a" * 64 + ".example", "vc..lab", "vc.lab:0", "vc.lab:99999", "vc lab",
                                  "vc.lab\n", "[::1", "-vc.lab", "vc.lab:https"])
def test_vcenter_host_is_parsed_on_input(oma, host):
    code = factories.refused_without_writes(lambda: _create(oma, "bad-host", vcenter_host=host))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_valid_vcenter_hosts_are_accepted(oma):
    for i, host in enumerate(["vc.example:443", "10.0.0.5", "[fd00::5]:443", "fd00::5", "vcenter_01.lab."]):
        assert _create(oma, f"ok-{i}", vcenter_host=host).vcenter_host == host
