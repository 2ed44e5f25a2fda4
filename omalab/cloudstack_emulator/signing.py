"""Request signing exactly as CloudStack's ``ApiServer.verifyRequest`` checks it.

CloudStack (server/src/main/java/com/cloud/api/ApiServer.java) builds the string to sign from the
*decoded* request parameters:

* every parameter except ``signature`` (matched case-insensitively), names sorted with Java's
  ``String.compareTo`` (UTF-16 code units, case-sensitive),
* ``name=value`` pairs joined with ``&``, the name as sent and the value encoded with
  ``java.net.URLEncoder.encode(value, "UTF-8").replaceAll("\\+", "%20")``,
* the whole string lower-cased, HMAC-SHA1 with the user's secret key, Base64.

``URLEncoder`` keeps only ``A-Z a-z 0-9 . - * _`` literal; everything else (including ``~``) is
percent-encoded.  The ``cs`` client encodes with ``urllib.parse.quote(s, safe="*")``, which leaves
``~`` literal, so a value containing ``~`` signed by ``cs`` is refused by a real CloudStack -- and by
this emulator.

``signatureVersion=3`` requests must carry ``expires``; an unparsable or past ``expires`` refuses the
request (DateUtil.parseTZDateString accepts ISO-8601 offsets such as ``+0000``, ``+00:00`` and ``Z``).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

__all__ = [
    "compute_signature",
    "format_expires",
    "java_sort_key",
    "java_urlencode",
    "parse_expires",
    "sign_params",
    "string_to_sign",
]

_JAVA_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-*_")


def java_urlencode(value: str) -> str:
    """``URLEncoder.encode(value, "UTF-8").replaceAll("\\+", "%20")``."""
    out = []
    for byte in value.encode("utf-8", "surrogatepass"):
        if byte in _JAVA_SAFE:
            out.append(chr(byte))
        elif byte == 0x20:
            out.append("%20")
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def java_sort_key(name: str) -> bytes:
    # Java compares strings by UTF-16 code units; big-endian UTF-16 bytes sort the same way.
    return name.encode("utf-16-be", "surrogatepass")


def string_to_sign(params: Mapping[str, str]) -> str:
    """The lower-cased canonical query string CloudStack computes the HMAC over."""
    names = sorted((n for n in params if n.lower() != "signature"), key=java_sort_key)
    return "&".join(f"{name}={java_urlencode(params[name])}" for name in names).lower()


def compute_signature(params: Mapping[str, str], secret_key: str) -> str:
    digest = hmac.new(
        secret_key.encode("utf-8"), string_to_sign(params).encode("utf-8"), hashlib.sha1
    ).digest()
    return base64.b64encode(digest).decode("ascii")


def format_expires(when: datetime) -> str:
    """The ``expires`` format the cs client sends (``%Y-%m-%dT%H:%M:%S%z``)."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S%z")


def sign_params(
    params: Mapping[str, str],
    api_key: str,
    secret_key: str,
    *,
    expires_in: timedelta | None = timedelta(minutes=10),
) -> dict[str, str]:
    """Return a copy of ``params`` with apiKey (+ signatureVersion 3/expires) and signature.

    For raw HTTP tests that must control every byte; the ``cs`` client does the same itself.
    """
    signed = dict(params)
    signed["apiKey"] = api_key
    if expires_in is not None and "expires" not in signed:
        signed["signatureVersion"] = "3"
        signed["expires"] = format_expires(datetime.now(UTC) + expires_in)
    signed.pop("signature", None)
    signed["signature"] = compute_signature(signed, secret_key)
    return signed


_EXPIRES_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(Z)?([+-]\d{2}:?\d{2})?$"
)


def parse_expires(value: str) -> datetime | None:
    """Parse an ``expires`` value; None when CloudStack could not parse it either."""
    m = _EXPIRES_RE.match(value.strip())
    if not m:
        return None
    year, month, day, hour, minute, second, frac, zulu, tz = m.groups()
    if tz is None:
        if not zulu:
            return None  # CloudStack needs an offset (or Z)
        offset = timedelta(0)
    else:
        sign = -1 if tz[0] == "-" else 1
        digits = tz[1:].replace(":", "")
        offset = sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    try:
        micro = int((frac or "0").ljust(6, "0")[:6])
        local = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micro)
    except ValueError:
        return None
    return (local - offset).replace(tzinfo=UTC)
