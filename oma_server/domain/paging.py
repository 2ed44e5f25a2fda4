"""Pagination of list RPCs: ``page_size`` + opaque ``page_token`` → items + ``next_page_token``.

Tokens are opaque to callers so the scheme can change without breaking them; page sizes are clamped to a
maximum. Two schemes:

* offset (``o:<n>``, :func:`paginate`): the page is ``OFFSET n LIMIT size`` and every page counts the matches —
  fine for short lists, but page *k* reads k pages' worth of rows, so reading a big table page by page is
  quadratic;
* keyset (``k:<json>``, :func:`paginate_keyset`): the token holds the sort key of the last row given out and the
  next page is ``WHERE key > last ORDER BY key LIMIT size`` — one index range read per page, whatever the page
  number. The total is counted once, on the first page, and carried in the token (a snapshot taken when the
  listing started), so later pages do not re-count the whole table. A keyset listing still accepts an offset
  token (a client that started paging before the upgrade finishes its listing). See
  docs/design/reads.md#keyset-paging.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Generic, Sequence, TypeVar

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


def _token_kind(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode().partition(":")[0]
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token is not a token this server issued") from None


def _decode_keyset(token: str, key_length: int) -> tuple[list[Any], int]:
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind != "k":
            raise ValueError
        last, total = json.loads(value)
        if not (isinstance(last, list) and len(last) == key_length and isinstance(total, int) and total >= 0):
            raise ValueError
        return last, total
    except (ValueError, UnicodeDecodeError, TypeError):
        raise InvalidArgument("page_token is not a token this server issued") from None


def _encode_keyset(last: list[Any], total: int) -> str:
    return base64.urlsafe_b64encode(f"k:{json.dumps([last, total], separators=(',', ':'))}".encode()).decode()


def _after(key: Sequence[Any], last: Sequence[Any]) -> Any:
    """``key > last`` for a composite key, written so the leading column bounds an index range on every backend
    (``k1 >= a AND (k1 > a OR (k2 > b ...))``): row-value comparisons are not range-optimised everywhere."""
    condition = key[-1] > last[-1]
    for field, value in zip(reversed(key[:-1]), reversed(last[:-1]), strict=True):
        condition = (field > value) | ((field == value) & condition)
    return (key[0] >= last[0]) & condition


def paginate_keyset(query: Any, key: Sequence[Any], page_size: int, page_token: str, *,
                    default: int = DEFAULT_PAGE_SIZE) -> Page:
    """One page of a filtered, unordered Peewee query, ordered by ``key`` (fields whose values together are unique
    and, for speed, the columns of one index in this order)."""
    if page_size < 0:
        raise InvalidArgument("page_size cannot be negative")
    size = min(page_size or default, MAX_PAGE_SIZE)
    if page_token and _token_kind(page_token) == "o":
        return paginate(query.order_by(*key), page_size, page_token, default=default)
    if page_token:
        last, total = _decode_keyset(page_token, len(key))
        query = query.where(_after(key, last))
    else:
        total = query.count()
    items = list(query.order_by(*key).limit(size + 1))  # one more than asked: is there a next page?
    if len(items) <= size:
        return Page(items, "", total)
    items = items[:size]
    return Page(items, _encode_keyset([getattr(items[-1], f.name) for f in key], total), total)
