from __future__ import annotations

from oma.v1 import auth_pb2, auth_pb2_grpc

from oma_server.convert import timestamp


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):

    def __init__(self, runtime):
        self._tokens = runtime.tokens

    def Login(self, request, context):
        issued = self._tokens.login(request.username, request.password)
        return auth_pb2.LoginResponse(
            token=issued.token, token_type="Bearer", expires_at=timestamp(issued.expires_at),
            username=issued.username,
        )
