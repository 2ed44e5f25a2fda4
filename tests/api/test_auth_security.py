"""Login hardening, users and roles, and the end of tokens, against a running OMA server on both databases.

Throttling (per user name and per address, RESOURCE_EXHAUSTED with a RetryInfo detail, failures logged and
counted), the same work for unknown users, the method → role table enforced for every admin-only RPC, users
(create, list, disable, delete; never the last active admin), ChangePassword, Logout, RevokeUserTokens, the cached
revocation seen by a second OMA on the same database, the production token-secret length, secret rotation and
OMA_ADMIN_PASSWORD seeding only the first start.
"""
from __future__ import annotations

import base64
import importlib
import json
import logging
import pkgutil
import time
from datetime import UTC, datetime

import grpc
import oma.v1
import pytest
from oma.v1 import auth_pb2, enrollment_admin_pb2, users_pb2, vm_contexts_pb2
from prometheus_client import REGISTRY

from oma_server.config import Settings
from oma_server.db.models import ApiRevokedToken, ApiUser, UserRole
from oma_server.domain import auth
from oma_server.domain.login_throttle import LoginThrottle, ThrottlePolicy
from oma_server.server import build_server
from omaclient.client import OmaClient, retry_delay
from tests.factories import db_snapshot, read_without_writes, refused_without_writes
from tests.fixtures.servers import ADMIN_PASSWORD, start_oma

OPERATOR_PASSWORD = "operator-password-1"
LIST = vm_contexts_pb2.ListVMContextsRequest()


