"""The grammar of every value the agent accepts from outside: from the OMA's enrollment answers (they end
up in the tunnel's ssh configuration, in ssh-keyscan's argument list and in file names) and from callers
of the agent's RPCs (job ids, disk ids, free text).

Hand-written on purpose: each rule is one regular expression or one call to the standard library's
``ipaddress``, and the point is that the rules are *narrower* than what OpenSSH or the OMA would
accept — no general-purpose validation library encodes "an ssh_config value that cannot start a new
directive". A value that does not match is refused whole (never cleaned up and used): the caller gets
:class:`Invalid`, an INVALID_ARGUMENT that names the field and quotes at most :data:`QUOTE_LIMIT`
characters of what was sent.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import re
from dataclasses import dataclass

from vma_agent import errors

#: How much of a refused value an error message quotes (a 1 MB value must not become a 1 MB message).
QUOTE_LIMIT = 100

#: POSIX-portable account names as useradd accepts them by default (Debian's NAME_REGEX), 32 at most.
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
#: One DNS label: letters, digits, hyphens and (common in private networks) underscores; never starting
#: with a hyphen, so a host name can never be read as a command-line option.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
#: OpenSSH's ``SHA256:`` fingerprint: the unpadded base64 of a 32-byte digest (43 characters).
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
#: Ids the OMA and the agent exchange (enrollment ids are UUIDs, job ids ``job-20261207-231500.123-ab12cd``,
#: disk ids ``disk-2000``): safe as a file name component, a vCenter snapshot name and a log field.
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
#: One authorized_keys option: a name, or ``name="value"`` where the value has no quote, backslash or
#: control character (OpenSSH would allow escaped quotes; nothing the OMA sends needs them).
_OPTION = re.compile(r'(?P<name>[A-Za-z0-9-]+)(?:="(?P<value>[^"\\\x00-\x1f\x7f]*)")?')
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

HOST_MAX, IDENTIFIER_MAX = 253, 128
SSH_OPTIONS_MAX, SSH_OPTIONS_ENTRIES_MAX, SSH_OPTION_VALUE_MAX = 65_536, 4_096, 1_024
CHALLENGE_BYTES_MIN, CHALLENGE_BYTES_MAX = 16, 64
MESSAGE_MAX = 1_000

# The authorized_keys options OpenSSH knows (sshd(8), AUTHORIZED_KEYS FILE FORMAT); anything else in the
# OMA's answer is refused rather than passed on.
_FLAG_OPTIONS = frozenset({
    "agent-forwarding", "cert-authority", "no-agent-forwarding", "no-port-forwarding", "no-pty", "no-user-rc",
    "no-x11-forwarding", "no-touch-required", "port-forwarding", "pty", "restrict", "user-rc", "verify-required",
    "x11-forwarding"})
_VALUE_OPTIONS = frozenset({
    "command", "environment", "expiry-time", "from", "permitlisten", "permitopen", "principals", "tunnel"})


class Invalid(errors.InvalidArgument):
    """A value that does not match its grammar; ``field`` names it."""

    def __init__(self, field: str, value: object, rule: str):
        super().__init__(f"{field} {quote(value)} is not valid: {rule}")
        self.field = field


def quote(value: object) -> str:
    """``value`` for an error message: its repr, cut to :data:`QUOTE_LIMIT` characters (saying how long it was)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return repr(value)
    if len(value) <= QUOTE_LIMIT:
        return repr(value)
    return f"{value[:QUOTE_LIMIT]!r}… ({len(value)} characters)"


def text(field: str, value: str, max_length: int, *, single_line: bool = True) -> str:
    """A free-text value: at most ``max_length`` characters and, when ``single_line``, no control characters
    (a line break in a value is how a log line or a configuration line is forged)."""
    if len(value) > max_length:
        raise Invalid(field, value, f"at most {max_length} characters (got {len(value)})")
    if single_line and _CONTROL.search(value):
        raise Invalid(field, value, "control characters (line breaks, tabs, NUL) are not allowed")
    return value


