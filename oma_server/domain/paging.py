"""Pagination of list RPCs: ``page_size`` + opaque ``page_token`` → items + ``next_page_token``.

The token encodes the offset into the (stably ordered) query; it is opaque to callers so the scheme
can change without breaking them. Page sizes are clamped to a maximum.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from oma_server.errors import InvalidArgument

T = TypeVar("T")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass
class Page(Generic[T]):
    items: list[T]
    next_page_token: str
    total: int


def _decode(token: str) -> int:
    if not token:
        return 0
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        offset = int(value)
        if kind != "o" or offset < 0:
            raise ValueError
        return offset
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token is not a token this server issued") from None


def _encode(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


def paginate(query: Any, page_size: int, page_token: str, *, default: int = DEFAULT_PAGE_SIZE) -> Page:
    """One page of a Peewee query (which must have a deterministic ORDER BY)."""
    if page_size < 0:
        raise InvalidArgument("page_size cannot be negative")
    size = min(page_size or default, MAX_PAGE_SIZE)
    offset = _decode(page_token)
    total = query.count()
    items = list(query.offset(offset).limit(size))
    next_offset = offset + len(items)
    return Page(items, _encode(next_offset) if next_offset < total else "", total)


def paginate_list(items: list[T], page_size: int, page_token: str, *, default: int = DEFAULT_PAGE_SIZE) -> Page[T]:
    """The same for an in-memory list (e.g. results of a CloudStack call)."""
    if page_size < 0:
        raise InvalidArgument("page_size cannot be negative")
    size = min(page_size or default, MAX_PAGE_SIZE)
    offset = _decode(page_token)
    chunk = items[offset:offset + size]
    next_offset = offset + len(chunk)
    return Page(chunk, _encode(next_offset) if next_offset < len(items) else "", len(items))
