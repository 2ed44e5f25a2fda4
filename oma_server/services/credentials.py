from __future__ import annotations

from oma.v1 import vmware_credentials_pb2 as pb
from oma.v1 import vmware_credentials_pb2_grpc

from oma_server import errors
from oma_server.convert import optional, optional_fields
from oma_server.domain import credentials
from oma_server.integrations.vma_client import VmaClient
from oma_server.rpc import caller_name
from oma_server.services import messages

_UPDATABLE = ("credential_name", "vcenter_host", "username", "password", "datacenter", "is_active",
              "is_default", "tls_thumbprint", "tls_insecure")


def _one(cred) -> pb.VMwareCredential:
    """The message of a credential re-read with its context count (one statement)."""
    return _counted(credentials.get_counted(cred.id))


def _counted(cred) -> pb.VMwareCredential:
    return messages.credential(cred, cred.context_count)


class VMwareCredentialServicer(vmware_credentials_pb2_grpc.VMwareCredentialServiceServicer):

    def __init__(self, runtime, vma: VmaClient):
        self._runtime = runtime
        self._box = runtime.secrets
        self._vma = vma

    def ListCredentials(self, request, context):
        rows = credentials.list_credentials(request.active_only)
        return pb.ListCredentialsResponse(credentials=[_counted(c) for c in rows], count=len(rows))

    def CreateCredential(self, request, context):
        cred = credentials.create(
            self._box, credential_name=request.credential_name, vcenter_host=request.vcenter_host,
            username=request.username, password=request.password, datacenter=request.datacenter,
            is_active=optional(request, "is_active", True),
            is_default=request.is_default, tls_thumbprint=request.tls_thumbprint,
            tls_insecure=request.tls_insecure, created_by=caller_name(),
        )
        return pb.CreateCredentialResponse(credential=_one(cred))

    def GetCredential(self, request, context):
        return pb.GetCredentialResponse(credential=_counted(credentials.get_counted(request.id)))

    def UpdateCredential(self, request, context):
        cred = credentials.update(self._box, request.id, optional_fields(request, *_UPDATABLE))
        return pb.UpdateCredentialResponse(credential=_one(cred))

    def DeleteCredential(self, request, context):
        credentials.delete(request.id)
        return pb.DeleteCredentialResponse(id=request.id)

    def SetDefaultCredential(self, request, context):
        return pb.SetDefaultCredentialResponse(credential=_one(credentials.set_default(request.id)))

    def TestCredential(self, request, context):
        """Logs in through the VMA; vCenter-side failures are a normal answer with the reason."""
        login = credentials.login_for(self._box, request.id)
        try:
            checked = self._vma.check_connection(login)
        except errors.Unavailable as exc:
            if "VMA agent" in exc.message:
                raise
            return pb.TestCredentialResponse(success=False, message="vCenter is unreachable", error=exc.message)
        except (errors.Unauthenticated, errors.PermissionDenied, errors.NotFound,
                errors.FailedPrecondition) as exc:
            credentials.record_use(login.credential_id)
            return pb.TestCredentialResponse(success=False, message="vCenter refused the connection",
                                             error=exc.message)
        credentials.record_use(login.credential_id)
        return pb.TestCredentialResponse(
            success=checked.success, message=checked.message, vcenter_version=checked.vcenter_version,
            datacenters=checked.datacenters, error="" if checked.success else checked.message,
        )

    def GetDefaultCredential(self, request, context):
        return pb.GetDefaultCredentialResponse(credential=_counted(credentials.get_default()))
