"""Test selection: every test under tests/distributed and tests/recipes starts real processes."""

from __future__ import annotations

from pathlib import Path

import pytest

MULTIPROCESS_DIRS = ("distributed", "recipes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent.name in MULTIPROCESS_DIRS:
            item.add_marker(pytest.mark.multiprocess)
