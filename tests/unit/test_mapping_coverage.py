"""docs/MAPPING_COVERAGE.md accounts for every bullet of the user's mapping (docs/API_DB_MAPPING.txt):
each bullet is listed once with its status, proven bullets name tests, and every named test exists."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bullets() -> set[int]:
    lines = (ROOT / "docs/API_DB_MAPPING.txt").read_text().splitlines()
    return {number for number, line in enumerate(lines, 1) if line.startswith("- ")}


def _coverage() -> dict[int, tuple[str, list[str]]]:
    rows = {}
    for line in (ROOT / "docs/MAPPING_COVERAGE.md").read_text().splitlines():
        match = re.fullmatch(r"\| (\d+) \| (proven|contract) \| (.+) \|", line)
        if match:
            number = int(match.group(1))
            assert number not in rows, f"line {number} listed twice"
            rows[number] = (match.group(2), [t.strip() for t in match.group(3).split(",")])
    return rows


def test_every_bullet_is_accounted_for_once():
    assert set(_coverage()) == _bullets()


def test_every_named_test_exists():
    for number, (_, tests) in _coverage().items():
        assert tests, f"line {number} names no test"
        for ref in tests:
            path, _, name = ref.partition("::")
            source = (ROOT / path).read_text()
            assert not name or re.search(rf"^def {re.escape(name)}\(", source, re.M), f"line {number}: {ref} not found"


def test_most_of_the_mapping_is_built():
    statuses = [status for status, _ in _coverage().values()]
    assert statuses.count("proven") >= 33
