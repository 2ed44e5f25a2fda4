"""Errors of the vSphere integration and how vCenter's answers map onto them.

:func:`agent_error` is the one place that turns pyVmomi faults, socket/TLS/HTTP errors and
malformed answers into :mod:`vma_agent.errors` exceptions (so gRPC statuses): messages name the
vCenter host and the object, and the password is scrubbed from anything vCenter echoed back.
:func:`changed_areas_error` classifies QueryChangedDiskAreas refusals into "copy the whole disk"
(:class:`ChangeTrackingUnusable`) or a caller bug.
"""
from __future__ import annotations

import http.client
import socket
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Callable

from pyVmomi import vim, vmodl

from vma_agent import errors
from vma_agent.integrations.vsphere.types import Fingerprints, colon_hex


class VSphereFault(errors.AgentError):
    """vCenter refused or failed an operation for a reason no other class describes."""

    code = "INTERNAL"


class GuestOperationUnavailable(errors.FailedPrecondition):
    """A guest operation (shutdown) needs running VMware Tools, or the VM is in the wrong state."""


class ChangeTrackingUnusable(errors.FailedPrecondition):
    """Changed Block Tracking cannot answer for this disk/change id: copy the whole disk."""


class ChangeTrackingNotActive(ChangeTrackingUnusable):
    """CBT is off for the VM, or the snapshot was taken while CBT was off (vim.fault.FileFault)."""


class InvalidChangeId(ChangeTrackingUnusable):
    """vCenter rejected the change id (garbled, from an older CBT identity, or from another disk)."""


class CertificateMismatch(ssl.SSLError):
    """The server certificate does not match the pinned thumbprint (raised inside the TLS
    handshake, so no request - and no password - is ever sent to that server)."""

    def __init__(self, host: str, expected: str, actual: Fingerprints):
        self.host, self.expected, self.actual = host, expected, actual
        kind = "SHA-1" if len(expected) == 40 else "SHA-256"
        super().__init__(
            f"the certificate of vCenter {host} does not match the pinned {kind} thumbprint "
            f"{colon_hex(expected)}: the server presented SHA-1 {actual.sha1} / SHA-256 {actual.sha256}"
        )


def describe_os_error(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message or exc.reason})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc.reason or exc})"
    if isinstance(exc, ConnectionError):
        return f"connection lost ({exc.__class__.__name__})"
    return str(exc) or exc.__class__.__name__


def fault_text(fault: BaseException) -> str:
    msg = getattr(fault, "msg", "") or ""
    if not msg:
        lm = getattr(fault, "faultMessage", None) or []
        msg = "; ".join(m.message for m in lm if getattr(m, "message", None))
    name = type(fault).__name__.rsplit(".", 1)[-1]
    return f"{name}: {msg}" if msg else name


def scrub(text: str, secret: str) -> str:
    if secret and len(secret) >= 3:
        text = text.replace(secret, "***")
    return text


def agent_error(exc: BaseException, *, host: str, user: str, password: str,
                certificate_hint: Callable[[], str] = lambda: "") -> errors.AgentError | None:
    """The agent error for ``exc``, raised while talking to vCenter ``host`` as ``user``; None
    when ``exc`` is not a vCenter, network or TLS failure (the caller re-raises it unchanged).

    ``certificate_hint`` is asked only when the server certificate is not trusted: it returns
    the text that tells the operator how to pin it (the fingerprints need a fresh connection)."""
    if isinstance(exc, CertificateMismatch):
        return errors.FailedPrecondition(scrub(str(exc), password))
    if isinstance(exc, vim.fault.InvalidLogin):
        return errors.Unauthenticated(f"vCenter {host} refused the login for {user}")
    if isinstance(exc, vim.fault.NotAuthenticated):
        return errors.Unauthenticated(f"vCenter {host} did not accept the session of {user}")
    if isinstance(exc, vim.fault.NoPermission):
        priv = getattr(exc, "privilegeId", "") or "?"
        obj = getattr(getattr(exc, "object", None), "_moId", "") or "?"
        return errors.PermissionDenied(f"vCenter {host}: user {user} lacks privilege {priv} on {obj}")
    if isinstance(exc, vmodl.fault.ManagedObjectNotFound):
        obj = getattr(getattr(exc, "obj", None), "_moId", "") or "an object"
        return errors.NotFound(f"{obj} does not exist (any more) on vCenter {host}")
    if isinstance(exc, (vim.fault.ToolsUnavailable, vim.fault.InvalidPowerState)):
        return GuestOperationUnavailable(scrub(f"vCenter {host}: {fault_text(exc)}", password))
    if isinstance(exc, (vim.fault.InvalidState, vim.fault.TaskInProgress, vim.fault.SnapshotFault)):
        return errors.FailedPrecondition(scrub(f"vCenter {host}: {fault_text(exc)}", password))
    if isinstance(exc, vim.fault.HostConnectFault):
        return errors.Unavailable(scrub(f"vCenter {host} is unreachable: {fault_text(exc)}", password))
    if isinstance(exc, vmodl.MethodFault):
        return VSphereFault(scrub(f"vCenter {host}: {fault_text(exc)}", password))
    if isinstance(exc, (OSError, http.client.HTTPException, ssl.SSLError)):
        hint = certificate_hint() if isinstance(exc, ssl.SSLCertVerificationError) else ""
        return errors.Unavailable(scrub(f"vCenter {host} is unreachable: {describe_os_error(exc)}{hint}", password))
    if isinstance(exc, ET.ParseError):
        return errors.Unavailable(f"vCenter {host} sent a malformed answer: {exc}")
    return None


def changed_areas_error(exc: BaseException, *, host: str, label: str, change_id: str) -> errors.AgentError:
    """What a fault answering QueryChangedDiskAreas for ``label`` means: CBT not active (FileFault),
    the change id rejected (InvalidArgument on changeId or unnamed) - both
    :class:`ChangeTrackingUnusable`, the caller copies the whole disk - or another invalid argument."""
    if isinstance(exc, vim.fault.FileFault):
        return ChangeTrackingNotActive(
            f"changed block tracking is not active for {label} on vCenter {host}: {fault_text(exc)}")
    if isinstance(exc, vmodl.fault.InvalidArgument):
        prop = getattr(exc, "invalidProperty", "") or ""
        if prop in ("", "changeId"):
            return InvalidChangeId(f"vCenter {host} rejected change id {change_id!r} for {label}")
        return errors.InvalidArgument(f"vCenter {host} rejected QueryChangedDiskAreas for {label}: invalid {prop}")
    return VSphereFault(f"vCenter {host}: QueryChangedDiskAreas for {label} failed: {fault_text(exc)}")
