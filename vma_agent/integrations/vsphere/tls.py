"""TLS towards vCenter: thumbprint pinning, a CA bundle, explicitly insecure, or the system CAs.

A pinned thumbprint is checked inside the handshake (:class:`PinnedTLSContext`), so a server with
another certificate never receives a request - nor the password.
"""
from __future__ import annotations

import hmac
import socket
import ssl
from typing import TYPE_CHECKING

from vma_agent import errors
from vma_agent.integrations.vsphere.faults import CertificateMismatch, describe_os_error
from vma_agent.integrations.vsphere.types import Fingerprints

if TYPE_CHECKING:
    from vma_agent.integrations.vsphere.types import VCenterParams


class PinnedTLSContext(ssl.SSLContext):
    """Client context that records the server certificate and, when pinned, refuses a server
    whose certificate fingerprint differs (checked right after every handshake)."""

    pin: str = ""
    host_label: str = ""
    peer_der: bytes | None = None

    def wrap_socket(self, sock, *args, **kwargs):  # type: ignore[override]
        ssock = super().wrap_socket(sock, *args, **kwargs)
        der = ssock.getpeercert(binary_form=True)
        if der:
            self.peer_der = der
        if self.pin:
            fp = Fingerprints.of(der or b"")
            actual = (fp.sha1 if len(self.pin) == 40 else fp.sha256).replace(":", "").lower()
            if not der or not hmac.compare_digest(actual, self.pin):
                ssock.close()
                raise CertificateMismatch(self.host_label, self.pin, fp)
        return ssock


def tls_context(params: VCenterParams) -> PinnedTLSContext:
    mode, detail = params.tls_mode()
    ctx = PinnedTLSContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.host_label = params.label
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode in ("thumbprint", "insecure"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.pin = detail if mode == "thumbprint" else ""
    elif mode == "ca_pem":
        try:
            ctx.load_verify_locations(cadata=params.ca_pem)
        except (ssl.SSLError, ValueError) as exc:
            raise errors.InvalidArgument(f"connection.ca_pem is not a usable PEM CA bundle: {exc}") from None
    else:
        ctx.load_default_certs()
    return ctx


def probe_certificate(host: str, port: int = 443, timeout: float = 10.0) -> Fingerprints:
    """Fingerprints of the certificate a server presents (no verification: for showing/pinning)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    label = host if port == 443 else f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                der = s.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise errors.Unavailable(f"vCenter {label} is unreachable: {describe_os_error(exc)}") from None
    if not der:
        raise errors.Unavailable(f"vCenter {label} presented no certificate")
    return Fingerprints.of(der)
