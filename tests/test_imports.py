"""No import cycles among the modules of edge_genarm/ and export/ (installed as edge_genarm.export).

The graph is read from the source with `ast`, not by importing it: every `import` and
`from ... import` counts, at module level or inside a function (a lazy import still binds
the two modules together), relative ones resolved against their package. Two kinds of
import are not edges: one under `if TYPE_CHECKING:` (never run), and one of the module's own
ancestor package (`from . import __version__`: Python imports a module's packages before the
module, whatever it writes).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package name -> folder, as pyproject's package-dir installs them
PACKAGES = {"edge_genarm": ROOT / "edge_genarm", "edge_genarm.export": ROOT / "export"}
HEAVY = ("torch", "transformers", "optimum", "peft")
# what a user runs without the export or train extras: none of it may import HEAVY at module level
RUNTIME_ENTRIES = ("edge_genarm.cli", "edge_genarm.loader", "edge_genarm.engine", "edge_genarm.server.app")


def module_files(packages: dict[str, Path]) -> dict[str, Path]:
    """Module name -> source file, for every .py under each package folder (a package's
    __init__.py is the package itself); a folder mapped to its own package is left to that one."""
    own = {p.resolve() for p in packages.values()}
    out = {}
    for pkg, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder)
            if any((folder / Path(*rel.parts[:i])).resolve() in own for i in range(1, len(rel.parts))):
                continue
            parts = [pkg, *rel.with_suffix("").parts]
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(tree: ast.AST, module: str, is_package: bool, top_only: bool = False) -> set[str]:
    """Every dotted name `tree` imports, relative imports made absolute: `from a import b` gives
    both `a` and `a.b` (b may be a module). `top_only`: only what runs on import (not in
    functions)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if top_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(packages: dict[str, Path], top_only: bool = False) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> modules of ours it imports, module -> every dotted name it imports)."""
    files = module_files(packages)
    graph, names = {}, {}
    for mod, path in files.items():
        found = imported_names(ast.parse(path.read_text(), str(path)), mod, path.name == "__init__.py", top_only)
        names[mod] = found
        ancestors = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
        graph[mod] = {t for t in found if t in files and t != mod and t not in ancestors}
    return graph, names


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] per group of modules that import each other, sorted; [] when the
    graph has none."""
    return sorted(_cycle_in(graph, g) for g in import_groups(graph))


def import_groups(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of more than one module (or one importing itself): each
    member reaches every other through imports. Tarjan's algorithm, iterative."""
    index, low, on, stack, groups, counter = {}, {}, set(), [], [], [0]

    def strongconnect(root: str) -> None:
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    group = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        group.append(x)
                        if x == v:
                            break
                    if len(group) > 1 or v in graph.get(v, ()):
                        groups.append(set(group))
            elif w not in index:
                index[w] = low[w] = counter[0]
                counter[0] += 1
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(graph.get(w, ())))))
            elif w in on:
                low[v] = min(low[v], index[w])

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return groups


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest cycle through the group's first module (breadth-first, inside the group)."""
    start = min(group)
    prev: dict[str, str] = {}
    todo = [start]
    while todo:
        nxt = []
        for v in todo:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w in group and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        todo = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


# ---------------------------------------------------------------------------
# the cycle finder on hand-made graphs and a hand-made package
# ---------------------------------------------------------------------------


def test_find_cycles_names_each_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"x": {"x"}}) == [["x", "x"]]
    two = find_cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c", "a"}})
    assert two == [["a", "b", "a"], ["c", "d", "e", "c"]]
    deep = {f"m{i}": {f"m{i + 1}"} for i in range(3000)}  # no recursion limit to hit
    deep["m3000"] = {"m0"}
    assert len(find_cycles(deep)[0]) == 3002


def test_a_cycle_through_a_function_level_relative_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '1'\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import __version__\nfrom .sub.b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import g\n    return g\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    graph, _ = import_graph({"pkg": pkg})
    assert graph == {"pkg": set(), "pkg.sub": set(), "pkg.a": {"pkg.sub.b"}, "pkg.sub.b": {"pkg.a"}, "pkg.c": set()}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.a"]]
    top, _ = import_graph({"pkg": pkg}, top_only=True)
    assert find_cycles(top) == []  # module-level imports alone miss it: the walk must look inside functions


def test_the_graph_sees_the_real_packages():
    graph, _ = import_graph(PACKAGES)
    assert {"edge_genarm.engine", "edge_genarm.export.train_loop", "edge_genarm.server.app"} <= set(graph)
    assert "edge_genarm.export.train" in graph["edge_genarm.export.train_loop"]
    assert "edge_genarm.export.tiny" not in graph  # test fixtures live in tests/


# ---------------------------------------------------------------------------
# the project
# ---------------------------------------------------------------------------


def test_no_import_cycles():
    graph, _ = import_graph(PACKAGES)
    found = [
        f"{' -> '.join(_cycle_in(graph, g))}   (the group: {', '.join(sorted(g))})"
        for g in sorted(import_groups(graph), key=min)
    ]
    assert not found, "import cycles; move what both sides need into a module that imports neither:\n" + (
        "\n".join(found)
    )


@pytest.mark.parametrize("entry", RUNTIME_ENTRIES)
def test_runtime_modules_import_no_training_stack(entry):
    """What `entry` imports on import, transitively, never imports torch & co at module level
    (tests/test_runtime_imports.py checks a real load and generate the same way, at run time)."""
    graph, names = import_graph(PACKAGES, top_only=True)
    seen, todo = set(), [entry]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(graph[mod])
    heavy = sorted(f"{m} imports {n}" for m in seen for n in names[m] if n.split(".")[0] in HEAVY)
    assert not heavy, heavy
