"""Settings from the environment, for both servers, and the loopback test of listen addresses.

Each server keeps its settings in one frozen dataclass (its ``config.py``); :func:`load` fills it from
defaults, then ``<PREFIX><NAME>`` environment variables, then explicit overrides (command-line flags).
Environment values are converted by the field's type, strictly: a value that is not exactly one of the
spellings below stops the start with :class:`ConfigError` naming the variable, because a typo read as a
default (``VMA_TUNNEL_ENABLED=ture`` silently meaning *off*) is worse than not starting.

- ``bool``: ``1``/``true``/``yes`` or ``0``/``false``/``no`` (any case, surrounding blanks ignored);
- ``int``: a whole number; ``float``: a finite number;
- ``Path``: a non-empty path (``~`` expanded);
- ``tuple[str, ...]``/``list[str]``: comma-separated items, blanks around them dropped;
- ``str``: as given.

Hand-written because it is a short loop over ``dataclasses.fields``; pydantic-settings would bring a
second model layer and its own (more lenient: ``on``, ``y``) boolean rules for the same result.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

T = TypeVar("T")

TRUE_WORDS = ("1", "true", "yes")
FALSE_WORDS = ("0", "false", "no")
# A bad value is quoted in the error, cut to this many characters (values are never secrets here: a
# str setting, the only kind that may hold one, is never refused).
_QUOTE_MAX = 100


@dataclass(frozen=True)
class ServingSettings:
    """The settings every server built with the kit has; a server's ``Settings`` extends it and gives
    ``listen`` its own default."""

    # gRPC listen address "host:port" ("[v6]:port", "unix:/path"); port 0 picks a free port.
    listen: str = "127.0.0.1:0"
    # Worker threads of the gRPC server: open streams each hold one, so size for the expected watchers
    # plus unary headroom; beyond max_concurrent_rpcs calls fail fast with RESOURCE_EXHAUSTED instead of
    # queueing into deadline errors.
    max_workers: int = 32
    max_concurrent_rpcs: int = 64
    # Prometheus metrics endpoint ("host:port"); empty = off.
    metrics_listen: str = ""
    # A level name of the logging module (DEBUG, INFO, WARNING, ERROR).
    log_level: str = "INFO"
    # "text" for people, "json" for log shippers.
    log_format: str = "text"

    def check_serving(self) -> None:
        """Refuse serving settings no server can run with (ConfigError naming the setting)."""
        if self.max_workers < 1 or self.max_concurrent_rpcs < 1:
            raise ConfigError("max_workers and max_concurrent_rpcs must be at least 1")
        if not isinstance(logging.getLevelName(self.log_level.upper()), int):
            raise ConfigError(f"log_level {self.log_level[:_QUOTE_MAX]!r} is not one of DEBUG, INFO, WARNING, ERROR")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format {self.log_format[:_QUOTE_MAX]!r} is neither 'text' nor 'json'")


class ConfigError(ValueError):
    """A setting a server refuses to start with; the message names it (the variable or the setting)."""


def convert(raw: str, kind: Any) -> Any:
    """``raw`` as a value of type ``kind``; ValueError (saying what was expected) when it is not one."""
    if kind is str:
        return raw
    value = raw.strip()
    if kind is bool:
        if value.lower() in TRUE_WORDS:
            return True
        if value.lower() in FALSE_WORDS:
            return False
        raise ValueError("not a boolean (use 1/0, true/false or yes/no)")
    if kind is int:
        try:
            return int(value)
        except ValueError:
            raise ValueError("not a whole number") from None
    if kind is float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError("not a number") from None
        if not math.isfinite(number):
            raise ValueError("not a finite number")
        return number
    if kind is Path:
        if not value:
            raise ValueError("an empty path")
        return Path(value).expanduser()
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (tuple, list) and args and args[0] is str:
        items = [item.strip() for item in raw.split(",") if item.strip()]
        return tuple(items) if origin is tuple else items
    raise TypeError(f"settings of type {kind!r} cannot be read from the environment")


def load(settings_class: type[T], prefix: str, overrides: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None, aliases: Mapping[str, str] | None = None) -> T:
    """Defaults of ``settings_class``, then ``<prefix><NAME>`` variables of ``environ`` (default: the
    process's), then the non-None ``overrides``. ``aliases`` maps a setting to another variable read
    when its own is not set (an older name). Raises :class:`ConfigError` naming a variable it cannot
    convert."""
    environ = os.environ if environ is None else environ
    types = typing.get_type_hints(settings_class)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(settings_class):  # type: ignore[arg-type]
        variable = prefix + f.name.upper()
        alias = (aliases or {}).get(f.name)
        if variable not in environ and alias is not None and alias in environ:
            variable = alias
        raw = environ.get(variable)
        if raw is None:
            continue
        try:
            values[f.name] = convert(raw, types[f.name])
        except ValueError as exc:
            shown = raw if len(raw) <= _QUOTE_MAX else raw[:_QUOTE_MAX] + "…"
            raise ConfigError(f"invalid {variable}={shown!r}: {exc}") from None
    for name, value in (overrides or {}).items():
        if value is not None:
            if types.get(name) is Path and not isinstance(value, Path):
                value = Path(value).expanduser()
            values[name] = value
    return settings_class(**values)


def listen_host(address: str) -> str:
    """The host part of a gRPC listen address (``host:port``, ``[v6]:port``, ``:port`` = every address);
    ``unix:`` addresses as they are."""
    if address.startswith("unix:"):
        return address
    host, sep, _port = address.rpartition(":")
    if not sep:
        host = address
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(address: str) -> bool:
    """Whether a listen address is reachable only from this host (loopback, ``localhost`` or a unix socket);
    every-address forms (``0.0.0.0``, ``[::]``, ``:port``) and host names are not."""
    return address.startswith(("unix:", "unix-abstract:")) or is_loopback_host(listen_host(address))


def is_loopback_host(host: str) -> bool:
    """Whether a host (no port) is ``localhost`` or a loopback address; names that may resolve anywhere are not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
