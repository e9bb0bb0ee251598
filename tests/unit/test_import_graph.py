"""The package's import graph: imports run one way (no cycle), and the leaves stay leaves.

Every import counts, also one inside a function; only imports under ``if TYPE_CHECKING:`` do
not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import noetl_pgworker

pytestmark = pytest.mark.unit

PACKAGE = Path(noetl_pgworker.__file__).parent
NAME = "noetl_pgworker"


def _module_name(path: Path) -> str:
    parts = [NAME, *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> set[str]:
    """The package's modules that ``module`` imports (at run time)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith(NAME))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                if not base.startswith(NAME):
                    continue
                for alias in child.names:  # `from . import process`: the submodule
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in MODULES else base)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(module)
    return {m for m in found if m in MODULES}


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                connect(w)
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
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            connect(v)
    return out


def test_the_graph_sees_imports() -> None:
    # The test itself: it must find what is there, or it proves nothing.
    assert "noetl_pgworker.db" in GRAPH["noetl_pgworker.connections"]
    assert "noetl_pgworker.tools.process" in GRAPH["noetl_pgworker.tools.python"]
    assert "noetl_pgworker.worker" in GRAPH["noetl_pgworker.cli"]  # inside a function


def test_no_import_cycle() -> None:
    assert _cycles() == []


@pytest.mark.parametrize("leaf", ["noetl_pgworker.redact", "noetl_pgworker.errors"])
def test_leaves_import_nothing_of_the_package(leaf: str) -> None:
    assert GRAPH[leaf] == set()


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("noetl_pgworker.jsontext", "noetl_pgworker.db"),
        ("noetl_pgworker.logs", "noetl_pgworker.db"),
        ("noetl_pgworker.models", "noetl_pgworker.db"),
        ("noetl_pgworker.connections", "noetl_pgworker.session"),
        ("noetl_pgworker.batches", "noetl_pgworker.server"),
    ],
)
def test_lower_layers_do_not_reach_up(module: str, forbidden: str) -> None:
    assert forbidden not in GRAPH[module]


def test_tools_do_not_import_their_package() -> None:
    tools = [m for m in GRAPH if m.startswith("noetl_pgworker.tools.")]
    assert "noetl_pgworker.tools.base" in tools
    assert [m for m in tools if "noetl_pgworker.tools" in GRAPH[m]] == []
    assert not any(
        m.startswith("noetl_pgworker.tools.") for m in GRAPH["noetl_pgworker.tools.base"]
    )
