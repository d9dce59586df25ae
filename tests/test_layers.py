"""Imports only go downwards: kernels <- diffusion <- models <- pipeline <- inference/train/eval/app."""
from __future__ import annotations

import ast

from conftest import ROOT

# Lower numbers are lower layers; a module may import its own layer and those below.
LAYERS = [
    ("ldm.errors", "ldm.prediction", "ldm._extension", "ldm.config", "ldm.cpu", "ldm.runtime",
     "ldm.bench"),
    ("ldm.kernels",),
    ("ldm.diffusion",),
    ("ldm.models", "ldm.data", "ldm.sd_yaml", "ldm.presets", "ldm.checkpoint"),
    ("ldm.pipeline",),
    ("ldm.inference", "ldm.train", "ldm.eval"),
    ("ldm.app",),
]


def layer(module: str) -> int | None:
    """The layer of an ldm module (None for ldm itself, the lazy top-level face)."""
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def imported_modules(tree: ast.AST) -> set[str]:
    """Every ldm module named by an import statement anywhere in the file (lazy ones too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.startswith("ldm.")}


def test_every_ldm_module_has_a_layer() -> None:
    unplaced = [p for p in (ROOT / "ldm").rglob("*.py")
                if p.name != "__init__.py" or p.parent != ROOT / "ldm"
                if layer(".".join(p.relative_to(ROOT).with_suffix("").parts)) is None]
    assert not unplaced, f"modules outside the layer table: {unplaced}"


def test_imports_only_go_down() -> None:
    upward = []
    for path in sorted((ROOT / "ldm").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = layer(module)
        if own is None:
            continue
        for name in imported_modules(ast.parse(path.read_text())):
            target = layer(name)
            if target is not None and target > own:
                upward.append(f"{module} imports {name}")
    assert not upward, "upward imports: " + "; ".join(upward)
