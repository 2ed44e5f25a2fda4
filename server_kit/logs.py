"""Logging of both servers: text or JSON lines (``log_format``), with the ids of the current work attached.

Workflows bind ``job_id``/``context_id`` with :func:`bind`; every record logged inside carries them
(contextvars, so concurrent workers do not mix them up).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from typing import Iterator

_log_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("log_context", default=None)


@contextlib.contextmanager
def bind(**ids: str | None) -> Iterator[None]:
    """Attach ids (job_id=..., context_id=...) to every log record inside the block."""
    merged = {**(_log_context.get() or {}), **{k: v for k, v in ids.items() if v}}
    token = _log_context.set(merged)
    try:
        yield
    finally:
        _log_context.reset(token)


def current_ids() -> dict[str, str]:
    return dict(_log_context.get() or {})


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.ids = _log_context.get() or {}
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "ids", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = getattr(record, "ids", {})
        return text + ("  [" + " ".join(f"{k}={v}" for k, v in ids.items()) + "]" if ids else "")


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(
        _JsonFormatter() if fmt == "json" else _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.setLevel(level.upper())  # the console shows what was asked for; the job log may want more
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
