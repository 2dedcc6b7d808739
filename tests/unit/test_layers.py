"""The package's house rules, checked on its import graph (docs/architecture.md):
imports point down the layers, no two modules import each other even through a
chain (``TYPE_CHECKING`` imports included), and no module passes 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "trioserve"
MAX_LINES = 600

#: Folder (or module) -> layer. A module may import its own folder and lower layers only.
LAYERS = {
    "trioserve._version": 0,
    "trioserve.protocol": 1,
    "trioserve.config": 1,
    "trioserve.net": 2,
    "trioserve.push": 3,
    "trioserve.server": 4,
    "trioserve.bench": 5,
    "trioserve.client": 5,
    "trioserve.ops": 6,
    "trioserve.__main__": 7,
    "trioserve": 7,  # the package face: the public API only
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that *name* imports, wherever the import statement is."""
    found = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _room(name: str) -> str:
    """The LAYERS key that *name* belongs to: its longest listed prefix."""
    return max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)


def test_every_module_has_a_layer() -> None:
    assert all(_room(name) for name in MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name: str) -> None:
    room = _room(name)
    upward = [t for t in GRAPH[name] if _room(t) != room and LAYERS[_room(t)] >= LAYERS[room]]
    assert not upward, f"{name} ({room}, layer {LAYERS[room]}) imports {upward}"


def test_no_import_cycles() -> None:
    # Tarjan's strongly connected components; any component of two or more is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert cycles == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]}: {lines} lines"


def test_the_checks_see_imports() -> None:
    # Guards the guard: a parser that found no edges would pass every test above.
    assert "trioserve.net.connection" in GRAPH["trioserve.server.server"]
    assert "trioserve.push.brokers.base" in GRAPH["trioserve.push.brokers.memory"]
    assert "trioserve.config" in GRAPH["trioserve.net.connection"]
