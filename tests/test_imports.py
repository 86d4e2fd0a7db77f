"""The import graph of meta_mask/ has no cycle: every import counts (module level, inside
functions, under TYPE_CHECKING, importlib.import_module of a constant name)."""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Mapping

from tests.processes import REPO


def _modules(root: pathlib.Path, package: str) -> dict[str, tuple[pathlib.Path, bool]]:
    """Dotted module name -> (file, is a package) for every .py file of `package`."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _imported(node: ast.AST, here: str, modules: Mapping[str, object]) -> set[str]:
    """The modules of `modules` that one AST node imports (`here`: the importer's package)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names} & set(modules)
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: climb from the importing module's package
            parts = here.split(".")
            parts = parts[: len(parts) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        # `from a.b import c` imports module a.b.c when there is one, else a name of a.b.
        names = {f"{base}.{alias.name}" for alias in node.names}
        found = names & set(modules)
        return found | ({base} & set(modules) if len(found) < len(names) else set())
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "import_module"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ):
        return {node.args[0].value} & set(modules)
    return set()


def import_graph(root: pathlib.Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source."""
    modules = _modules(root, package)
    graph = {}
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = set().union(*(_imported(n, here, modules) for n in ast.walk(tree))) - {name}
    return graph


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or w != v:
                w = stack.pop()
                component.add(w)
            if len(component) > 1:
                out.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle (first module repeated at the end) per component of >1 module."""
    out = []
    for component in _components(graph):
        start = min(component)
        parent: dict[str, str | None] = {start: None}
        queue = [start]
        for v in queue:  # breadth first, inside the component, until an edge leads back
            if start in graph[v]:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                out.append([*reversed(path), start])
                break
            for w in sorted(graph[v] & component):
                if w not in parent:
                    parent[w] = v
                    queue.append(w)
    return sorted(out)


def test_cycle_finder_sees_function_level_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..c import X\n"
    )
    (pkg / "c.py").write_text("import importlib\nimportlib.import_module('pkg.a')\n")
    (pkg / "d.py").write_text("from pkg import a, c\nfrom pkg.sub import b\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.d"] == {"pkg.a", "pkg.c", "pkg.sub.b"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    (pkg / "c.py").write_text("X = 1\n")
    assert cycles(import_graph(tmp_path, "pkg")) == []


def test_meta_mask_has_no_import_cycle():
    graph = import_graph(REPO, "meta_mask")
    # The graph sees imports inside functions (the stages import their parts on use).
    assert "meta_mask.data.tasks" in graph["meta_mask.stages"]
    assert "meta_mask.data.world" in graph["meta_mask.data.tasks"]
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)
