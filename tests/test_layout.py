"""The house rules of the tree, checked: rooms import downwards only, no import circles,
no source file over 600 lines, DuckDB opened in one place.

Why a test: these debts come back one convenient import at a time; a failing test names the
import that breaks the rule while the change is still small.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Each room may import only the rooms listed before it. The `fedomop` package is the shell:
#: its `ui` and `lifecycle` modules are the shared base every command uses, its `cli` and
#: `entry` modules sit on top of every room.
LAYERS: list[tuple[str, ...]] = [
    ("fedomop.ui", "fedomop.lifecycle"),
    ("privacy",),
    ("omop_etl",),
    ("studies",),
    ("node",),
    ("coordinator",),
    ("fedomop",),
]
ROOMS = ("privacy", "omop_etl", "studies", "node", "coordinator", "fedomop")
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for room in ROOMS:
        for path in (ROOT / room).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name | ast.Attribute) and "TYPE_CHECKING" in ast.unparse(test)


def _imported_names(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement reaches, TYPE_CHECKING blocks excepted."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name in _imported_names(tree, module, path.name == "__init__.py"):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                graph[module].add(name)
    return graph


def _layer(module: str) -> int:
    best = (-1, -1)
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                best = max(best, (len(prefix), index))
    return best[1]


def test_rooms_import_downwards_only() -> None:
    upward = sorted(
        f"{source} imports {target}"
        for source, targets in _import_graph().items()
        for target in targets
        if _layer(target) > _layer(source)
    )
    assert upward == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for node in list(graph):
            if node not in index:
                connect(node)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_no_import_circles() -> None:
    assert _cycles(_import_graph()) == []


@pytest.mark.parametrize("room", ROOMS + ("bench",))
def test_source_files_are_a_readable_size(room: str) -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in (ROOT / room).rglob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def test_bench_imports_no_test_module() -> None:
    """Benchmarks build on the rooms, never on the test suite: what both need (the reliability
    bench's CDMs, policies and permits, the PostgreSQL server) lives in a room
    (``coordinator.fixtures``, ``omop_etl.local_postgres``)."""
    test_modules = {"tests"} | {path.stem for path in (ROOT / "tests").rglob("*.py")}
    found = {
        f"{path.relative_to(ROOT)} imports {'.'.join(name.split('.')[:2])}"
        for path in (ROOT / "bench").rglob("*.py")
        for name in _imported_names(ast.parse(path.read_text(encoding="utf-8")), "bench", True)
        if name.split(".")[0] in test_modules
    }
    assert found == set()
    sources = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "bench").rglob("*.py"))
    assert '"tests"' not in sources  # no sys.path entry for the test folder either


def test_duckdb_is_opened_in_one_place() -> None:
    """Every DuckDB connection of the rooms and benches comes from ``omop_etl.cdm`` (which turns
    DuckDB's progress bar off: it writes into stdout, a command's JSON or a node's log)."""
    found = {
        str(path.relative_to(ROOT))
        for room in (*ROOMS, "bench")
        for path in (ROOT / room).rglob("*.py")
        if "duckdb.connect(" in path.read_text(encoding="utf-8")
    }
    assert found == {"omop_etl/cdm.py"}
