"""docs/architecture.md is the map of the package: every module is on it, and imports only what its
row says it may."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sae_registry"


def documented() -> dict[str, set[str]]:
    """module -> the rooms its row of docs/architecture.md allows it to import."""
    rows = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        m = re.match(r"\|\s*\w+\s*\|\s*`(\w+)\.py`.*\|\s*([^|]*)\|\s*$", line)
        if m:
            allowed = m[2].strip()
            rows[m[1]] = set() if allowed.startswith("(none)") else {a.strip() for a in allowed.split(",")}
    return rows


def imports(path: Path) -> set[str]:
    """The package's own modules that ``path`` imports (at the top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found - {path.stem, "__version__"}


def test_the_map_parses():
    rows = documented()
    assert {"cli", "sae", "store", "errors"} <= set(rows)
    assert rows["errors"] == set()


def test_every_module_is_on_the_map_and_imports_only_what_it_may():
    rows = documented()
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    missing = sorted(set(modules) - set(rows))
    assert not missing, f"modules not described in docs/architecture.md: {missing}"
    stale = sorted(set(rows) - set(modules))
    assert not stale, f"docs/architecture.md describes modules that do not exist: {stale}"
    wrong = {name: sorted(imports(path) - rows[name]) for name, path in modules.items() if imports(path) - rows[name]}
    assert not wrong, f"imports not allowed by docs/architecture.md (update the map or the code): {wrong}"
