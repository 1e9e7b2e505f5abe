"""Data flows one way (shared/design.md): no module imports from a layer above it, at module level or inside a
function. Read from the source with ``ast``, so lazy imports count too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffgen"

#: package part (first component under ``diffgen``) -> the parts it must never import
FORBIDDEN = {
    "errors": ("tasks", "api", "cli"),
    "config": ("tasks", "api", "cli"),
    "io": ("tasks", "api", "cli"),
    "checkpoint_files": ("tasks", "api", "cli"),
    "devices": ("tasks", "api", "cli"),
    "data": ("tasks", "api", "cli"),
    "models": ("tasks", "api", "cli"),
    "diffusion": ("tasks", "api", "cli"),
    "eval": ("tasks", "api", "cli"),
    "tasks": ("cli", "api"),
    "api": ("cli",),
}


def imported_parts(path: Path) -> set[tuple[str, int]]:
    """``(part, line)`` for every ``diffgen.<part>`` a file imports (absolute imports; the package uses no others)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "diffgen" and len(parts) > 1:
                out.add((parts[1], node.lineno))
    return out


def test_the_rules_cover_every_part_of_the_package():
    parts = {p.stem for p in PACKAGE.iterdir() if (p.suffix == ".py" and p.stem != "__init__") or
             (p.is_dir() and (p / "__init__.py").exists())}
    assert parts - {"cli"} <= set(FORBIDDEN), parts - set(FORBIDDEN)


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_no_module_imports_a_layer_above_it(part):
    files = sorted((PACKAGE / part).rglob("*.py")) if (PACKAGE / part).is_dir() else [PACKAGE / f"{part}.py"]
    assert files
    bad = [f"{f.relative_to(PACKAGE.parent)}:{line} imports diffgen.{imp}"
           for f in files for imp, line in sorted(imported_parts(f)) if imp in FORBIDDEN[part]]
    assert not bad, "\n".join(bad)
