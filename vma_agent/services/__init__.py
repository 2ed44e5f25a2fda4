"""Thin gRPC servicers of the agent: validate, call the domain module, convert."""
from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A datetime (aware, or naive UTC) as a protobuf Timestamp; None stays unset."""
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts
