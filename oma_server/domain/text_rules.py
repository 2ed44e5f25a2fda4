"""What text the OMA accepts from a caller, and how it quotes a caller's text back.

One home for the rules every write path applies (see docs/security/input-validation.md):

* names and other single-line text: printable characters only — no control characters (NUL, CR/LF,
  ESC …), no invisible format characters (bidi overrides such as U+202E, zero-width characters),
  no line/paragraph separators — and at most as many characters as the column that stores them
  (read from the Peewee field's ``max_length``, so the limit cannot drift from the schema);
* free text (descriptions, notes, reasons): the same, except that line feeds and tabs are allowed;
* identifiers: the same as names, bounded before any lookup, so a huge id is refused cheaply;
* hosts, ``host[:port]`` and http(s) URLs: parsed completely on input (every DNS label 1–63
  characters, the whole name at most 253, ports 1–65535, no user info), so a connection library
  never meets an address it cannot parse;
* :func:`quote`: how an error message shows a caller's value — escaped and at most
  ``QUOTE_LIMIT`` characters, so an error can never carry a megabyte or a terminal escape back.

Hand-written on purpose: the character classes come from the standard library's ``unicodedata``
and host/URL parsing from ``urllib.parse``, ``ipaddress`` and the ``idna`` codec; what is left is
the policy itself, which no library states for us.
"""
from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import Any
from urllib.parse import urlsplit

from peewee import TextField

from oma_server.errors import InvalidArgument

QUOTE_LIMIT = 100
# An id no column of the schema could hold (the widest id column is 255 characters).
ID_MAX_CHARS = 255
# Unicode categories refused everywhere: control, format (bidi overrides, zero-width …), surrogate,
# private use, unassigned, line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_FREE_TEXT_ALLOWED = frozenset("\n\t")
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_HOST_MAX_CHARS = 253
# URLs are stored in text columns; no CloudStack API URL comes near this.
URL_MAX_CHARS = 2048


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``value`` for an error message as ``{value!r}`` would show it — escaped like a Python literal —
    but cut to ``limit`` characters."""
    if not isinstance(value, str):
        shown = repr(value)
        return shown if len(shown) <= limit else f"{shown[:limit]}…"
    if len(value) <= limit:
        return repr(value)
    return f"{str(value)[:limit]!r}… ({len(value)} characters)"


# A TEXT column holds 65,535 bytes on MariaDB; at up to 4 bytes a character (utf8mb4) this many
# characters always fit. LONGTEXT columns (URLs, encrypted secrets) get explicit limits instead.
TEXT_COLUMN_MAX_CHARS = 65535 // 4


def column_limit(column: Any) -> int:
    """The number of characters a column holds: a CharField's ``max_length``, a TEXT column's
    TEXT_COLUMN_MAX_CHARS."""
    limit = getattr(column, "max_length", None)
    if limit:
        return int(limit)
    if isinstance(column, TextField) and column.field_type == "TEXT":
        return TEXT_COLUMN_MAX_CHARS
    raise TypeError(f"{column!r} has no character limit")


def _label(column: Any, label: str | None) -> str:
    return label or getattr(column, "name", None) or "value"


def refused_character(value: str, *, free_text: bool = False) -> str | None:
    """The first character of ``value`` the rules refuse, or None."""
    for char in value:
        if free_text and char in _FREE_TEXT_ALLOWED:
            continue
        if unicodedata.category(char) in _REFUSED_CATEGORIES:
            return char
    return None


def check(value: str, label: str, *, max_chars: int, free_text: bool = False) -> str:
    """Refuse ``value`` (InvalidArgument) if it is too long or holds a refused character."""
    if len(value) > max_chars:
        raise InvalidArgument(f"{label} is {len(value)} characters long; at most {max_chars} are allowed")
    bad = refused_character(value, free_text=free_text)
    if bad is not None:
        allowed = "printable characters, line feeds and tabs" if free_text else "printable characters"
        raise InvalidArgument(
            f"{label} contains the control or invisible character U+{ord(bad):04X}; only {allowed} are allowed"
        )
    return value


def name(value: str, column: Any, label: str | None = None) -> str:
    """A single-line name for ``column``, stripped of surrounding spaces (may be empty: callers
    decide whether the field is required)."""
    return check((value or "").strip(), _label(column, label), max_chars=column_limit(column))


def free_text(value: str, column: Any = None, label: str | None = None, *, max_chars: int | None = None) -> str:
    """Free text (descriptions, notes, reasons) for ``column`` (or of at most ``max_chars``)."""
    limit = max_chars if max_chars is not None else column_limit(column)
    return check((value or "").strip(), _label(column, label), max_chars=limit, free_text=True)


def identifier(value: str, label: str, max_chars: int = ID_MAX_CHARS) -> str:
    """An id as sent (not stripped): bounded and printable, checked before any lookup."""
    return check(value or "", label, max_chars=max_chars)


def fit(model: Any, values: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Check every string in ``values`` (column name → value about to be written to ``model``)
    against its column: length and characters. Returns ``values`` unchanged."""
    fields = model._meta.fields
    for key, value in values.items():
        column = fields.get(key)
        if isinstance(value, str) and column is not None:
            try:
                limit = column_limit(column)
            except TypeError:
                continue  # a column without a character limit of its own (LONGTEXT)
            check(value, (labels or {}).get(key, key), max_chars=limit, free_text=isinstance(column, TextField))
    return values


