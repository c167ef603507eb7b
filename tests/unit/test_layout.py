"""Imports flow one way, for every package and module of lightning_dembed.

Inside the package: `OURS` says which of our parts each part may import (itself always). Read
bottom-up: `_atomic`, `_private`, `_stack` and `metrics` import nothing of ours; `modules` <-
`sharding` <- `strategies` (with `checkpoint`); `data` stands on `_atomic` and `_private` only;
`meta` and `models` use `data`, `metrics` and `sharding`; `recipes`, `cli` and the package root may
use everything. Outside it: `THIRD_PARTY` names what a part must not import at all (user-facing
modules know nothing of torch.distributed or Lightning, sharding nothing of Lightning). A part
missing from `OURS` fails the test, so a new package or module states its place here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "src" / "lightning_dembed"
ROOT = "lightning_dembed"

OURS: dict[str, set[str]] = {
    "_atomic": set(),
    "_private": set(),
    "_stack": set(),
    "metrics": set(),
    "modules": set(),
    "sharding": {"_private", "modules"},
    "checkpoint": {"_atomic", "_private"},
    "strategies": {"_private", "checkpoint", "modules", "sharding"},
    "data": {"_atomic", "_private"},
    "meta": {"_private", "data", "metrics", "modules", "sharding"},
    "models": {"_private", "data", "meta", "metrics", "modules", "sharding"},
    "callbacks": {"sharding", "strategies"},
    "dry_run": {"_private", "data", "modules", "sharding"},
    "recipe": {"_private"},
    "recipes": {
        "_private", "callbacks", "data", "meta", "metrics", "models", "modules", "recipe", "sharding",
        "strategies",
    },
    "cli": {"*"},
    "__init__": {"*"},
}

THIRD_PARTY: dict[str, tuple[str, ...]] = {
    "modules": ("torch.distributed", "lightning", "torchrec.distributed"),
    "sharding": ("lightning",),
    "data": ("torchrec.distributed",),
    "checkpoint": ("lightning",),
    "metrics": ("lightning", "torch.distributed"),
    "_atomic": ("torch", "lightning", "torchrec"),
    "meta/functional.py": ("torch.distributed", "lightning"),
    "meta/config.py": ("torch", "lightning"),
    "data/batch.py": ("lightning", "torch.distributed"),
    "data/criteo.py": ("lightning", "torch.distributed"),
    "data/movielens.py": ("lightning", "torch", "datasets"),
    "data/task_store.py": ("lightning", "torch"),
}


def part_of(path: Path) -> str:
    """The part a file belongs to: its top-level package, or its own name for a top-level module."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def is_our_module(name: str) -> bool:
    if name.split(".")[0] != ROOT:
        return False
    where = PACKAGE.joinpath(*name.split(".")[1:])
    return where.is_dir() or where.with_suffix(".py").is_file()


def imported_names(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (lazy imports in functions too).

    ``from a import b`` counts as ``a.b`` where that is one of our modules (``from lightning_dembed
    import _atomic``), and as both ``a`` and ``a.b`` elsewhere (``from torch import distributed``).
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}:{node.lineno}: relative import; import from {ROOT}"
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                if node.module.split(".")[0] != ROOT:
                    names.update((node.module, child))
                else:
                    names.add(child if is_our_module(child) else node.module)
    return names


def our_parts(names: set[str]) -> set[str]:
    """The parts of ours among imported modules; the package root itself counts as ``__init__``."""
    return {name.split(".")[1] if "." in name else "__init__" for name in names if name.split(".")[0] == ROOT}


FILES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_part_has_a_place() -> None:
    parts = {part_of(path) for path in FILES}
    assert not parts - set(OURS), f"add {sorted(parts - set(OURS))} to OURS with what they may import"
    assert not set(OURS) - parts, f"OURS names parts that no longer exist: {sorted(set(OURS) - parts)}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_of_ours_flow_one_way(path: Path) -> None:
    part = part_of(path)
    allowed = OURS[part]
    if "*" in allowed:
        return
    wrong = our_parts(imported_names(path)) - allowed - {part}
    assert not wrong, (
        f"{path.relative_to(PACKAGE)} ({part}) imports {sorted(wrong)}; it may import {sorted(allowed)}"
    )


@pytest.mark.parametrize("target", list(THIRD_PARTY))
def test_forbidden_libraries(target: str) -> None:
    where = PACKAGE / target
    files = [where] if where.suffix == ".py" else sorted(where.rglob("*.py")) if where.is_dir() else [
        where.with_suffix(".py")
    ]
    for path in files:
        for name in imported_names(path):
            for forbidden in THIRD_PARTY[target]:
                assert not (name == forbidden or name.startswith(forbidden + ".")), (
                    f"{path.relative_to(PACKAGE)} imports {name}"
                )


def test_data_imports_without_hf_datasets() -> None:
    """HF ``datasets`` is imported only where a task store is built or loaded."""
    import subprocess
    import sys

    script = "import sys; sys.modules['datasets'] = None; import lightning_dembed.data; print('ok')"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
