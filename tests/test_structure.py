"""The shape docs/architecture.md promises: no import circles, no upward arrows, no monolith modules.

Imports are read from the source (module level, inside functions and under TYPE_CHECKING alike: a
lazy import hides a circle, it does not remove it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("edgekit", "device_agent"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            # "from package import module" imports the module; the package only if a name is not a module
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    known = set()
    for target in targets:
        while target and target not in MODULES and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in MODULES and target != name:
            known.add(target)
    return known


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycle_from(start: str) -> list[str] | None:
    """A path of imports from ``start`` back to it, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for target in GRAPH[node]:
            if target == start:
                return path + [start]
            if target not in seen:
                seen.add(target)
                stack.append((target, path + [target]))
    return None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_circle(module):
    assert _cycle_from(module) is None, " -> ".join(_cycle_from(module))


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("edgekit.models", "edgekit.build"),
        ("edgekit.models", "edgekit.bundle"),
        ("edgekit.build", "edgekit.bundle"),
        ("edgekit.build", "edgekit.fleet"),
        ("edgekit.bundle", "edgekit.fleet"),
        ("edgekit.fleet", "edgekit.local"),
        ("edgekit", "edgekit.cli"),
        ("device_agent", "edgekit"),
    ],
)
def test_no_upward_arrow(lower, upper):
    offenders = [
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if (name == lower or name.startswith(lower + "."))
        and not (name == upper or name.startswith(upper + ".") or name.endswith(".__main__"))  # entry points
        for target in targets
        if target == upper or target.startswith(upper + ".")
    ]
    assert not offenders, offenders


def test_no_module_is_a_monolith():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


MAX_FUNCTION_LINES = 60


def test_no_function_is_a_monolith():
    long = [
        f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def test_every_store_provides_what_each_consumer_names():
    from edgekit.fleet.store import CollectorStore, FleetStore, PostgresStore, RolloutStore, SqliteStore

    for store in (SqliteStore, PostgresStore):
        for protocol in (FleetStore, CollectorStore, RolloutStore):
            wanted = {n for base in protocol.__mro__ if base.__module__ == protocol.__module__ for n in vars(base)}
            missing = sorted(n for n in wanted if not n.startswith("_") and not hasattr(store, n))
            assert not missing, (store.__name__, protocol.__name__, missing)
