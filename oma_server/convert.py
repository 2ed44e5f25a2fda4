"""Rows ↔ protobuf messages, once for every service.

Message fields are named after the database's columns, so one generic converter fills a message from a
row (a Peewee model, read by column name), a domain dataclass or a dict; callers pass ``overrides`` only for what differs
(renamed columns, nested messages, computed values).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import functools
import json
from typing import Any, Mapping, TypeVar

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from peewee import ForeignKeyField

M = TypeVar("M", bound=Message)

_TIMESTAMP = timestamp_pb2.Timestamp.DESCRIPTOR.full_name


def row_values(row: Any) -> dict[str, Any]:
    """Raw values of a Peewee model instance under the column name and the attribute name
    (foreign keys only as ``<x>_id``, read without a query); a dict or a dataclass (a domain result)
    by its keys or field names."""
    if isinstance(row, Mapping):
        return dict(row)
    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        return {f.name: getattr(row, f.name) for f in dataclasses.fields(row)}
    data = row.__data__
    values = {}
    for name, column_name, is_relation in _model_columns(type(row)):
        values[column_name] = value = data.get(name)
        if not is_relation:  # a relation's name is not its id ("schedule" vs "schedule_id")
            values[name] = value
    return values


@functools.cache
def _model_columns(model: type) -> tuple[tuple[str, str, bool], ...]:
    """(attribute, column, is a foreign key) per field of a model class, worked out once per class."""
    return tuple((f.name, f.column_name, isinstance(f, ForeignKeyField)) for f in model._meta.sorted_fields)


def timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None:  # the database stores naive UTC
        value = value.replace(tzinfo=dt.timezone.utc)
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def to_datetime(ts: timestamp_pb2.Timestamp) -> dt.datetime:
    """Protobuf Timestamp → naive UTC datetime (the database convention)."""
    return ts.ToDatetime()


def _scalar(fd: FieldDescriptor, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_STRING:
        if isinstance(value, (dict, list)):
            return json.dumps(value, sort_keys=True)
        if isinstance(value, dt.datetime):
            return value.isoformat()
        return str(value)
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return bool(value)
    if fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return float(value)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return value if isinstance(value, int) else fd.enum_type.values_by_name[value].number
    if isinstance(value, decimal.Decimal):
        return int(value)
    return int(value)


def fill(message: M, source: Any = None, /, **overrides: Any) -> M:
    """Set every field of ``message`` that ``source`` (row or dict) or ``overrides`` provides.

    None values are skipped (field stays unset/default). Timestamps accept datetimes; string fields
    accept dicts/lists (JSON-encoded); repeated message fields accept lists of messages.
    """
    values = row_values(source) if source is not None else {}
    values.update(overrides)
    for name, fd, kind in _message_fields(message.DESCRIPTOR):
        value = values.get(name)
        if value is None:
            continue
        if kind == _MESSAGE:
            getattr(message, name).CopyFrom(value)
        elif kind == _TIMESTAMP_FIELD:
            if isinstance(value, dt.datetime):
                getattr(message, name).CopyFrom(timestamp(value))
            else:
                getattr(message, name).CopyFrom(value)
        elif kind == _REPEATED_MESSAGE:
            getattr(message, name).extend(value)
        elif kind == _REPEATED_SCALAR:
            getattr(message, name).extend(_scalar(fd, v) for v in value)
        else:
            setattr(message, name, _scalar(fd, value))
    return message


_SCALAR, _MESSAGE, _TIMESTAMP_FIELD, _REPEATED_MESSAGE, _REPEATED_SCALAR = range(5)


@functools.cache
def _message_fields(descriptor: Any) -> tuple[tuple[str, FieldDescriptor, int], ...]:
    """(name, descriptor, kind) per field of a message type, worked out once per type: walking the descriptor
    and classifying every field again on each call cost a fifth of ListCredentials (cProfile)."""
    fields = []
    for fd in descriptor.fields:
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if fd.is_repeated:
                kind = _REPEATED_MESSAGE
            else:
                kind = _TIMESTAMP_FIELD if fd.message_type.full_name == _TIMESTAMP else _MESSAGE
        else:
            kind = _REPEATED_SCALAR if fd.is_repeated else _SCALAR
        fields.append((fd.name, fd, kind))
    return tuple(fields)


def optional(message: Message, field_name: str, default: Any = None) -> Any:
    """An ``optional`` field's value when the caller sent it, else ``default`` (a Timestamp as a naive
    UTC datetime)."""
    if not message.HasField(field_name):
        return default
    value = getattr(message, field_name)
    if isinstance(value, timestamp_pb2.Timestamp):
        return to_datetime(value)
    return value


def optional_fields(message: Message, *names: str) -> dict[str, Any]:
    """The subset of ``names`` the caller actually sent (for partial updates)."""
    return {n: getattr(message, n) for n in names if message.HasField(n)}


def struct(value: Any, *, keep_empty: bool = False) -> struct_pb2.Struct | None:
    """A JSON-like value as a google.protobuf.Struct, for a details/metadata field.

    A mapping gives its keys (values JSON-normalised: datetimes and other objects as text); any other
    value is wrapped as ``{"details": value}``. None, and an empty mapping unless ``keep_empty``, give
    None: the field stays unset (``keep_empty``: an empty mapping is sent as an empty Struct).
    """
    if value is None:
        return None
    data = value if isinstance(value, Mapping) else {"details": value}
    if not data and not keep_empty:
        return None
    message = struct_pb2.Struct()
    message.update(json.loads(json.dumps(data, default=str)))
    return message


def struct_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    """A google.protobuf.Struct from a request as a plain dict."""
    return json_format.MessageToDict(message)
