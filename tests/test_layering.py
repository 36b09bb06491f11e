"""The layout rules a newcomer relies on: the core imports no role, nothing imports in a circle, modules
stay small. Read from the source (every import, including those inside functions), not from what ran."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("deepcovid", "db", "producer", "worker", "training", "cli", "review", "pacs")
ROLES = ("db", "producer", "worker", "training", "cli", "review", "pacs")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports; ``from a import b`` counts as ``a.b`` when that is a module."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_the_core_imports_no_role_package() -> None:
    offenders = {
        module: sorted(i for i in imported if i.split(".")[0] in ROLES)
        for module, imported in _graph().items()
        if module.split(".")[0] == "deepcovid"
    }
    assert {m: i for m, i in offenders.items() if i} == {}


def test_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            # A package and its own submodules (``worker`` and ``worker.tasks``) is how Celery apps
            # register tasks; any other component of two or more modules is a cycle.
            if len({m.split(".")[0] for m in component}) > 1 or not _package_and_children(component):
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert [c for c in cycles if len(c) > 1] == []


def _package_and_children(component: list[str]) -> bool:
    roots = [m for m in component if "." not in m]
    return len(roots) == 1 and all(m == roots[0] or m.startswith(roots[0] + ".") for m in component)


def test_modules_stay_small() -> None:
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
