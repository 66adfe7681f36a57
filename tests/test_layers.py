"""The project's layers point one way, and no project modules import each other in a cycle.

Layers, from the bottom: `multicrafter` (the library) < `annotate` (dataset tools) < `train` < `demo` (the app's
tabs) < `app.py`; `bench` (benchmarks) sits on top of everything. A module may import from its own layer and the
layers below it, never from a layer above:
  - multicrafter imports nothing from annotate, train, demo, bench or app;
  - annotate nothing from train, demo, bench or app;
  - train nothing from demo, bench or app;
  - demo nothing from bench.

How the import graph is read (statically, with `ast`, from every .py file of multicrafter/, annotate/, train/,
demo/, bench/ and app.py):
  - every `import` statement counts, at module top and inside functions alike: a lazy import is still a dependency;
  - relative imports are resolved against the importing module's package;
  - `import a.b.c` is an edge to `a.b.c` (the longest prefix that is a project module);
  - `from pkg import name` is an edge to the submodule `pkg.name` when `pkg/name.py` or `pkg/name/__init__.py`
    exists, else to `pkg` itself (the name is an attribute of the package's `__init__`);
  - a package `__init__` that imports (re-exports) its submodules has an edge package -> submodule;
  - importing `a.b.c` also runs `a/__init__` and `a/b/__init__`, but those implied parent-package imports are NOT
    edges: otherwise every module inside a package whose `__init__` re-exports it would sit in a false cycle with
    its own package. An explicit `from a import x` (x not a submodule) is an edge to `a`, and is followed through
    `a`'s own imports;
  - imports under `if TYPE_CHECKING:` never run: they count for the layer rules (a type from a higher layer is
    still an upward dependency) but not for cycles.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("multicrafter", "annotate", "train", "demo", "bench")
SCRIPTS = ("app.py",)
# importer layer -> layers it must not import from
FORBIDDEN = {
    "multicrafter": ("annotate", "train", "demo", "bench", "app"),
    "annotate": ("train", "demo", "bench", "app"),
    "train": ("demo", "bench", "app"),
    "demo": ("bench",),
}


@dataclass(frozen=True)
class Edge:
    """One import statement between two project modules."""

    src: str
    dst: str
    file: str
    line: int
    type_checking: bool

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.src} -> {self.dst}"


def project_modules(root: Path) -> dict[str, Path]:
    """Module name -> file for every .py file of the project's packages and scripts."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    for script in SCRIPTS:
        if (root / script).is_file():
            modules[Path(script).stem] = root / script
    return modules


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers of the statements inside `if TYPE_CHECKING:` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for stmt in node.body:
                    lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def _longest_module(name: str, modules: dict[str, Path]) -> str | None:
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in modules:
            return candidate
    return None


def import_edges(root: Path) -> tuple[list[Edge], dict[str, Path]]:
    """Every import between project modules, resolved as the module docstring describes."""
    modules = project_modules(root)
    edges: list[Edge] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        guarded = _type_checking_lines(tree)
        is_package = path.name == "__init__.py"
        package = module if is_package else module.rpartition(".")[0]
        rel = str(path.relative_to(root))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [t for alias in node.names if (t := _longest_module(alias.name, modules))]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".") if package else []
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)] if node.level > 1 else base_parts
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base else alias.name
                    target = sub if sub in modules else _longest_module(base, modules) if base else None
                    if target:
                        targets.append(target)
            for target in dict.fromkeys(targets):
                if target != module:
                    edges.append(Edge(module, target, rel, node.lineno, node.lineno in guarded))
    return edges, modules


def layer_of(module: str) -> str:
    """The layer (top-level package or script) a module belongs to."""
    return module.split(".")[0]


def layer_violations(edges: list[Edge]) -> list[Edge]:
    """Edges from a layer into a layer above it."""
    return [e for e in edges if layer_of(e.dst) in FORBIDDEN.get(layer_of(e.src), ())]


def import_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its list of edges) per strongly connected group of modules, TYPE_CHECKING imports left out."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        if not e.type_checking:
            graph.setdefault(e.src, {}).setdefault(e.dst, e)
    # Tarjan's strongly connected components, iterative (no recursion limit on long chains).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # Breadth-first search inside the component for the shortest way back to its first module.
        parent: dict[str, Edge] = {}
        frontier, seen, closing = [start], {start}, None
        while frontier and closing is None:
            nxt = []
            for node in frontier:
                for child, edge in sorted(graph.get(node, {}).items()):
                    if child == start:
                        closing = edge
                        break
                    if child in members and child not in seen:
                        seen.add(child)
                        parent[child] = edge
                        nxt.append(child)
                if closing is not None:
                    break
            frontier = nxt
        path = [closing]
        while path[0].src != start:
            path.insert(0, parent[path[0].src])
        cycles.append(path)
    return cycles


