"""AuthService (login, password change, logout, revocation of a user's tokens) and UserService (admin only, by
the role table in ``oma_server.domain.auth``; the interceptor enforces it before these handlers run)."""
from __future__ import annotations

from oma.v1 import auth_pb2, auth_pb2_grpc, users_pb2, users_pb2_grpc

from oma_server.convert import timestamp
from oma_server.domain import paging, users
from oma_server.domain.auth import IssuedToken
from oma_server.rpc import caller_name, current_identity
from oma_server.services.enrollment import source_address


def _login_response(issued: IssuedToken) -> auth_pb2.LoginResponse:
    return auth_pb2.LoginResponse(token=issued.token, token_type="Bearer", expires_at=timestamp(issued.expires_at),
                                  username=issued.username)


def _user(row) -> users_pb2.User:
    return users_pb2.User(id=row.id, username=row.username, role=str(row.role), is_active=bool(row.is_active),
                          created_at=timestamp(row.created_at), tokens_valid_after=timestamp(row.tokens_valid_after))


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):

    def __init__(self, runtime):
        self._tokens = runtime.tokens
        self._settings = runtime.settings

    def Login(self, request, context):
        return _login_response(self._tokens.login(request.username, request.password, source_address(context) or ""))

    def ChangePassword(self, request, context):
        issued = users.change_password(
            current_identity.get(), request.current_password, request.new_password, self._tokens,
            peer=source_address(context) or "", min_password_length=self._settings.password_min_length)
        return auth_pb2.ChangePasswordResponse(login=_login_response(issued))

    def Logout(self, request, context):
        identity = current_identity.get()
        self._tokens.logout(identity)
        return auth_pb2.LogoutResponse(username=identity.username)

    def RevokeUserTokens(self, request, context):
        user = users.revoke_tokens(request.username, self._tokens, actor=caller_name())
        return auth_pb2.RevokeUserTokensResponse(username=user.username,
                                                 tokens_valid_after=timestamp(user.tokens_valid_after))


class UserServicer(users_pb2_grpc.UserServiceServicer):
    def __init__(self, runtime):
        self._tokens = runtime.tokens
        self._settings = runtime.settings

    def CreateUser(self, request, context):
        user = users.create_user(request.username, request.password, request.role, self._tokens, actor=caller_name(),
                                 min_password_length=self._settings.password_min_length)
        return users_pb2.CreateUserResponse(user=_user(user))

    def ListUsers(self, request, context):
        page = paging.paginate_list(users.list_users(), request.page_size, request.page_token)
        return users_pb2.ListUsersResponse(users=[_user(u) for u in page.items], next_page_token=page.next_page_token,
                                           count=page.total)

    def SetUserDisabled(self, request, context):
        user = users.set_disabled(request.username, request.disabled, self._tokens, actor=caller_name())
        return users_pb2.SetUserDisabledResponse(user=_user(user))

    def DeleteUser(self, request, context):
        users.delete_user(request.username, self._tokens, actor=caller_name())
        return users_pb2.DeleteUserResponse(username=request.username)
