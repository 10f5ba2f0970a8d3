"""Module boundaries: the library (``core``) and the dashboard never import the trainer, the
benchmarks or the tests, so each can be installed, imported and reviewed on its own."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Packages whose modules are checked, and the top-level packages they must not import.
CHECKED = ("core", "dashboard")
FORBIDDEN = ("train", "bench", "tests")


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, module)`` of every absolute import in a module, nested ones included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def offenders(package: str) -> list[str]:
    """``path:line imports module`` for each forbidden import under ``package``."""
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, module in imported_modules(tree):
            if module.split(".")[0] in FORBIDDEN:
                out.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return out


def test_core_and_dashboard_never_import_train_bench_or_tests():
    found = [o for package in CHECKED for o in offenders(package)]
    assert not found, "forbidden imports:\n" + "\n".join(found)


def test_the_check_sees_nested_and_from_imports():
    tree = ast.parse(
        "import os\nfrom train.uge import train_uge\n"
        "def f():\n    import bench.common\n    from . import sibling\n"
    )
    modules = [m for _, m in imported_modules(tree)]
    assert modules == ["os", "train.uge", "bench.common"]