def _client(server, token: str = "") -> OmaClient:
    return OmaClient(f"127.0.0.1:{server.port}", token=token)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def _login_error(client: OmaClient, username: str, password: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        client.auth.Login(auth_pb2.LoginRequest(username=username, password=password), timeout=10)
    return err.value


def _failures(reason: str) -> float:
    return REGISTRY.get_sample_value("oma_auth_login_failures_total", {"reason": reason}) or 0.0


def _create_user(admin: OmaClient, name: str, role: str = "operator", password: str = OPERATOR_PASSWORD):
    return admin.users.CreateUser(users_pb2.CreateUserRequest(username=name, password=password, role=role),
                                  timeout=10).user


# ------------------------------------------------------------------------------------------------ throttling


def test_repeated_wrong_passwords_are_throttled_with_retry_info_logged_and_counted(oma_factory, db, caplog):
    server = oma_factory(login_free_failures_per_user=5, login_backoff_base_seconds=3.0)
    anonymous = _client(server)
    invalid_before, throttled_before = _failures("invalid_credentials"), _failures("throttled")
    caplog.set_level(logging.WARNING, logger="oma_server.auth")
    codes, delays = [], []
    before = db_snapshot()
    started = time.monotonic()
    for _ in range(40):
        error = _login_error(anonymous, "admin", "wrong-password")
        codes.append(error.code())
        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            delays.append(retry_delay(error))
            assert "try again in" in error.details()
    assert time.monotonic() - started < 3.0, "the loop must end inside the first backoff for this test to hold"
    assert db_snapshot() == before  # Login writes nothing, failed or throttled
    # Five free failures, the sixth is checked and starts the backoff; every later one is refused unchecked.
    assert codes[:6] == [grpc.StatusCode.UNAUTHENTICATED] * 6
    assert codes[6:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 34
    assert all(d is not None and 0 < d <= 3.0 for d in delays)
    # While locked even the right password is refused: the lock is on the name, not on the guess.
    locked = _login_error(anonymous, "admin", ADMIN_PASSWORD)
    assert locked.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    time.sleep(retry_delay(locked))
    assert anonymous.login("admin", ADMIN_PASSWORD).token
    # Every refusal is counted (one label for every wrong credential) and every checked failure logged.
    assert _failures("invalid_credentials") - invalid_before == 6
    assert _failures("throttled") - throttled_before == 35
    failed = [r for r in caplog.records if "failed password check for 'admin'" in r.getMessage()]
    assert len(failed) == 6 and all("from 127.0.0.1" in r.getMessage() for r in failed)
    assert any("throttled" in r.getMessage() for r in caplog.records)
    assert not any("wrong-password" in r.getMessage() or ADMIN_PASSWORD in r.getMessage() for r in caplog.records)


def test_spraying_many_user_names_from_one_address_is_throttled(oma_factory, db):
    server = oma_factory(login_free_failures_per_peer=8, login_backoff_base_seconds=5.0)
    anonymous = _client(server)
    codes = [_login_error(anonymous, f"user{i}", "guess-password").code() for i in range(12)]
    assert codes[:9] == [grpc.StatusCode.UNAUTHENTICATED] * 9
    assert codes[9:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    # A fresh name, and the admin with its right password, are refused from this address too.
    assert _login_error(anonymous, "admin", ADMIN_PASSWORD).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_success_resets_the_user_counter_but_not_the_address_guesses(db):
    clock = [0.0]
    throttle = LoginThrottle(ThrottlePolicy(free_failures_per_user=2, free_failures_per_peer=3,
                                            backoff_base_seconds=10, window_seconds=60), clock=lambda: clock[0])
    for _ in range(2):
        throttle.begin("alice", "10.0.0.1")  # two failures of alice
    throttle.succeeded(throttle.begin("alice", "10.0.0.1"))  # alice's counter reset; the address keeps 2
    assert throttle.failures("alice") == 0
    throttle.begin("bob", "10.0.0.1")  # the address's 3rd
    throttle.begin("carol", "10.0.0.1")  # the 4th starts the address's backoff
    with pytest.raises(auth.ResourceExhausted) as err:
        throttle.begin("dave", "10.0.0.1")
    assert err.value.retry_after_seconds == 10
    throttle.begin("dave", "10.0.0.2")  # another address is not affected
    clock[0] = 10.0
    throttle.begin("dave", "10.0.0.1")  # the backoff is over; the next failure doubles it
    with pytest.raises(auth.ResourceExhausted) as err:
        throttle.begin("erin", "10.0.0.1")
    assert err.value.retry_after_seconds == 20
    clock[0] = 200.0  # a quiet window forgets the address
    throttle.begin("erin", "10.0.0.1")


def test_an_unknown_user_costs_the_same_work_as_a_known_one(db):
    auth.ensure_admin_user(ADMIN_PASSWORD)
    ApiUser.create(username="disabled", password_hash=auth.hash_password("x" * 12), is_active=False)
    authority = auth.TokenAuthority(b"s" * 32, 60, throttle=LoginThrottle(ThrottlePolicy(
        free_failures_per_user=1000, free_failures_per_peer=1000)))

    def cpu_seconds(username: str, password: str) -> float:
        # CPU time of this thread: the scrypt work itself, not disturbed by other processes on the machine.
        started = time.thread_time()
        for _ in range(4):
            with pytest.raises(auth.Unauthenticated):
                authority.check_password(username, password, "10.0.0.9")
        return time.thread_time() - started

    cpu_seconds("nobody", "warm-up-password")  # the stand-in hash is made once, on first use
    known = cpu_seconds("admin", "wrong-password")
    for unknown in (cpu_seconds("nobody", "wrong-password"), cpu_seconds("disabled", "x" * 12)):
        assert unknown > 0.6 * known, (unknown, known)


# ------------------------------------------------------------------------------------------------ roles


def _all_methods() -> list[tuple[str, object]]:
    methods = []
    for m in pkgutil.iter_modules(oma.v1.__path__):
        if m.name.endswith("_pb2") and not m.name.endswith("_grpc_pb2"):
            module = importlib.import_module(f"oma.v1.{m.name}")
            for service in module.DESCRIPTOR.services_by_name.values():
                for method in service.methods:
                    methods.append((f"/{service.full_name}/{method.name}", method))
    return methods


def test_every_admin_only_rpc_is_refused_to_an_operator(oma, oma_server):
    methods = _all_methods()
    admin_only = {name for name, _ in methods if auth.required_role(name) == UserRole.ADMIN}
    # The table covers user management, enrollment administration and ending another user's tokens ...
    must_be_admin = {name for name, _ in methods
                     if name.startswith(("/oma.v1.UserService/", "/oma.v1.EnrollmentAdminService/"))}
    assert must_be_admin | {"/oma.v1.AuthService/RevokeUserTokens"} == admin_only
    assert len(admin_only) == 4 + 7 + 1
    _create_user(oma, "ops")
    operator = _client(oma_server)
    operator.login("ops", OPERATOR_PASSWORD)
    # ... and every one of them is refused to an operator, before it runs: nothing is written.
    from google.protobuf import message_factory

    for name, method in methods:
        if name not in admin_only:
            continue
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        call = operator.channel.unary_unary(name, request_serializer=request_class.SerializeToString,
                                            response_deserializer=response_class.FromString)
        code = refused_without_writes(lambda call=call, request_class=request_class: call(request_class(), timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED, name
    denied = _code(lambda: operator.enrollment_admin.GeneratePairingCode(
        enrollment_admin_pb2.GeneratePairingCodeRequest(), timeout=10))
    assert denied == grpc.StatusCode.PERMISSION_DENIED
    # The operator does the migration work; the admin does both.
    assert operator.contexts.ListVMContexts(LIST, timeout=10).count == 0
    assert oma.users.ListUsers(users_pb2.ListUsersRequest(), timeout=10).count == 2
    assert oma.enrollment_admin.GeneratePairingCode(enrollment_admin_pb2.GeneratePairingCodeRequest(), timeout=10)


# ------------------------------------------------------------------------------------------------ users


def test_users_are_created_listed_disabled_and_deleted_with_their_tokens(oma, oma_server):
    user = _create_user(oma, "ops")
    assert (user.username, user.role, user.is_active) == ("ops", "operator", True)
    bad = [
        users_pb2.CreateUserRequest(username="ops", password=OPERATOR_PASSWORD, role="operator"),
        users_pb2.CreateUserRequest(username="bad name", password=OPERATOR_PASSWORD, role="operator"),
        users_pb2.CreateUserRequest(username="short", password="2short", role="operator"),
        users_pb2.CreateUserRequest(username="viewer", password=OPERATOR_PASSWORD, role="viewer"),
    ]
    codes = [refused_without_writes(lambda r=r: oma.users.CreateUser(r, timeout=10)) for r in bad]
    assert codes == [grpc.StatusCode.ALREADY_EXISTS] + [grpc.StatusCode.INVALID_ARGUMENT] * 3
    listed = read_without_writes(lambda: oma.users.ListUsers(users_pb2.ListUsersRequest(), timeout=10))
    assert [(u.username, u.role, u.is_active) for u in listed.users] == [("admin", "admin", True),
                                                                         ("ops", "operator", True)]
    assert "hash" not in str(listed) and "scrypt" not in str(listed)

    operator = _client(oma_server)
    operator.login("ops", OPERATOR_PASSWORD)
    oma.users.SetUserDisabled(users_pb2.SetUserDisabledRequest(username="ops", disabled=True), timeout=10)
    assert _code(lambda: operator.contexts.ListVMContexts(LIST, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    assert _login_error(_client(oma_server), "ops", OPERATOR_PASSWORD).code() == grpc.StatusCode.UNAUTHENTICATED
    enabled = oma.users.SetUserDisabled(users_pb2.SetUserDisabledRequest(username="ops", disabled=False),
                                        timeout=10).user
    assert enabled.is_active
    # Enabling lets the user log in again; the token from before the disabling stays ended.
    assert _code(lambda: operator.contexts.ListVMContexts(LIST, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    operator.login("ops", OPERATOR_PASSWORD)
    assert operator.contexts.ListVMContexts(LIST, timeout=10).count == 0

    oma.users.DeleteUser(users_pb2.DeleteUserRequest(username="ops"), timeout=10)
    assert _code(lambda: operator.contexts.ListVMContexts(LIST, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    assert not ApiUser.select().where(ApiUser.username == "ops").exists()
    for call in (lambda: oma.users.DeleteUser(users_pb2.DeleteUserRequest(username="ops"), timeout=10),
                 lambda: oma.users.SetUserDisabled(users_pb2.SetUserDisabledRequest(username="ops", disabled=True),
                                                   timeout=10)):
        assert refused_without_writes(call) == grpc.StatusCode.NOT_FOUND
    # A new user under the old name does not inherit the old user's tokens.
    _create_user(oma, "ops")
    assert _code(lambda: operator.contexts.ListVMContexts(LIST, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED


def test_the_last_active_admin_cannot_be_disabled_or_deleted(oma, oma_server):
    for call in (lambda: oma.users.SetUserDisabled(users_pb2.SetUserDisabledRequest(username="admin", disabled=True),
                                                   timeout=10),
                 lambda: oma.users.DeleteUser(users_pb2.DeleteUserRequest(username="admin"), timeout=10)):
        with pytest.raises(grpc.RpcError) as err:
            read_without_writes(lambda call=call: _raise(call))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "last active admin" in err.value.details()
    _create_user(oma, "admin2", role="admin", password="second-admin-password")
    second = _client(oma_server)
    second.login("admin2", "second-admin-password")
    oma.users.DeleteUser(users_pb2.DeleteUserRequest(username="admin"), timeout=10)  # another admin remains
    assert _code(lambda: oma.contexts.ListVMContexts(LIST, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    assert refused_without_writes(lambda: second.users.DeleteUser(
        users_pb2.DeleteUserRequest(username="admin2"), timeout=10)) == grpc.StatusCode.FAILED_PRECONDITION
    # An operator does not count as an admin.
    _create_user(second, "ops")
    assert refused_without_writes(lambda: second.users.SetUserDisabled(
        users_pb2.SetUserDisabledRequest(username="admin2", disabled=True), timeout=10)) == \
        grpc.StatusCode.FAILED_PRECONDITION


def test_two_admins_removing_each_other_at_once_leave_one_active_admin(oma, oma_server):
    from concurrent.futures import ThreadPoolExecutor

    survivor, survivor_name = oma, "admin"
    for round_ in range(4):
        # Exactly two active admins: the survivor of the last round and a new one; each removes the other.
        name = f"admin{round_}"
        _create_user(survivor, name, role="admin", password=f"{name}-password")
        other = _client(oma_server)
        other.login(name, f"{name}-password")
        calls = {survivor_name: lambda: survivor.users.DeleteUser(users_pb2.DeleteUserRequest(username=name),
                                                                  timeout=20),
                 name: lambda: other.users.SetUserDisabled(
                     users_pb2.SetUserDisabledRequest(username=survivor_name, disabled=True), timeout=20)}
        with ThreadPoolExecutor(2) as pool:
            futures = {caller: pool.submit(call) for caller, call in calls.items()}
        outcomes = {}
        for caller, future in futures.items():
            try:
                future.result()
                outcomes[caller] = "OK"
            except grpc.RpcError as err:
                outcomes[caller] = err.code().name
        # One wins; the other is refused as the last admin, or finds its caller already gone (never INTERNAL).
        assert sorted(outcomes.values()) in (["FAILED_PRECONDITION", "OK"], ["OK", "UNAUTHENTICATED"]), outcomes
        active_admins = ApiUser.select().where(ApiUser.role == "admin", ApiUser.is_active == True)  # noqa: E712
        assert active_admins.count() == 1
        if active_admins.get().username == name:
            survivor, survivor_name = other, name


def _raise(call):
    call()


# ------------------------------------------------------------------------------------------------ tokens


def test_logout_ends_only_that_token(oma, oma_server):
    other = _client(oma_server)
    other.login("admin", ADMIN_PASSWORD)
    assert oma.logout().username == "admin"
    oma.token = other.token  # the ended token's twin still works
    assert oma.contexts.ListVMContexts(LIST, timeout=10).count == 0
    row = ApiRevokedToken.get()
    assert row.user.username == "admin" and row.expires_at > datetime.now(UTC).replace(tzinfo=None)


def test_logout_is_refused_for_the_ended_token(oma_server, oma):
    token = oma.token
    oma.logout()
    ended = _client(oma_server, token)
    error = _code(lambda: ended.contexts.ListVMContexts(LIST, timeout=10))
    assert error == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        ended.auth.Logout(auth_pb2.LogoutRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in err.value.details()


def test_change_password_ends_every_token_and_returns_a_fresh_one(oma, oma_server):
    other = _client(oma_server)
    other.login("admin", ADMIN_PASSWORD)
    change = auth_pb2.ChangePasswordRequest
    assert refused_without_writes(lambda: oma.auth.ChangePassword(
        change(current_password="not-the-password", new_password="a-new-long-password"), timeout=10)) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert refused_without_writes(lambda: oma.auth.ChangePassword(
        change(current_password=ADMIN_PASSWORD, new_password="short"), timeout=10)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    response = oma.auth.ChangePassword(change(current_password=ADMIN_PASSWORD, new_password="a-new-long-password"),
                                       timeout=10)
    for old in (oma.token, other.token):
        assert _code(lambda old=old: _client(oma_server, old).contexts.ListVMContexts(LIST, timeout=10)) == \
            grpc.StatusCode.UNAUTHENTICATED
    assert _client(oma_server, response.login.token).contexts.ListVMContexts(LIST, timeout=10).count == 0
    assert _login_error(_client(oma_server), "admin", ADMIN_PASSWORD).code() == grpc.StatusCode.UNAUTHENTICATED
    assert _client(oma_server).login("admin", "a-new-long-password").token


def test_an_admin_revokes_all_of_a_users_tokens(oma, oma_server):
    _create_user(oma, "ops")
    first, second = _client(oma_server), _client(oma_server)
    first.login("ops", OPERATOR_PASSWORD)
    second.login("ops", OPERATOR_PASSWORD)
    response = oma.auth.RevokeUserTokens(auth_pb2.RevokeUserTokensRequest(username="ops"), timeout=10)
    assert response.username == "ops" and response.tokens_valid_after.seconds > 0
    for client in (first, second):
        assert _code(lambda client=client: client.contexts.ListVMContexts(LIST, timeout=10)) == \
            grpc.StatusCode.UNAUTHENTICATED
    first.login("ops", OPERATOR_PASSWORD)  # the user itself is not locked out
    assert first.contexts.ListVMContexts(LIST, timeout=10).count == 0
    assert refused_without_writes(lambda: oma.auth.RevokeUserTokens(
        auth_pb2.RevokeUserTokensRequest(username="nobody"), timeout=10)) == grpc.StatusCode.NOT_FOUND


def test_a_revocation_reaches_another_oma_on_the_same_database_within_the_cache_time(db, tmp_path):
    shared = {"token_secret": "a-token-secret-shared-by-both-processes", "token_revocation_cache_seconds": 1.0}
    with start_oma(tmp_path / "a", db, instance_name="oma-a", **shared) as a, \
            start_oma(tmp_path / "b", db, instance_name="oma-b", **shared) as b:
        on_a = _client(a)
        token = on_a.login("admin", ADMIN_PASSWORD).token
        on_b = _client(b, token)
        assert on_b.contexts.ListVMContexts(LIST, timeout=10).count == 0  # b has now cached the users
        calls_before = _count_selects_of_users(b, on_b)
        assert calls_before == 0  # a cached check costs no query
        on_a.logout()
        ended = time.monotonic()
        assert _code(lambda: _client(a, token).contexts.ListVMContexts(LIST, timeout=10)) == \
            grpc.StatusCode.UNAUTHENTICATED  # at once on the process that ended it
        while True:
            try:
                on_b.contexts.ListVMContexts(LIST, timeout=10)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                break
            assert time.monotonic() - ended < 3.0, "b still accepts the ended token"
            time.sleep(0.1)


def _count_selects_of_users(server, client) -> int:
    """Queries of the users or revoked tokens run by one authenticated call of ``client`` (peewee logs every query
    at DEBUG)."""
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(str(record.msg))
    logger = logging.getLogger("peewee")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        client.contexts.ListVMContexts(LIST, timeout=10)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return sum("api_users" in s or "api_revoked_tokens" in s for s in seen)


def test_an_unreachable_database_makes_token_checks_unavailable_not_internal(tmp_path):
    from peewee import SqliteDatabase

    from oma_server.db.database import database_proxy
    from oma_server.errors import Unavailable

    authority = auth.TokenAuthority(b"s" * 32, 60)
    token = authority.issue("admin", 1).token
    previous = database_proxy.obj
    database_proxy.initialize(SqliteDatabase(str(tmp_path / "missing-dir" / "oma.db")))
    try:
        with pytest.raises(Unavailable) as err:
            authority.verify(token)
    finally:
        database_proxy.initialize(previous)
    assert "database is unreachable" in err.value.message


# ------------------------------------------------------------------------------------------------ secrets, seeding


def _settings(tmp_path, **values) -> Settings:
    return Settings(**{"listen": "127.0.0.1:0", "data_dir": tmp_path, "admin_password": ADMIN_PASSWORD, **values})


def test_production_refuses_a_token_secret_shorter_than_32_bytes(tmp_path):
    key = base64.b64encode(b"k" * 32).decode()
    for values in ({"token_secret": "x" * 31}, {"token_secret": "x" * 32, "token_secret_previous": "short"}):
        with pytest.raises(SystemExit) as stop:
            build_server(_settings(tmp_path, production=True, encryption_key=key, **values))
        assert "shorter than 32 bytes" in str(stop.value)
    assert not (tmp_path / "oma.db").exists()  # refused before touching the database


def test_a_previous_token_secret_keeps_live_tokens_during_a_rotation(db, tmp_path):
    old, new = "the-old-token-secret-of-32-bytes-or-more", "the-new-token-secret-of-32-bytes-or-more"
    with start_oma(tmp_path / "oma", db, token_secret=old) as first:
        token = _client(first).login("admin", ADMIN_PASSWORD).token
    with start_oma(tmp_path / "oma", db, token_secret=new, token_secret_previous=old) as rotating:
        assert _client(rotating, token).contexts.ListVMContexts(LIST, timeout=10).count == 0
        fresh = _client(rotating).login("admin", ADMIN_PASSWORD).token
    with start_oma(tmp_path / "oma", db, token_secret=new) as rotated:
        assert _code(lambda: _client(rotated, token).contexts.ListVMContexts(LIST, timeout=10)) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert _client(rotated, fresh).contexts.ListVMContexts(LIST, timeout=10).count == 0


def test_the_admin_password_setting_only_seeds_the_first_start(db, tmp_path):
    with start_oma(tmp_path / "oma", db) as first:
        admin = _client(first)
        admin.login("admin", ADMIN_PASSWORD)
        changed = admin.auth.ChangePassword(auth_pb2.ChangePasswordRequest(
            current_password=ADMIN_PASSWORD, new_password="changed-admin-password"), timeout=10)
        admin.token = changed.login.token  # the token used for the change has ended with the others
        _create_user(admin, "root2", role="admin", password="root2-admin-password")
    with start_oma(tmp_path / "oma", db) as second:  # OMA_ADMIN_PASSWORD still set to the first password
        assert _login_error(_client(second), "admin", ADMIN_PASSWORD).code() == grpc.StatusCode.UNAUTHENTICATED
        root2 = _client(second)
        root2.login("root2", "root2-admin-password")
        root2.users.DeleteUser(users_pb2.DeleteUserRequest(username="admin"), timeout=10)
    with start_oma(tmp_path / "oma", db):  # a deleted admin is not brought back
        assert [u.username for u in ApiUser.select()] == ["root2"]


# ------------------------------------------------------------------------------------------------ omactl


def test_omactl_users_passwd_and_logout(run_omactl, oma_server, tmp_path, monkeypatch):
    target = f"127.0.0.1:{oma_server.port}"
    config = tmp_path / "omactl" / "config.json"
    assert run_omactl("--target", target, "login", "--password-stdin", stdin=ADMIN_PASSWORD + "\n").code == 0

    created = run_omactl("users", "create", "ops", "--password-stdin", stdin=OPERATOR_PASSWORD + "\n")
    assert (created.code, created.out.strip()) == (0, "created user ops (operator)")
    assert run_omactl("users", "create", "ops", "--password-stdin", stdin=OPERATOR_PASSWORD + "\n").code == 106
    listed = run_omactl("users", "list")
    rows = [line.split()[:3] for line in listed.out.strip().splitlines()]
    assert rows == [["USERNAME", "ROLE", "ACTIVE"], ["admin", "admin", "yes"], ["ops", "operator", "yes"]]
    assert json.loads(run_omactl("--json", "users", "list").out)["count"] == 2
    assert run_omactl("users", "disable", "admin").code == 109  # the last active admin
    assert run_omactl("users", "disable", "ops").out.strip() == "disabled user ops; its tokens have ended"
    assert run_omactl("users", "enable", "ops").code == 0
    assert run_omactl("users", "revoke-tokens", "ops").out.startswith("ended every token of ops issued before")

    # passwd: both secrets from stdin (current, then new); the saved login carries on with the fresh token.
    old_token = json.loads(config.read_text())["token"]
    changed = run_omactl("passwd", "--current-password-stdin", "--new-password-stdin",
                         stdin=f"{ADMIN_PASSWORD}\nthe-new-admin-password\n")
    assert changed.code == 0 and "the saved login uses the new token" in changed.out, changed.err
    assert "the-new-admin-password" not in changed.out + changed.err + config.read_text()
    assert _code(lambda: _client(oma_server, old_token).contexts.ListVMContexts(LIST, timeout=10)) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert run_omactl("users", "delete", "ops").out.strip() == "deleted user ops; its tokens have ended"

    # logout ends the token on the server, so a copy of it stops working too.
    token = json.loads(config.read_text())["token"]
    logout = run_omactl("logout")
    assert logout.code == 0 and "the server ended the token; removed the saved token" in logout.out
    assert _code(lambda: _client(oma_server, token).contexts.ListVMContexts(LIST, timeout=10)) == \
        grpc.StatusCode.UNAUTHENTICATED

    # An operator is refused user management with 107 PERMISSION_DENIED and a hint.
    assert run_omactl("login", "--password-stdin", stdin="the-new-admin-password\n").code == 0
    run_omactl("users", "create", "ops2", "--password-stdin", stdin=OPERATOR_PASSWORD + "\n")
    assert run_omactl("login", "--username", "ops2", "--password-stdin", stdin=OPERATOR_PASSWORD + "\n").code == 0
    denied = run_omactl("users", "list")
    assert denied.code == 107 and "needs the admin role" in denied.err