# --- addresses -------------------------------------------------------------------------------------
def host(value: str, label: str) -> str:
    """A DNS name or an IP address literal (IPv6 with or without brackets)."""
    value = (value or "").strip()
    if not value:
        raise InvalidArgument(f"{label} is required")
    check(value, label, max_chars=_HOST_MAX_CHARS + 2)
    literal = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        ipaddress.ip_address(literal)
        return value
    except ValueError:
        pass
    name_part = value[:-1] if value.endswith(".") else value
    try:
        ascii_name = name_part.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_name = ""  # a label longer than 63 characters, an empty label, or not encodable
    labels = ascii_name.split(".")
    if not ascii_name or len(ascii_name) > _HOST_MAX_CHARS or not all(_HOST_LABEL.match(p) for p in labels):
        raise InvalidArgument(
            f"{label} {quote(value)} is not a valid host name or IP address (each dot-separated label "
            "1-63 letters, digits or hyphens, at most 253 characters in all)"
        )
    return value


def _port(text: str, label: str, value: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise InvalidArgument(f"{label} {quote(value)} has an invalid port (1-65535)")
    return int(text)


def host_port(value: str, label: str) -> str:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` (a bare IPv6 address is accepted too)."""
    value = (value or "").strip()
    if not value:
        raise InvalidArgument(f"{label} is required")
    check(value, label, max_chars=_HOST_MAX_CHARS + 8)
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise InvalidArgument(f"{label} {quote(value)} has an unclosed '['")
        rest = value[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise InvalidArgument(f"{label} {quote(value)} must be [address]:port")
            _port(rest[1:], label, value)
        host(value[:end + 1], label)
        return value
    if value.count(":") > 1:  # a bare IPv6 address
        host(value, label)
        return value
    name_part, sep, port = value.partition(":")
    if sep:
        _port(port, label, value)
    host(name_part, label)
    return value


def http_url(value: str, label: str, max_chars: int = URL_MAX_CHARS) -> str:
    """An absolute http(s) URL with a valid host and port and no user name or password in it."""
    value = (value or "").strip()
    if not value:
        raise InvalidArgument(f"{label} is required")
    # urlsplit silently drops tabs and line breaks; refuse them (and every other control) first.
    check(value, label, max_chars=max_chars)
    if any(c.isspace() for c in value):
        raise InvalidArgument(f"{label} {quote(value)} contains spaces")
    try:
        parts = urlsplit(value)
        port = parts.port  # parses and range-checks the port
    except ValueError:
        raise InvalidArgument(f"{label} {quote(value)} is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidArgument(f"{label} must start with http:// or https://")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument(f"{label} must not contain a user name or password")
    if not parts.hostname:
        raise InvalidArgument(f"{label} {quote(value)} has no host")
    if port == 0 or parts.netloc.endswith(":"):
        raise InvalidArgument(f"{label} {quote(value)} has an invalid port (1-65535)")
    host(parts.hostname, label)
    return value
