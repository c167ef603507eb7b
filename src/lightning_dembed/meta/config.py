"""Knobs of the MAML family, validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["MetaLearningConfig"]

ALGORITHMS = ("maml", "fomaml")


@dataclass(frozen=True)
class MetaLearningConfig:
    """Which meta-learning algorithm runs, and how.

    Args:
        algorithm: ``"maml"`` differentiates through the inner loop (second order); ``"fomaml"``
            treats the inner gradients as constants (first order).
        inner_steps: gradient steps on each task's support set.
        inner_lr: their learning rate (Meta-SGD: the initial value of every learned rate).
        adapt: parameter-name prefixes that adapt in the inner loop; the rest is shared as is
            (ANIL when only the head adapts).
        learn_inner_lr: Meta-SGD, a learned learning rate per adapted weight.
        adapt_embeddings: features whose looked-up vectors get a per-task additive offset adapted
            in the inner loop (one offset per task and feature, shared by the task's rows).

    Example::

        MetaLearningConfig(algorithm="fomaml", inner_steps=3, inner_lr=0.05, adapt=("dlrm.over_arch",))
    """

    algorithm: Literal["maml", "fomaml"] = "maml"
    inner_steps: int = 1
    inner_lr: float = 0.1
    adapt: tuple[str, ...] = ("dlrm.over_arch",)
    learn_inner_lr: bool = False
    adapt_embeddings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, int) or self.inner_steps < 1:
            raise ValueError(f"inner_steps must be an int >= 1, got {self.inner_steps!r}")
        if not isinstance(self.inner_lr, (int, float)) or self.inner_lr <= 0:
            raise ValueError(f"inner_lr must be a positive number, got {self.inner_lr!r}")
        if not self.adapt and not self.adapt_embeddings:
            raise ValueError("adapt and adapt_embeddings are both empty: nothing would adapt in the inner loop")
        for name, value in (("adapt", self.adapt), ("adapt_embeddings", self.adapt_embeddings)):
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"{name} must be a sequence of names, got {value!r}")

    @property
    def first_order(self) -> bool:
        return self.algorithm == "fomaml"

    def adapts(self, parameter_name: str) -> bool:
        """Whether a parameter (by its ``named_parameters`` name) adapts in the inner loop."""
        return any(parameter_name == p or parameter_name.startswith(p + ".") for p in self.adapt)
