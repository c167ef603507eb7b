"""Knobs of the MAML family, validated once."""

from __future__ import annotations

import math
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
        inner_lr: their learning rate (with ``learn_inner_lr``: the initial value of every rate).
        adapt: prefixes of ``module.named_parameters()`` names that adapt in the inner loop; every
            other parameter is shared as is (ANIL when only the head adapts). A prefix matches at
            the root of a name or after any ``.``, so the default ``"over_arch"`` (the DLRM top
            MLP, which MeLU adapts) matches ``over_arch.0.weight`` and also
            ``dlrm.over_arch.model.0.weight``.
        learn_inner_lr: Meta-SGD: a learned learning rate per adapted weight, held by an
            `InnerLearningRates` the module owns.
        adapt_embeddings: features whose looked-up vectors get a per-task additive offset, adapted
            in the inner loop (one ``[D]`` offset per task and feature, shared by the task's rows):
            cold-start users or items. The tables themselves only change in the outer step.
        plain_loss_weight: weight of the shared (unadapted) model's loss on every row of the
            meta-batch, support and query, added to the outer loss. The query loss after adaptation
            alone teaches the tables only from query rows; this term lets every row teach them as
            plain training does, and keeps the shared model a good one for users alike.
        vectorize: run the tasks of a meta-batch side by side under ``torch.func.vmap`` (the
            default); ``False`` loops over them, for a ``forward`` that vmap cannot batch
            (Python control flow on tensor values, ``.item()``), which is slower. Fixed here for
            `meta_step` and `adapt_and_predict`: a vmap failure is raised as it is, never retried as
            a loop. The Lightning loops choose it once, before their first meta-step (`vmap_refusal`).

    Lists are accepted for ``adapt`` and ``adapt_embeddings`` (YAML gives lists) and kept as tuples.

    Example::

        config = MetaLearningConfig(algorithm="fomaml", inner_steps=3, inner_lr=0.05,
                                    adapt_embeddings=("user_id",))
        config.first_order            # True
        config.adapts("dlrm.over_arch.model.0.weight")  # True
    """

    algorithm: Literal["maml", "fomaml"] = "maml"
    inner_steps: int = 1
    inner_lr: float = 0.1
    adapt: tuple[str, ...] = ("over_arch",)
    learn_inner_lr: bool = False
    adapt_embeddings: tuple[str, ...] = ()
    plain_loss_weight: float = 0.0
    vectorize: bool = True

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if (
            isinstance(self.inner_steps, bool)
            or not isinstance(self.inner_steps, int)
            or self.inner_steps < 1
        ):
            raise ValueError(f"inner_steps must be an int >= 1, got {self.inner_steps!r}")
        if (
            isinstance(self.inner_lr, bool)
            or not isinstance(self.inner_lr, (int, float))
            or not math.isfinite(self.inner_lr)
            or self.inner_lr <= 0
        ):
            raise ValueError(f"inner_lr must be a finite number > 0, got {self.inner_lr!r}")
        if (
            isinstance(self.plain_loss_weight, bool)
            or not isinstance(self.plain_loss_weight, (int, float))
            or not 0 <= self.plain_loss_weight < math.inf
        ):
            raise ValueError(
                f"plain_loss_weight must be a finite number >= 0, got {self.plain_loss_weight!r}"
            )
        for flag in ("learn_inner_lr", "vectorize"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        for field in ("adapt", "adapt_embeddings"):
            value = getattr(self, field)
            # A bare string would silently iterate as single characters.
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise TypeError(f"{field} must be a tuple of names, got {value!r}")
            if not all(isinstance(v, str) and v for v in value):
                raise TypeError(f"{field} must hold non-empty strings, got {value!r}")
            if len(set(value)) != len(value):
                raise ValueError(f"{field} names something twice: {value!r}")
            object.__setattr__(self, field, tuple(value))
        if not self.adapt and not self.adapt_embeddings:
            raise ValueError(
                "adapt and adapt_embeddings are both empty: nothing would adapt in the inner loop"
            )

    @property
    def first_order(self) -> bool:
        """Whether the inner gradients are constants of the outer step (``algorithm="fomaml"``)."""
        return self.algorithm == "fomaml"

    def adapts(self, parameter_name: str) -> bool:
        """Whether a parameter, by its ``named_parameters()`` name, adapts in the inner loop."""
        dotted = "." + parameter_name + "."
        return any("." + prefix + "." in dotted for prefix in self.adapt)
