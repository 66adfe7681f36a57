"""The face modules import in one direction (types <- backends <- registry; types <- face_sim): no cycle, not even
through imports inside functions, and only the registry knows the backends."""

from __future__ import annotations

import ast
from pathlib import Path

METRICS = Path(__file__).resolve().parents[1] / "multicrafter" / "metrics"
FACE_MODULES = ("face_types", "face_dlib", "face_insightface", "face_registry", "face_sim")
ALLOWED = {   # face modules each one may import
    "face_types": set(),
    "face_dlib": {"face_types"},
    "face_insightface": {"face_types"},
    "face_sim": {"face_types"},
    "face_registry": {"face_types", "face_dlib", "face_insightface"},
}


def face_imports(name: str, folder: Path = METRICS) -> set[str]:
    """Face modules imported anywhere in `name` (top level or inside functions), relative or absolute."""
    tree = ast.parse((folder / f"{name}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            parts = mod.split(".")
            found |= {p for p in parts if p in FACE_MODULES}
            if node.level == 1 and not mod:   # from . import face_dlib
                found |= {a.name for a in node.names if a.name in FACE_MODULES}
            if mod in ("multicrafter.metrics", "") or (node.level == 2 and mod == "metrics"):
                found |= {a.name for a in node.names if a.name in FACE_MODULES}
        elif isinstance(node, ast.Import):
            found |= {p for a in node.names for p in a.name.split(".") if p in FACE_MODULES}
    return found - {name}


def test_face_modules_import_in_one_direction():
    graph = {name: face_imports(name) for name in FACE_MODULES}
    for name, deps in graph.items():
        assert deps <= ALLOWED[name], (name, deps - ALLOWED[name])
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:   # depth-first search for a back edge
        state[node] = "open"
        for dep in graph[node]:
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [node, dep])}"
            if dep not in state:
                visit(dep, path + [node])
        state[node] = "done"

    for name in FACE_MODULES:
        if name not in state:
            visit(name, [])


def test_the_checker_sees_function_level_imports(tmp_path):
    """The scan above must catch an import hidden inside a function (the way cycles usually sneak in)."""
    (tmp_path / "face_types.py").write_text("def f():\n    from .face_registry import get_backend\n")
    (tmp_path / "face_sim.py").write_text("def g():\n    from multicrafter.metrics import face_dlib\n")
    assert face_imports("face_types", tmp_path) == {"face_registry"}
    assert face_imports("face_sim", tmp_path) == {"face_dlib"}


def test_registry_builds_backends_by_name():
    from multicrafter.errors import UserError
    from multicrafter.metrics.face_dlib import DlibBackend
    from multicrafter.metrics.face_registry import BACKENDS, DEFAULT_BACKEND, get_backend

    assert DEFAULT_BACKEND == "dlib" and set(BACKENDS) == {"dlib", "insightface"}
    assert isinstance(get_backend(), DlibBackend)
    try:
        get_backend("opencv")
    except UserError as exc:
        assert "unknown face backend 'opencv'" in str(exc) and "\n" not in str(exc)
    else:
        raise AssertionError("an unknown backend must be refused")