def user_name(field: str, value: str) -> str:
    """A Unix account name: ``[a-z_][a-z0-9_-]{0,31}``."""
    if not _USER.fullmatch(value):
        raise Invalid(field, value, "must be a Unix user name: a lowercase letter or _, then up to 31 of "
                                    "a-z, 0-9, _ and -")
    return value


def port(field: str, value: int) -> int:
    """A TCP port, 1–65535."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise Invalid(field, value, "must be a TCP port 1-65535")
    return value


def host(field: str, value: str) -> str:
    """A host name (dot-separated DNS labels) or an IPv4/IPv6 address without a zone; nothing else — no
    spaces, no ``%`` (an ssh_config token), no leading ``-`` (an option to ssh-keyscan)."""
    if 0 < len(value) <= HOST_MAX:
        if ":" in value:
            try:
                address = ipaddress.IPv6Address(value)
            except ValueError:
                address = None
            if address is not None and address.scope_id is None:
                return value
        else:
            labels = value.split(".")
            with contextlib.suppress(ValueError):
                ipaddress.IPv4Address(value)
                return value
            # A name whose last label is all digits is a mistyped IPv4 address, not a host name.
            if all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit():
                return value
    raise Invalid(field, value, "must be a host name or an IP address")


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def host_port(field: str, value: str) -> HostPort:
    """``host:port`` or ``[ipv6]:port`` (the form of OpenSSH's permitopen/permitlisten and forwards)."""
    if value.startswith("["):
        address, bracket, rest = value[1:].partition("]")
        ok = bracket and rest.startswith(":") and ":" in address
        name, port_text = address, rest[1:]
    else:
        name, colon, port_text = value.rpartition(":")
        ok = bool(colon) and ":" not in name
    if not ok or not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise Invalid(field, value, "must be host:port (IPv6 as [address]:port) with a port number")
    try:
        return HostPort(host(field, name), port(field, int(port_text)))
    except Invalid:
        raise Invalid(field, value, "must be host:port with a valid host name or address and a port 1-65535") \
            from None


def fingerprint(field: str, value: str) -> str:
    """An OpenSSH SHA-256 key fingerprint, ``SHA256:`` and 43 base64 characters."""
    if not _FINGERPRINT.fullmatch(value):
        raise Invalid(field, value, "must be an OpenSSH fingerprint: SHA256: and 43 base64 characters")
    return value


def identifier(field: str, value: str, max_length: int = IDENTIFIER_MAX) -> str:
    """An id: a letter or digit, then letters, digits and ``. _ : @ -``; at most ``max_length`` characters.
    No slash, space or control character, so it is safe in a file name, a snapshot name and a log line."""
    if not value:
        raise Invalid(field, value, "is required")
    if len(value) > max_length:
        raise Invalid(field, value, f"at most {max_length} characters (got {len(value)})")
    if not _IDENTIFIER.fullmatch(value):
        raise Invalid(field, value, "may contain only letters, digits and . _ : @ - (starting with a letter "
                                    "or digit)")
    return value


def challenge(field: str, value: str) -> bytes:
    """The OMA's base64 challenge, decoded: 16–64 bytes (the OMA sends 32)."""
    try:
        raw = base64.b64decode(value, validate=True) if len(value) <= 4 * CHALLENGE_BYTES_MAX else b""
    except (binascii.Error, ValueError):
        raw = b""
    if not CHALLENGE_BYTES_MIN <= len(raw) <= CHALLENGE_BYTES_MAX:
        raise Invalid(field, value, f"must be base64 of {CHALLENGE_BYTES_MIN}-{CHALLENGE_BYTES_MAX} bytes")
    return raw


def oma_message(value: str) -> str:
    """A human message from the OMA, made safe to store, show and log: control characters become spaces and
    it is cut to :data:`MESSAGE_MAX` characters. (Messages are shown, never interpreted, so they are cleaned
    rather than refused.)"""
    cleaned = _CONTROL.sub(" ", value).strip()
    return cleaned if len(cleaned) <= MESSAGE_MAX else cleaned[:MESSAGE_MAX] + "…"


@dataclass(frozen=True)
class SshOptions:
    """The authorized_keys options the OMA installed with this agent's key, as far as the agent uses them."""

    permit_open: tuple[HostPort, ...]
    permit_listen: HostPort | None


def parse_ssh_options(field: str, value: str) -> SshOptions:
    """Parse the OMA's authorized_keys options (``restrict,port-forwarding,permitopen="h:p",…,permitlisten="h:p"``):
    known option names only, ``permitopen`` as host:port, at most one ``permitlisten`` as host:port or port."""
    if len(value) > SSH_OPTIONS_MAX:
        raise Invalid(field, value, f"at most {SSH_OPTIONS_MAX} characters (got {len(value)})")
    entries = value.split(",") if value else []
    if len(entries) > SSH_OPTIONS_ENTRIES_MAX:
        raise Invalid(field, value, f"at most {SSH_OPTIONS_ENTRIES_MAX} options (got {len(entries)})")
    opens: list[HostPort] = []
    listens: list[HostPort] = []
    for entry in entries:
        match = _OPTION.fullmatch(entry)
        if not match:
            raise Invalid(field, entry, 'each option must be a name or name="value" without quotes, backslashes '
                                        "or control characters inside")
        name, option_value = match.group("name").lower(), match.group("value")
        if option_value is None and name not in _FLAG_OPTIONS or option_value is not None and name not in \
                _VALUE_OPTIONS:
            raise Invalid(field, entry, "is not an OpenSSH authorized_keys option")
        if option_value is not None and len(option_value) > SSH_OPTION_VALUE_MAX:
            raise Invalid(field, entry, f"option values are at most {SSH_OPTION_VALUE_MAX} characters")
        if name == "permitopen":
            opens.append(host_port(f"{field} permitopen", option_value))
        elif name == "permitlisten":
            if option_value.isascii() and option_value.isdigit():  # a bare port: sshd's loopback
                if len(option_value) > 5:
                    raise Invalid(f"{field} permitlisten", option_value, "must be a TCP port 1-65535")
                listens.append(HostPort("127.0.0.1", port(f"{field} permitlisten", int(option_value))))
            else:
                listens.append(host_port(f"{field} permitlisten", option_value))
    if len(listens) > 1:
        raise Invalid(field, value, "names more than one permitlisten; the agent forwards exactly one port")
    return SshOptions(tuple(opens), listens[0] if listens else None)


@dataclass(frozen=True)
class TunnelParameters:
    """The OMA's approval, validated: everything the tunnel's files are written from."""

    ssh_user: str
    ssh_port: int
    host_key_hash: str
    reverse_tunnel_port: int
    options: SshOptions
    ssh_options: str

    @property
    def remote_forward(self) -> HostPort:
        """The OMA-side address of the reverse forward to this agent's API."""
        return self.options.permit_listen or HostPort("127.0.0.1", self.reverse_tunnel_port)


def tunnel_parameters(*, ssh_user: str, ssh_port: int, ssh_options: str, host_key_hash: str,
                      reverse_tunnel_port: int) -> TunnelParameters:
    """Every tunnel value of the OMA's approval checked against its grammar, and against each other (the
    reverse port the OMA names is the one its key options let this agent listen on)."""
    options = parse_ssh_options("ssh_options", ssh_options)
    parameters = TunnelParameters(
        ssh_user=user_name("ssh_user", ssh_user), ssh_port=port("ssh_port", ssh_port),
        host_key_hash=fingerprint("host_key_hash", host_key_hash),
        reverse_tunnel_port=port("reverse_tunnel_port", reverse_tunnel_port), options=options,
        ssh_options=ssh_options)
    if options.permit_listen is not None and options.permit_listen.port != parameters.reverse_tunnel_port:
        raise Invalid("ssh_options permitlisten", str(options.permit_listen),
                      f"must be the reverse_tunnel_port {parameters.reverse_tunnel_port} the OMA assigned")
    return parameters
