"""The torch / FBGEMM / TorchRec triple must be one release train; say which one before an import fails.

FBGEMM 1.X is built for torch 2.(X+5) and TorchRec 1.X for FBGEMM 1.X; any other pairing fails
deep inside ``import fbgemm_gpu`` with an undefined symbol, or later with wrong kernels.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Optional

__all__ = ["check_stack", "stack_mismatch"]

_FBGEMM_PACKAGES = ("fbgemm-gpu", "fbgemm-gpu-cpu", "fbgemm-gpu-genai")
_TORCH_MINUS_FBGEMM = 5


def _minor(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    if match is None:
        raise ValueError(f"not a version: {text!r}")
    return int(match.group(1)), int(match.group(2))


def _installed(name: str, lookup: Callable[[str], str]) -> Optional[str]:
    try:
        return lookup(name)
    except PackageNotFoundError:
        return None


def stack_mismatch(lookup: Callable[[str], str] = version) -> Optional[str]:
    """What is wrong with the installed triple, and the install line that fixes it; None if it matches."""
    torch_version = _installed("torch", lookup)
    fbgemm = next(((name, v) for name in _FBGEMM_PACKAGES if (v := _installed(name, lookup))), None)
    torchrec_version = _installed("torchrec", lookup)
    if torch_version is None or fbgemm is None or torchrec_version is None:
        missing = [n for n, v in (("torch", torch_version), ("fbgemm-gpu(-cpu)", fbgemm), ("torchrec", torchrec_version))
                   if v is None]
        return f"{', '.join(missing)} not installed"
    fbgemm_name, fbgemm_version = fbgemm
    torch_major, torch_minor = _minor(torch_version)
    wanted = torch_minor - _TORCH_MINUS_FBGEMM
    if torch_major != 2 or _minor(fbgemm_version) != (1, wanted) or _minor(torchrec_version) != (1, wanted):
        return (
            f"torch {torch_version}, {fbgemm_name} {fbgemm_version} and torchrec {torchrec_version} are not one "
            f"release train (FBGEMM 1.X is built for torch 2.(X+5), TorchRec 1.X for FBGEMM 1.X). For torch "
            f"{torch_major}.{torch_minor}: pip install '{fbgemm_name}==1.{wanted}.*' && pip install --no-deps "
            f"'torchrec==1.{wanted}.*'"
        )
    return None


def check_stack() -> None:
    """Raise ImportError naming the matching versions when the installed triple does not match."""
    problem = stack_mismatch()
    if problem is not None:
        raise ImportError(f"lightning-dembed: {problem}")
