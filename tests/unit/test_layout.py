"""Imports flow one way: user-facing modules know nothing of sharding, sharding nothing of Lightning."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "src" / "lightning_dembed"

FORBIDDEN = {
    "modules": ("torch.distributed", "lightning", "lightning_dembed.sharding", "lightning_dembed.strategies",
                "torchrec.distributed"),
    "sharding": ("lightning", "lightning_dembed.strategies", "lightning_dembed.meta", "lightning_dembed.models"),
    "meta/functional.py": ("torch.distributed", "lightning"),
    "meta/config.py": ("torch", "lightning"),
}


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("part", list(FORBIDDEN))
def test_import_direction(part: str) -> None:
    target = PACKAGE / part
    files = [target] if target.suffix == ".py" else sorted(target.rglob("*.py"))
    for path in files:
        for name in imports(path):
            for forbidden in FORBIDDEN[part]:
                assert not (name == forbidden or name.startswith(forbidden + ".")), f"{path.name} imports {name}"
