"""The torch / FBGEMM / TorchRec check names the matching versions."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError

import pytest

from lightning_dembed._stack import stack_mismatch


def lookup(installed: dict[str, str]):
    def version(name: str) -> str:
        if name not in installed:
            raise PackageNotFoundError(name)
        return installed[name]

    return version


def test_the_installed_stack_matches() -> None:
    assert stack_mismatch() is None


@pytest.mark.parametrize(
    ("installed", "message"),
    [
        ({"torch": "2.13.0+cpu", "fbgemm-gpu-cpu": "1.8.0", "torchrec": "1.8.0"}, None),
        ({"torch": "2.11.0", "fbgemm-gpu": "1.6.0", "torchrec": "1.6.1"}, None),
        ({"torch": "2.13.0", "fbgemm-gpu-cpu": "1.9.0", "torchrec": "1.8.0"},
         "pip install 'fbgemm-gpu-cpu==1.8.*' && pip install --no-deps 'torchrec==1.8.*'"),
        ({"torch": "2.14.0", "fbgemm-gpu": "1.8.0", "torchrec": "1.8.0"}, "'fbgemm-gpu==1.9.*'"),
        ({"torch": "2.13.0", "torchrec": "1.8.0"}, "fbgemm-gpu(-cpu) not installed"),
    ],
)
def test_mismatches_name_the_fix(installed: dict[str, str], message: str | None) -> None:
    problem = stack_mismatch(lookup(installed))
    if message is None:
        assert problem is None
    else:
        assert message in problem
