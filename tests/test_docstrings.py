"""Every public function, class and method of the library says in a docstring what it is for.

Public: a name without a leading underscore, defined at module level or in a public class's body (nested helper
functions are not API). Dunder methods (`__init__`, `__call__`, ...) are documented by their class or follow the
protocol they implement.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "multicrafter"


def missing_docstrings(root: Path) -> list[str]:
    """`file:line: qualified.name` of each public definition under `root` without a docstring."""
    missing: list[str] = []

    def visit(body: list[ast.stmt], prefix: str, rel: str) -> None:
        for node in body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if node.name.startswith("_"):
                continue
            if ast.get_docstring(node) is None:
                missing.append(f"{rel}:{node.lineno}: {prefix}{node.name}")
            if isinstance(node, ast.ClassDef):
                visit(node.body, f"{prefix}{node.name}.", rel)

    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        visit(tree.body, "", str(path.relative_to(root.parent)))
    return missing


def test_every_public_definition_has_a_docstring():
    missing = missing_docstrings(LIBRARY)
    assert not missing, "public definitions without a docstring:\n" + "\n".join(f"  {m}" for m in missing)


def test_the_check_sees_functions_methods_and_classes(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        'def f():\n    pass\n\n\ndef _private():\n    pass\n\n\n'
        'class A:\n    """Documented."""\n\n    def method(self):\n        def inner():\n            pass\n\n'
        '    def __init__(self):\n        pass\n\n    @property\n    def prop(self):\n        return 1\n\n\n'
        'class _Hidden:\n    def method(self):\n        pass\n\n\n'
        'class B:\n    def ok(self):\n        """Documented."""\n'
    )
    assert missing_docstrings(pkg) == ["pkg/m.py:1: f", "pkg/m.py:12: A.method", "pkg/m.py:20: A.prop",
                                       "pkg/m.py:29: B"]
