"""The packages of minisgl import one way, top to bottom (docs/architecture.md, "Import order").

Every import counts, at module level or inside a function, TYPE_CHECKING blocks included: a lazy import still
ties the lower package to the higher one's code.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minisgl"

# Top to bottom. A package may import packages on its own row or below it; no two packages import each other.
ORDER = [
    {"__init__", "__main__", "server", "llm"},
    {"tokenizer", "message"},
    {"scheduler"},
    {"grammar"},
    {"engine"},
    {"models"},
    {"layers"},
    {"attention", "quant", "kvcache"},
    {"distributed"},
    {"kernels"},
    {"core", "sampling_params"},
]
LEVEL = {name: i for i, row in enumerate(ORDER) for name in row}


def _package_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def _imports() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) package pairs, with where each import is."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _package_of(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "minisgl" and len(parts) > 1 and parts[1] != importer:
                    where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                    found.setdefault((importer, parts[1]), []).append(where)
    return found


def test_every_package_has_a_place_in_the_order():
    packages = {_package_of(p) for p in PACKAGE.rglob("*.py")}
    assert packages - LEVEL.keys() == set(), "add new packages to ORDER here and in docs/architecture.md"


def test_no_package_imports_a_higher_one():
    upward = [
        f"{low} imports {high}: {', '.join(where)}"
        for (low, high), where in _imports().items()
        if LEVEL.get(high, -1) < LEVEL.get(low, -1)
    ]
    assert upward == []


def test_no_two_packages_import_each_other():
    pairs = _imports()
    cycles = [f"{a} <-> {b}: {pairs[a, b]} / {pairs[b, a]}" for a, b in pairs if a < b and (b, a) in pairs]
    assert cycles == []
