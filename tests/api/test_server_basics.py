"""The OMA server runs for real: health, reflection, login, bearer-token enforcement, unbuilt RPCs."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from oma.v1 import auth_pb2, vm_contexts_pb2

from oma_server.db.models import ApiUser
from oma_server.domain.auth import TokenAuthority
from omaclient.client import OmaClient
from tests.fixtures.servers import ADMIN_PASSWORD, start_oma


def test_health_is_serving_without_a_token(anonymous, oma_server):
    stub = health_pb2_grpc.HealthStub(anonymous._raw_channel)
    for service in ("", "oma.v1.VMContextService"):
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_every_service(anonymous, oma_server):
    stub = reflection_pb2_grpc.ServerReflectionStub(anonymous._raw_channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"oma.v1.AuthService", "oma.v1.ReplicationService", "oma.v1.FailoverService",
            "oma.v1.EnrollmentService", "oma.v1.UserService", "grpc.health.v1.Health"} <= names
    assert len([n for n in names if n.startswith("oma.v1.")]) == 18


def test_login_issues_a_token_and_wrong_password_is_unauthenticated(anonymous, db):
    response = anonymous.auth.Login(auth_pb2.LoginRequest(username="admin", password=ADMIN_PASSWORD), timeout=5)
    assert response.token and response.token_type == "Bearer" and response.username == "admin"
    assert response.expires_at.seconds > 0
    before = ApiUser.get(ApiUser.username == "admin").__data__
    anonymous.auth.Login(auth_pb2.LoginRequest(username="admin", password=ADMIN_PASSWORD), timeout=5)
    assert ApiUser.get(ApiUser.username == "admin").__data__ == before  # login issues tokens, writes nothing
    for user, password in (("admin", "wrong"), ("nobody", ADMIN_PASSWORD)):
        with pytest.raises(grpc.RpcError) as err:
            anonymous.auth.Login(auth_pb2.LoginRequest(username=user, password=password), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "invalid username or password" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        anonymous.auth.Login(auth_pb2.LoginRequest(username="admin"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_rpcs_need_a_valid_token(anonymous, oma_server, oma):
    request = vm_contexts_pb2.ListVMContextsRequest()
    with pytest.raises(grpc.RpcError) as err:
        anonymous.contexts.ListVMContexts(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in err.value.details()
    anonymous.token = "not-a-token"
    with pytest.raises(grpc.RpcError) as err:
        anonymous.contexts.ListVMContexts(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A token signed with another secret is refused; an expired one too.
    anonymous.token = TokenAuthority(b"another-secret-of-32-bytes-length", 60).issue("admin").token
    with pytest.raises(grpc.RpcError) as err:
        anonymous.contexts.ListVMContexts(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    anonymous.token = TokenAuthority(_secret(oma_server), -10).issue("admin").token
    with pytest.raises(grpc.RpcError) as err:
        anonymous.contexts.ListVMContexts(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in err.value.details()
    assert oma.contexts.ListVMContexts(request, timeout=5).count == 0


def _secret(running) -> bytes:
    import base64

    return base64.b64decode((running.runtime.settings.data_dir / "token.secret").read_text().strip())


def test_tokens_survive_a_restart(db, tmp_path):
    with start_oma(tmp_path / "oma", db) as first:
        client = OmaClient(f"127.0.0.1:{first.port}", token="")
        token = client.login("admin", ADMIN_PASSWORD).token
        client.close()
    with start_oma(tmp_path / "oma", db) as second:
        client = OmaClient(f"127.0.0.1:{second.port}", token=token)
        assert client.contexts.ListVMContexts(vm_contexts_pb2.ListVMContextsRequest(), timeout=5).count == 0
        client.close()
    assert ApiUser.select().count() == 1  # the admin is created once
