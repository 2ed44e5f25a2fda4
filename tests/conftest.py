"""Test-suite root.

Every module in tests/fixtures/ is a pytest plugin (fixtures over the real parts, which live in the ``omalab``
package). The tests are in three tiers, by what they need, and each test is marked with its tier:

* ``tests/unit/`` (``-m unit``): pure logic — rules, classification, planning, the repository's own
  consistency. No server, no database; the whole tier runs in seconds.
* ``tests/api/`` (``-m api``): one in-process OMA or VMA (and the CloudStack emulator where needed) on
  SQLite and MariaDB, driven through gRPC or omactl.
* ``tests/e2e/`` (``-m e2e``): the lab's real parts together — simulated vCenter, VMA data mover, nbdkit,
  sshd, the Go client, the demo.
"""
from pathlib import Path

import pytest

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}"
    for p in (Path(__file__).parent / "fixtures").glob("[a-z]*.py")
)

TIERS = ("unit", "api", "e2e")


def pytest_collection_modifyitems(items):
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
