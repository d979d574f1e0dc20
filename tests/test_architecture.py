"""docs/architecture.md is the map of the package: every folder and module is on it, a module imports
only lower layers (or its own folder), our modules are imported at the top of a module (``cli/``
excepted), and the graph of our modules is acyclic counting imports inside functions."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sae_registry"
LAZY_OWN_IMPORTS = {"cli"}  # the commands import what they call inside their bodies: a torch-free --help


def the_map() -> dict[str, tuple[int, set[str]]]:
    """package (``errors`` for errors.py) -> (its layer, the modules its row lists)."""
    rows = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|\s*`([\w/.]+?)(?:/|\.py)`\s*\|.*\|\s*([\w, ]+)\|\s*$", line)
        if m:
            rows[m[2]] = (int(m[1]), {name.strip() for name in m[3].split(",")})
    return rows


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, whether inside a function) for each import of one of our modules by ``path``;
    imports under ``if TYPE_CHECKING:`` never run and are left out."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and ast.unparse(node.test) == "TYPE_CHECKING" for n in ast.walk(node)}
    in_function = {id(n) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(node) if n is not node}
    here = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    here = [p for p in here if p]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or id(node) in typing_only:
            continue
        if node.level:
            base = here[:len(here) - (node.level - 1)] + (node.module.split(".") if node.module else [])
        elif node.module and node.module.split(".")[0] == "sae_registry":
            base = node.module.split(".")[1:]
        else:
            continue
        for alias in node.names:
            full = [*base, alias.name]
            is_module = (PACKAGE.joinpath(*full).with_suffix(".py")).is_file() or PACKAGE.joinpath(*full).is_dir()
            found.append((".".join(full if is_module else base), id(node) in in_function))
    return found


def package_of(module: str) -> str:
    return module.split(".")[0] if module else ""


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_the_map_parses():
    rows = the_map()
    assert rows["errors"] == (0, {"errors"})
    assert rows["architectures"][0] < rows["config"][0] < rows["model"][0] < rows["cli"][0]
    assert "catalogue" in rows["architectures"][1]


def test_every_folder_and_module_is_on_the_map():
    rows = the_map()
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders | {"errors"} == set(rows), "docs/architecture.md and the package's folders differ"
    for folder in folders:
        files = {p.stem for p in (PACKAGE / folder).glob("*.py") if not p.stem.startswith("__")}
        assert files == rows[folder][1], f"{folder}/ holds {sorted(files)}, its row lists {sorted(rows[folder][1])}"
    root_modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert root_modules == {"errors"}, f"only __init__.py and errors.py live at the root, found {root_modules}"


def test_no_module_imports_its_own_layer_or_above():
    layers = {name: layer for name, (layer, _) in the_map().items()}
    wrong = []
    for name, path in modules().items():
        if name == "":  # the public __init__ names everything, lazily
            continue
        mine = package_of(name)
        for target, _ in our_imports(path):
            theirs = package_of(target)
            if theirs == mine or theirs == "errors":
                continue
            if theirs == "" or layers[theirs] >= layers[mine]:
                wrong.append(f"{name} -> {target} (layer {layers[mine]} -> {layers.get(theirs, 'root')})")
    assert not wrong, "imports against docs/architecture.md's layers:\n" + "\n".join(wrong)


def test_our_modules_are_imported_at_the_top_outside_cli():
    lazy = [f"{name} -> {target}" for name, path in modules().items() if package_of(name) not in LAZY_OWN_IMPORTS
            for target, in_function in our_imports(path) if in_function]
    assert not lazy, "imports of our own modules inside functions (import them at the top):\n" + "\n".join(lazy)


def test_the_module_graph_is_acyclic_counting_function_level_imports():
    graph = {name: {t for t, _ in our_imports(path) if t in modules()} for name, path in modules().items() if name}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_graph_check_finds_a_cycle(tmp_path, monkeypatch):
    """The checks above can fail: a function-level import back up the layers is caught."""
    fake = tmp_path / "sae_registry"
    (fake / "model").mkdir(parents=True)
    (fake / "registry").mkdir()
    for folder in ("model", "registry"):
        (fake / folder / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "model" / "sae.py").write_text("def f():\n    from ..registry import runs\n")
    (fake / "registry" / "runs.py").write_text("from ..model import sae\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert ("registry.runs", True) in our_imports(fake / "model" / "sae.py")
    with pytest.raises(AssertionError, match="import cycle"):
        test_the_module_graph_is_acyclic_counting_function_level_imports()


@pytest.mark.parametrize("module", ["sae_registry", "sae_registry.config.options", "sae_registry.config.sweep",
                                    "sae_registry.architectures.catalogue", "sae_registry.cli"])
def test_the_torch_free_layers_import_no_torch(module):
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, f"importing {module} imported torch"
