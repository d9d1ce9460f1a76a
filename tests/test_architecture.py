"""The package's shape (docs/architecture.md): imports run one way, and no module grows past 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PKG = ROOT / "ptq"
MAX_LINES = 400
#: Layers from the bottom up; a module may import its own layer and the ones below, never above.
LAYERS: list[tuple[str, ...]] = [
    ("ptq", "ptq.config", "ptq.naming", "ptq.atomic", "ptq.cache", "ptq.runtime", "ptq.rundir", "ptq.tracking"),
    ("ptq.data", "ptq.models", "ptq.quant"),
    ("ptq.runspec",),
    ("ptq.calib", "ptq.evaluate", "ptq.recon", "ptq.intexec"),
    ("ptq.pipeline",),
    ("ptq.main", "ptq.bench", "ptq.table", "ptq.sensitivity"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if module in names or any(module.startswith(n + ".") for n in names if n != "ptq"):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: place it in docs/architecture.md")


def _imports(path: Path) -> set[str]:
    """Every ptq module a file imports (at top level or inside functions)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ptq")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ptq") and node.level == 0:
            if node.module != "ptq":  # ``from ptq import naming`` imports ptq.naming, not the package's layer
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if (PKG.parent / node.module.replace(".", "/")
                                                                          / f"{a.name}.py").is_file()}
    return found


MODULES = sorted(p for p in PKG.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_only_run_downward(path: Path) -> None:
    me = _module_name(path)
    upward = [m for m in _imports(path) if _layer(m) > _layer(me)]
    assert not upward, f"{me} (layer {_layer(me)}) imports higher layers: {upward}"


def test_no_module_over_400_lines() -> None:
    long = {_module_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_layers_name_real_modules() -> None:
    names = {_module_name(p) for p in MODULES}
    for layer in LAYERS:
        for n in layer:
            assert n in names or any(m.startswith(n + ".") for m in names), n
