"""The optimizer the embedding tables train with: FBGEMM's fused, in-backward kernels.

Sharded tables are updated inside the backward pass by FBGEMM (no gradient for a table is ever
materialised), so the optimizer ``configure_optimizers`` returns is translated into its fused
equivalent and attached to the tables before sharding, where TorchRec picks it up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from torchrec import optim as trec_optim
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

from lightning_dembed.sharding.planner import find_embedding_modules

__all__ = ["EmbeddingOptimizer", "apply_embedding_optimizer", "dense_parameters", "first_optimizer"]

# Hyper-parameters FBGEMM's fused kernels implement, per optimizer class, and the values of the
# ones they do not implement that are harmless (the class defaults).
_FUSED: dict[type, tuple[tuple[str, ...], dict[str, Any], float]] = {
    # class: (passed through, must equal, optimizer state per table element)
    torch.optim.SGD: (("lr", "weight_decay"), {"momentum": 0, "nesterov": False}, 0.0),
    torch.optim.Adagrad: (("lr", "eps", "weight_decay"), {"lr_decay": 0, "initial_accumulator_value": 0}, 1.0),
    torch.optim.Adam: (("lr", "betas", "eps", "weight_decay"), {"amsgrad": False}, 2.0),
    trec_optim.RowWiseAdagrad: (("lr", "eps", "weight_decay"), {}, 0.0),
}
_GPU_ONLY = {torch.optim.Adam}
_NAMES = "torch.optim.SGD (no momentum), torch.optim.Adagrad, torch.optim.Adam (GPU), torchrec.optim.RowWiseAdagrad"


@dataclass(frozen=True)
class EmbeddingOptimizer:
    """An optimizer class and hyper-parameters that FBGEMM can run fused in the backward pass.

    Args:
        optimizer_class: ``torch.optim.SGD``, ``torch.optim.Adagrad``, ``torch.optim.Adam`` (GPU only)
            or ``torchrec.optim.RowWiseAdagrad``.
        kwargs: its hyper-parameters, e.g. ``{"lr": 0.01}``.

    Example::

        EmbeddingOptimizer(torch.optim.Adagrad, {"lr": 0.05, "eps": 1e-8})
        EmbeddingOptimizer.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    """

    optimizer_class: type
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.optimizer_class not in _FUSED:
            raise ValueError(
                f"{getattr(self.optimizer_class, '__name__', self.optimizer_class)} has no fused FBGEMM equivalent "
                f"for the embedding tables; use one of {_NAMES}, or pass "
                "HybridParallelStrategy(embedding_optimizer=EmbeddingOptimizer(...)) to train the tables with one"
            )
        passed, required, _ = _FUSED[self.optimizer_class]
        for key, value in self.kwargs.items():
            if key in required and value != required[key]:
                raise ValueError(
                    f"{self.optimizer_class.__name__}({key}={value!r}) cannot be fused for the embedding tables "
                    f"(FBGEMM supports {key}={required[key]!r}); pass embedding_optimizer= to the strategy"
                )
            if key not in passed and key not in required:
                raise ValueError(
                    f"{self.optimizer_class.__name__}: hyper-parameter {key!r} is not supported by FBGEMM's fused "
                    f"kernel; supported: {passed}"
                )

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> "EmbeddingOptimizer":
        """The fused twin of an optimizer built by ``configure_optimizers`` (its class and defaults)."""
        opt_cls = type(optimizer)
        if opt_cls not in _FUSED:
            cls(opt_cls)  # raises with the list of alternatives
        passed, required, _ = _FUSED[opt_cls]
        kwargs = {k: v for k, v in optimizer.defaults.items() if k in passed}
        kwargs.update({k: optimizer.defaults[k] for k in required if k in optimizer.defaults})
        return cls(opt_cls, kwargs)

    @property
    def state_factor(self) -> float:
        """Optimizer state per table element (Adagrad keeps one accumulator per weight)."""
        return _FUSED[self.optimizer_class][2]

    def check_device(self, device: torch.device) -> None:
        if self.optimizer_class in _GPU_ONLY and device.type != "cuda":
            raise ValueError(
                f"FBGEMM has no fused {self.optimizer_class.__name__} on {device.type}; for the embedding tables use "
                "torch.optim.Adagrad, torchrec.optim.RowWiseAdagrad or torch.optim.SGD "
                "(HybridParallelStrategy(embedding_optimizer=...))"
            )

    def fused_kwargs(self) -> dict[str, Any]:
        passed, _, _ = _FUSED[self.optimizer_class]
        return {k: v for k, v in self.kwargs.items() if k in passed}


def first_optimizer(configured: Any) -> torch.optim.Optimizer:
    """The first optimizer in anything ``configure_optimizers`` may return."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict) and "optimizer" in configured:
        return first_optimizer(configured["optimizer"])
    if isinstance(configured, (list, tuple)) and configured:
        return first_optimizer(configured[0])
    raise ValueError(
        "configure_optimizers returned no optimizer to derive the embedding optimizer from; pass "
        "HybridParallelStrategy(embedding_optimizer=EmbeddingOptimizer(...))"
    )


def apply_embedding_optimizer(modules: Iterable[nn.Module], optimizer: EmbeddingOptimizer) -> None:
    """Attach ``optimizer`` to every table of ``modules`` so TorchRec shards them with fused kernels."""
    params = [p for module in modules for p in module.parameters()]
    if params:
        apply_optimizer_in_backward(optimizer.optimizer_class, params, optimizer.fused_kwargs())


def dense_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters a dense optimizer should get: all but the embedding tables'.

    Tables train with their fused optimizer, so an optimizer built over ``self.parameters()``
    only wastes what it allocates for them up front (``torch.optim.Adagrad`` allocates a full copy
    of every table shard, dropped again by the strategy). Works before and after sharding.

    Example::

        def configure_optimizers(self):
            return torch.optim.Adagrad(dense_parameters(self), lr=0.01)  # tables: fused Adagrad, lr 0.01
    """
    tables = {id(p) for m in find_embedding_modules(module).values() for p in m.parameters()}
    return [p for _, p in in_backward_optimizer_filter(module.named_parameters()) if id(p) not in tables]
