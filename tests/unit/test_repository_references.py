"""Every reference in the repository points at something the repository has.

Comments, docstrings, proto comments and docs cite files (``docs/design/failover.md#compensation``,
``omalab/vcsim/main.go``): each cited path must exist and each cited section must be a heading of that
Markdown file. Nothing may cite the specification documents the code was first written from ("spec §2.4"):
the decisions they held are in ``docs/design/``. And the test tree stays a tree: no test module imports
another test module, and nothing outside ``tests/`` imports from it (the lab is the ``omalab`` package).
"""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SKIPPED_DIRS = {".git", ".venv", "node_modules", ".gocache", ".gopath", "__pycache__", ".pytest_cache"}
TEXT_SUFFIXES = {".py", ".pyi", ".proto", ".go", ".md", ".cfg", ".toml", ".txt", ".yaml", ".yml", ".sh", ""}
TOP_LEVEL = ("oma_server", "vma_agent", "omalab", "tests", "scripts", "proto", "clients", "bench", "docs",
             "requirements", ".ci")
# A repository path as prose cites it: a top-level folder, then path characters, ending on a name character.
CITED_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*[\w])(#[\w-]+)?" % "|".join(re.escape(t) for t in TOP_LEVEL))
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
SPEC_CITATION = re.compile(r"§|\bspec(?:ification)?\s+(?:\d+\.\d+|failover-scheduler|replication-discovery)"
                           r"|\b(?:failover|replication/discovery|replication-discovery) spec\b", re.IGNORECASE)


def text_files() -> list[Path]:
    """The repository's own files: what git tracks or would track (build output, egg-info and other ignored
    files are not the repository's text, and a fresh clone does not have them)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    found = []
    for name in filter(None, listed):
        path = REPO / name
        if (path.suffix in TEXT_SUFFIXES and not SKIPPED_DIRS.intersection(path.parts) and path.is_file()
                and path.stat().st_size < 2_000_000):
            found.append(path)
    return found


def read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (UnicodeDecodeError, OSError):
        return None


def heading_anchors(markdown: Path) -> set[str]:
    """The anchors a Markdown renderer gives the file's headings (lower case, punctuation dropped, spaces → -)."""
    anchors = set()
    for line in markdown.read_text().splitlines():
        if match := re.match(r"#{1,6}\s+(.*)", line):
            title = re.sub(r"[^\w\s-]", "", match.group(1).strip().lower())
            anchors.add(re.sub(r"\s", "-", title))
    return anchors


def broken_reference(target: Path, anchor: str) -> str | None:
    """Why ``target#anchor`` does not resolve, or None when it does."""
    if not target.exists():
        return "no such file"
    if anchor and target.suffix == ".md" and anchor not in heading_anchors(target):
        return f"no section #{anchor}"
    return None


def cited_path_problems(text: str) -> list[str]:
    problems = []
    for match in CITED_PATH.finditer(text):
        path, anchor = match.group(1).rstrip("."), (match.group(2) or "").lstrip("#")
        if why := broken_reference(REPO / path, anchor):
            problems.append(f"{path}{'#' + anchor if anchor else ''}: {why}")
    return problems


def test_the_checks_find_a_broken_path_a_missing_section_and_a_spec_citation():
    text = ("see docs/design/failover.md#compensation and omalab/vcsim/main.go; "
            "but docs/design/nowhere.md and docs/design/failover.md#no-such-section (spec §2.4)")
    assert cited_path_problems(text) == ["docs/design/nowhere.md: no such file",
                                         "docs/design/failover.md#no-such-section: no section #no-such-section"]
    assert SPEC_CITATION.search(text) and SPEC_CITATION.search("see spec 12.1") and not SPEC_CITATION.search(
        "ConfigSpec(spec) and the spec=... argument")


def test_every_cited_repository_path_and_section_exists():
    problems = []
    for path in text_files():
        text = read(path)
        if text is None or path == Path(__file__):  # its own examples are broken on purpose
            continue
        for problem in cited_path_problems(text):
            problems.append(f"{path.relative_to(REPO)}: {problem}")
    assert problems == []


def test_markdown_links_between_docs_resolve():
    problems = []
    for path in [*REPO.glob("docs/**/*.md"), REPO / "README.md", REPO / "proto" / "README.md"]:
        for link in MARKDOWN_LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", link):
                continue  # a URL
            file_part, _, anchor = link.partition("#")
            target = (path.parent / file_part) if file_part else path
            if why := broken_reference(target, anchor):
                problems.append(f"{path.relative_to(REPO)}: {link}: {why}")
    assert problems == []


def test_nothing_cites_the_external_specification():
    citations = []
    for path in text_files():
        text = read(path)
        if text is None or path == Path(__file__):  # its own examples cite the spec on purpose
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if SPEC_CITATION.search(line):
                citations.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert citations == []


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
            modules |= {f"{node.module}.{alias.name}" for alias in node.names}
    return modules


def test_no_test_module_imports_another_and_nothing_outside_the_tests_imports_them():
    offenders = []
    for path in REPO.glob("tests/**/*.py"):
        for module in _imported_modules(path):
            if re.match(r"tests\.(?:.+\.)?test_", module):
                offenders.append(f"{path.relative_to(REPO)} imports {module}")
    outside = [p for top in ("oma_server", "vma_agent", "omalab", "scripts", "bench", "clients/python")
               for p in REPO.glob(f"{top}/**/*.py")]
    for path in outside:
        offenders += [f"{path.relative_to(REPO)} imports {m}" for m in _imported_modules(path)
                      if m == "tests" or m.startswith("tests.")]
    for script in (REPO / "scripts").iterdir():
        if script.is_file() and re.search(r"-m\s+tests\b|\btests\.\w", script.read_text()):
            offenders.append(f"{script.relative_to(REPO)} runs a module of the test tree")
    assert offenders == []
