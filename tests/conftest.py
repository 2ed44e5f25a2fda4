"""Test-suite root: every module in tests/fixtures/ is a pytest plugin (fixtures for the real parts)."""
from pathlib import Path

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}"
    for p in (Path(__file__).parent / "fixtures").glob("[a-z]*.py")
)
