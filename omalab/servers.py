"""The OMA server and the VMA agent running for real in this process, on free ports, for the lab and the tests.

``start_oma``/``start_vma`` build the servers from their ``config.Settings`` with the lab's defaults
(an admin password and a VMA token that only the lab uses) and stop them on exit.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from oma_server.config import Settings
from oma_server.server import RunningServer, build_server
from vma_agent.config import Settings as AgentSettings
from vma_agent.server import RunningAgent
from vma_agent.server import build_server as build_agent

ADMIN_PASSWORD = "test-admin-password"
VMA_TOKEN = "test-vma-token"


@contextlib.contextmanager
def start_vma(**overrides: Any) -> Iterator[RunningAgent]:
    settings = AgentSettings(**{"listen": "127.0.0.1:0", "auth_token": VMA_TOKEN, **overrides})
    running = build_agent(settings)
    try:
        yield running
    finally:
        running.stop(grace=None)


@contextlib.contextmanager
def start_oma(data_dir: Path, existing_database: Any = None, **overrides: Any) -> Iterator[RunningServer]:
    values = {
        "listen": "127.0.0.1:0", "data_dir": data_dir, "admin_password": ADMIN_PASSWORD,
        "vma_token": VMA_TOKEN, "cloudstack_poll_interval_seconds": 0.1, **overrides,
    }
    running = build_server(Settings(**values), existing_database)
    try:
        yield running
    finally:
        running.stop(grace=None)
