"""The VMA agent's code stays easy to find one's way in: each integration's library is imported by
its own module only, and no module grows past what one reads in a sitting (docs/vma-agent-modules.md)."""
from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "vma_agent"
MAX_LINES = 700

#: library (top-level import name) -> the only place in vma_agent/ that may import it
OWNERS = {
    "pyVmomi": "integrations/vsphere/",
    "pyVim": "integrations/vsphere/",
    "nbd": "integrations/nbd_client.py",
}


def agent_modules() -> list[Path]:
    return sorted(AGENT.rglob("*.py"))


def imported_libraries(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_each_library_is_imported_by_its_integration_only():
    strays = []
    for path in agent_modules():
        rel = path.relative_to(AGENT).as_posix()
        for lib in imported_libraries(path) & OWNERS.keys():
            if not rel.startswith(OWNERS[lib]):
                strays.append(f"{rel} imports {lib} (only {OWNERS[lib]} may)")
    assert not strays
    assert "pyVmomi" in imported_libraries(AGENT / "integrations" / "vsphere" / "session.py")  # the scan sees imports


def test_no_agent_module_is_oversized():
    sizes = {path.relative_to(AGENT).as_posix(): len(path.read_text().splitlines()) for path in agent_modules()}
    assert len(sizes) > 20
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
