"""What one call to vCenter through the VMA needs: a plain value handed from the domain to
``vma_client`` (so that integration depends on no domain module; the domain builds it from a saved
credential or from a request)."""
from __future__ import annotations

from dataclasses import dataclass

_SHOWN_CHARS = 100  # like text_rules.quote: a repr never grows past what a log line can hold


@dataclass(frozen=True)
class VCenterLogin:
    """Decrypted connection details for one call to vCenter (never stored, never logged)."""

    credential_id: int | None
    host: str
    username: str
    password: str
    datacenter: str
    thumbprint: str = ""
    insecure: bool = False

    def __repr__(self) -> str:  # keep the password out of logs and tracebacks
        return (f"VCenterLogin(host={self.host[:_SHOWN_CHARS]!r}, username={self.username[:_SHOWN_CHARS]!r}, "
                f"datacenter={self.datacenter[:_SHOWN_CHARS]!r})")
