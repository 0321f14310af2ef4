"""No import circles in engine/, kernels/ or benchmarks/.

Every import counts as an edge, wherever it stands: at module level, inside a function (a lazy
import is still a dependency), under ``if TYPE_CHECKING:`` (a type shared both ways belongs a
floor below) and under ``if __name__ == "__main__":``. ``from pkg import name`` is an edge to
the submodule pkg.name where there is one, else to pkg (its __init__.py). Importing a submodule
does not add an edge to its parent package: a package's __init__.py may import its own modules.

    python tests/test_imports.py     # the circles, if any, with every edge in them
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels", "benchmarks")
KINDS = ("module", "function", "typing")  # where an import stands (typing: TYPE_CHECKING)

# Circles known and scheduled for removal, each with the reason (none left since the runner
# split of issue 15). The test fails on any other circle, and on a listed one that is gone
# while its modules are there (drop it here then).
KNOWN: set[frozenset[str]] = set()


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    kind: str
    line: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line} -> {self.target} ({self.kind})"


def module_files(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the packages."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(name: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    """The edges from module `name` to the other modules in `modules`."""
    is_package = path.name == "__init__.py"
    found: list[tuple[str, str, int]] = []

    def absolute(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, *([node.module] if node.module else [])])

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.body:
                    visit_one(stmt, "typing")
                for stmt in child.orelse:
                    visit_one(stmt, kind)
            else:
                visit_one(child, kind)

    def visit_one(node: ast.AST, kind: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            visit(node, "function" if kind == "module" else kind)
        elif isinstance(node, ast.Import):
            found.extend((alias.name, kind, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in modules else base, kind, node.lineno))
        else:
            visit(node, kind)

    visit(ast.parse(path.read_text(), filename=str(path)), "module")
    edges: dict[Edge, None] = {}  # one edge per line, target and kind (`from x import a, b`)
    for target, kind, line in found:
        while target and target not in modules:  # engine.io.parquet.read -> engine.io.parquet
            target = target.rpartition(".")[0]
        if target and target != name:
            edges[Edge(name, target, kind, line)] = None
    return list(edges)


def import_graph(root: Path = REPO, packages: Iterable[str] = PACKAGES) -> list[Edge]:
    modules = module_files(root, packages)
    return [edge for name, path in modules.items() for edge in imports(name, path, modules)]


def circles(edges: Iterable[Edge], kinds: Iterable[str] = KINDS) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    kinds = set(kinds)
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set())
        graph.setdefault(e.target, set())
        if e.kind in kinds:
            graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def describe(edges: list[Edge], found: list[list[str]], kinds: Iterable[str] = KINDS) -> str:
    kinds = set(kinds)
    lines = []
    for component in found:
        members = set(component)
        lines.append(" <-> ".join(component))
        lines += [
            f"    {e}"
            for e in edges
            if e.source in members and e.target in members and e.kind in kinds
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the tests


def test_no_import_circle_in_engine_kernels_or_benchmarks():
    edges = import_graph()
    assert len(edges) > 200  # the walk found the imports (engine alone has several hundred)
    found = circles(edges)
    new = [c for c in found if frozenset(c) not in KNOWN]
    why = "import circles (move what both sides need a floor below them):\n"
    assert not new, why + describe(edges, new)
    modules = module_files(REPO)
    gone = [sorted(k) for k in KNOWN if k <= modules.keys() and sorted(k) not in found]
    assert not gone, f"no longer circles, remove them from KNOWN: {gone}"


def test_the_check_sees_lazy_typing_and_relative_imports(tmp_path):
    pkg = tmp_path / "engine"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("def f():\n    from engine.sub import b\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import f\n"
    )
    (pkg / "c.py").write_text("import engine.sub.b\n")
    edges = import_graph(tmp_path, ["engine"])
    assert {str(e) for e in edges} == {
        "engine.sub:1 -> engine.sub.b (module)",
        "engine.a:2 -> engine.sub.b (function)",
        "engine.sub.b:3 -> engine.a (typing)",
        "engine.c:1 -> engine.sub.b (module)",
    }
    assert circles(edges) == [["engine.a", "engine.sub.b"]]
    assert circles(edges, kinds=("module", "function")) == []


if __name__ == "__main__":
    all_edges = import_graph()
    print(f"{len(all_edges)} import edges in {', '.join(PACKAGES)}")
    for counted in (("module",), ("module", "function"), KINDS):
        cs = circles(all_edges, counted)
        print(f"edges at {' + '.join(counted)} level: {len(cs)} circle(s)")
        if cs:
            print(describe(all_edges, cs, counted))
