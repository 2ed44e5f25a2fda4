"""The OMA's logging: the server kit's (:mod:`server_kit.logs`), under the names the OMA's modules import."""
from __future__ import annotations

from server_kit.logs import bind, configure_logging, current_ids

__all__ = ["bind", "configure_logging", "current_ids"]
