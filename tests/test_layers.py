"""Strict layers, read from the source: the core imports nothing above it (not even lazily), no module imports
itself back through a cycle, and the CLI still has every command the packages declare."""

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lorahub_engine", "retrieval", "routers", "benchmarks")
# package -> the packages it must never import
FORBIDDEN = {"lorahub_engine": {"retrieval", "routers", "benchmarks"}, "retrieval": {"routers", "benchmarks"},
             "routers": {"retrieval", "benchmarks"}}


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the four packages."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """Every module `module` imports anywhere in its file (functions included), resolved to known module names
    where a `from X import name` names a submodule; dynamic imports (importlib, __import__) by their string."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
        elif isinstance(node, ast.Call) and _dynamic_import(node):
            found.add(node.args[0].value)
    return found


def _dynamic_import(node: ast.Call) -> bool:
    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    return (name in ("import_module", "__import__") and bool(node.args) and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str))


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {m: imported(m, path, known) for m, path in files.items()}


def test_lower_layers_import_nothing_above_them():
    broken = [f"{module} imports {target}" for module, targets in import_graph().items()
              for target in targets for package in FORBIDDEN.get(module.split(".")[0], ())
              if target == package or target.startswith(package + ".")]
    assert not broken, "layer violations:\n" + "\n".join(broken)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (or a module importing itself)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_no_import_cycles():
    assert strongly_connected(import_graph()) == []


def test_the_checks_see_a_violation_and_a_cycle():
    graph = {"lorahub_engine.a": {"benchmarks.b"}, "benchmarks.b": {"lorahub_engine.a"}, "retrieval.c": set()}
    assert strongly_connected(graph) == [["benchmarks.b", "lorahub_engine.a"]]
    known = {"lorahub_engine.x", "lorahub_engine.x.y"}
    source = "from . import y\nfrom .y import z\ndef f():\n    import retrieval.index\n    importlib.import_module('benchmarks.demo')\n"
    path = ROOT / "tests" / "_layers_probe" / "__init__.py"
    path.parent.mkdir(exist_ok=True)
    try:
        path.write_text(source)
        assert imported("lorahub_engine.x", path, known) == {"lorahub_engine.x.y", "retrieval.index", "benchmarks.demo"}
    finally:
        path.unlink()
        path.parent.rmdir()


def declared_commands() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(project["project"]["entry-points"]["lorahub_engine.commands"])


def test_help_lists_every_command():
    from lorahub_engine.cli import CORE_COMMANDS

    out = subprocess.run([sys.executable, "-m", "lorahub_engine.cli", "--help"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    core = [add.__name__.removeprefix("add_").replace("_", "-") for add in CORE_COMMANDS]
    listed = re.findall(r"^    (\S+)", out, flags=re.MULTILINE)
    missing = [name for name in core + declared_commands() if name not in listed]
    assert not missing, f"`lorahub-engine --help` lacks {missing} (reinstall with pip install -e . ?):\n{out}"


@pytest.mark.parametrize("command", ["index", "retrieve", "build-zoo", "bench", "demo"])
def test_plugin_commands_come_from_their_own_package(command):
    from importlib.metadata import entry_points

    (entry,) = entry_points(group="lorahub_engine.commands", name=command)
    assert entry.value.split(".")[0] in ("retrieval", "benchmarks", "routers")