def _describe_cycles(cycles: list[list[Edge]]) -> str:
    blocks = []
    for cycle in cycles:
        chain = " -> ".join([cycle[0].src] + [e.dst for e in cycle])
        blocks.append(chain + "\n" + "\n".join(f"    {e}" for e in cycle))
    return "\n".join(blocks)


def test_layers_point_one_way():
    edges, _ = import_edges(ROOT)
    bad = layer_violations(edges)
    assert not bad, "imports from a higher layer:\n" + "\n".join(f"  {e}" for e in bad)


def test_no_import_cycles():
    edges, _ = import_edges(ROOT)
    cycles = import_cycles(edges)
    assert not cycles, "import cycles between project modules:\n" + _describe_cycles(cycles)


def test_the_graph_is_read_from_the_whole_project():
    """Guards the checker itself: the graph holds the imports every layer is known to make."""
    edges, modules = import_edges(ROOT)
    assert {"multicrafter.pipeline", "annotate", "train.pretrain", "demo", "app"} <= set(modules)
    pairs = {(e.src, e.dst) for e in edges}
    assert ("multicrafter.pipeline", "multicrafter.adapters") in pairs            # top-level relative import
    assert ("multicrafter", "multicrafter.pipeline") in pairs                     # __init__ -> submodule, lazy
    assert any(layer_of(s) == "train" and layer_of(d) == "multicrafter" for s, d in pairs)
    assert any(layer_of(s) == "demo" and layer_of(d) == "multicrafter" for s, d in pairs)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_upward_imports_and_cycles(tmp_path):
    """A small made-up project: every rule of the module docstring, each with the case it must catch or let pass."""
    _write(tmp_path, {
        "multicrafter/__init__.py": "from .a import thing\n",
        "multicrafter/a.py": "def f():\n    from annotate import tools\n",        # upward, inside a function
        "multicrafter/b.py": "from . import c\n",                                 # b -> c (submodule)
        "multicrafter/c.py": "from .sub.d import x\n",                            # c -> sub.d (not sub, not root)
        "multicrafter/sub/__init__.py": "",
        "multicrafter/sub/d.py": "from ..b import y\n",                           # d -> b: closes b -> c -> d -> b
        "multicrafter/e.py": "import multicrafter.a\n",                           # implies multicrafter/__init__:
        "multicrafter/f.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import z\n"
                             "    from train import cfg\n",                      # no edge e -> multicrafter -> a
        "multicrafter/g.py": "from multicrafter import thing\n",                  # -> multicrafter (attribute)
        "multicrafter/h.py": "from .i import x\n",                                # h -> i, and i -> h only for
        "multicrafter/i.py": "import typing\nif typing.TYPE_CHECKING:\n    from .h import y\n",  # types: no cycle
        "annotate/__init__.py": "",
        "annotate/tools.py": "import multicrafter.b\n",
        "train/__init__.py": "from multicrafter.e import q\n",
        "demo/__init__.py": "",
        "bench/run.py": "from demo import x\n",
    })
    edges, modules = import_edges(tmp_path)
    assert "bench.run" in modules and "annotate" in modules
    pairs = {(e.src, e.dst) for e in edges}
    assert ("multicrafter.b", "multicrafter.c") in pairs
    assert ("multicrafter.c", "multicrafter.sub.d") in pairs
    assert ("multicrafter.sub.d", "multicrafter.b") in pairs
    assert ("multicrafter.g", "multicrafter") in pairs
    assert ("multicrafter.e", "multicrafter.a") in pairs and ("multicrafter.e", "multicrafter") not in pairs
    assert ("multicrafter.a", "annotate.tools") in pairs and ("multicrafter.h", "multicrafter.i") in pairs
    bad = {(e.src, e.dst) for e in layer_violations(edges)}
    assert bad == {("multicrafter.a", "annotate.tools"), ("multicrafter.f", "train")}
    cycles = import_cycles(edges)
    assert len(cycles) == 1
    assert [e.src for e in cycles[0]] == ["multicrafter.b", "multicrafter.c", "multicrafter.sub.d"]
    assert cycles[0][-1].dst == "multicrafter.b" and cycles[0][-1].file == "multicrafter/sub/d.py"
    assert "multicrafter.b -> multicrafter.c -> multicrafter.sub.d -> multicrafter.b" in _describe_cycles(cycles)
