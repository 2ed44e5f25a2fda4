"""The contract covers the user's API-to-database mapping: every REST route it names (expanded in
tests/data/mapping_routes.txt from docs/API_DB_MAPPING.txt) has an RPC carrying that route in its
``migration.v1.route`` option, on the right side (OMA or VMA); buf lint passes; generated code is
current."""
from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
from pathlib import Path

import oma.v1
import vma.v1
from migration.v1 import options_pb2

ROOT = Path(__file__).resolve().parents[2]


def _normalise(route: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", route.strip())


def _routes_in_contract() -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for side, package in (("oma", oma.v1), ("vma", vma.v1)):
        for m in pkgutil.iter_modules(package.__path__):
            if not m.name.endswith("_pb2") or m.name.endswith("_grpc"):
                continue
            module = importlib.import_module(f"{package.__name__}.{m.name}")
            for service in module.DESCRIPTOR.services_by_name.values():
                for method in service.methods:
                    for route in method.GetOptions().Extensions[options_pb2.route]:
                        found.setdefault((side, _normalise(route)), []).append(method.full_name)
    return found


def _mapping_routes() -> list[tuple[str, str]]:
    wanted = []
    for line in (ROOT / "tests/data/mapping_routes.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        family, route = (part.strip() for part in line.split("|"))
        wanted.append((family.split(".")[0], _normalise(route)))
    return wanted


def test_every_mapping_route_has_an_rpc():
    contract = _routes_in_contract()
    missing = [f"{side} {route}" for side, route in _mapping_routes() if (side, route) not in contract]
    assert not missing, f"routes of the mapping without an RPC: {missing}"
    assert len(_mapping_routes()) == 90


def test_routes_name_real_methods_and_paths():
    for (_side, route), methods in _routes_in_contract().items():
        verb, _, path = route.partition(" ")
        assert verb in {"GET", "POST", "PUT", "DELETE", "PATCH"}, (route, methods)
        assert path.startswith("/"), (route, methods)


def test_buf_lint_passes():
    result = subprocess.run(
        [str(ROOT / "node_modules/.bin/buf"), "lint"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_is_current():
    result = subprocess.run(
        [str(ROOT / "scripts/generate"), "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
