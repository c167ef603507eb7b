"""The MAML family as pure functions of a module and one meta-batch (no Lightning, no torch.distributed).

The embedding lookup has already happened (``embedded`` holds every row of every task), so the
inner loop touches only local tensors: per task, the adapted parameters are updated by gradient
steps on the support rows, then scored on the query rows. The tasks are vectorised with
``torch.func.vmap``; the outer loss stays differentiable with respect to every parameter of the
module and to ``embedded``, so one backward reaches the (possibly sharded) tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from lightning_dembed.meta.config import MetaLearningConfig

__all__ = [
    "AdaptResult",
    "InnerLearningRates",
    "MetaStepOutput",
    "TaskIndex",
    "adapt_and_predict",
    "meta_step",
    "task_index",
]

_OFFSET = "__embedding_offset__"


@dataclass
class TaskIndex:
    """Row indices of each task's support and query sets, padded to the longest (mask False)."""

    support_index: torch.Tensor
    support_mask: torch.Tensor
    query_index: torch.Tensor
    query_mask: torch.Tensor


def task_index(task_offsets: torch.Tensor, support_sizes: torch.Tensor) -> TaskIndex:
    """Padded ``[T, S]`` support and ``[T, Q]`` query row indices of a `TaskBatch` layout."""
    starts = task_offsets[:-1]
    query_sizes = task_offsets[1:] - starts - support_sizes
    if bool((support_sizes < 1).any()) or bool((query_sizes < 1).any()):
        raise ValueError("every task needs at least one support row and one query row")

    def padded(first: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        steps = torch.arange(int(sizes.max()), device=sizes.device)
        mask = steps[None, :] < sizes[:, None]
        return torch.where(mask, first[:, None] + steps[None, :], 0), mask

    support_index, support_mask = padded(starts, support_sizes)
    query_index, query_mask = padded(starts + support_sizes, query_sizes)
    return TaskIndex(support_index, support_mask, query_index, query_mask)


def _key(name: str) -> str:
    return name.replace(".", "/")


class InnerLearningRates(nn.Module):
    """Meta-SGD's learned inner learning rates: one per adapted weight (and embedding offset).

    The user's module owns it (as ``inner_lrs``), so the outer optimizer trains it and checkpoints
    hold it.

    Args:
        module: the model whose parameters adapt.
        config: says which parameters adapt and the initial learning rate.
        embedding_dim: width of the looked-up vectors, when ``config.adapt_embeddings`` is set.

    Example::

        self.inner_lrs = InnerLearningRates(self, MetaLearningConfig(learn_inner_lr=True), embedding_dim=16)
    """

    def __init__(self, module: nn.Module, config: MetaLearningConfig, embedding_dim: int = 0) -> None:
        super().__init__()
        self.lrs = nn.ParameterDict(
            {
                _key(name): nn.Parameter(torch.full_like(p, config.inner_lr, device=p.device))
                for name, p in module.named_parameters()
                if config.adapts(name) and not p.is_meta
            }
        )
        if config.adapt_embeddings:
            self.lrs[_key(_OFFSET)] = nn.Parameter(
                torch.full((len(config.adapt_embeddings), embedding_dim), config.inner_lr)
            )

    def forward(self, name: str) -> torch.Tensor:
        return self.lrs[_key(name)]


@dataclass
class MetaStepOutput:
    """Losses of one meta-batch. ``query_loss`` is the outer loss (mean over tasks)."""

    query_loss: torch.Tensor
    support_loss: torch.Tensor
    query_loss_unadapted: torch.Tensor


@dataclass
class AdaptResult:
    """Query-set predictions of every task, after adaptation and without it, flattened over rows."""

    adapted_logits: torch.Tensor
    unadapted_logits: torch.Tensor
    labels: torch.Tensor
    adapted_loss: torch.Tensor
    unadapted_loss: torch.Tensor


def _masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    losses = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (losses * mask).sum() / mask.sum().clamp(min=1)


class _Tasks:
    """One meta-batch's tensors gathered per task, and the functions vmap runs on them."""

    def __init__(
        self,
        module: nn.Module,
        dense: torch.Tensor,
        embedded: torch.Tensor,
        labels: torch.Tensor,
        task_offsets: torch.Tensor,
        support_sizes: torch.Tensor,
        config: MetaLearningConfig,
        feature_names: Sequence[str],
        inner_lrs: Optional[InnerLearningRates],
    ) -> None:
        self.module, self.config, self.inner_lrs = module, config, inner_lrs
        index = task_index(task_offsets, support_sizes)
        self.support = (dense[index.support_index], embedded[index.support_index],
                        labels[index.support_index], index.support_mask.to(labels.dtype))
        self.query = (dense[index.query_index], embedded[index.query_index],
                      labels[index.query_index], index.query_mask.to(labels.dtype))
        self.query_mask = index.query_mask
        missing = [f for f in config.adapt_embeddings if f not in feature_names]
        if missing:
            raise ValueError(f"adapt_embeddings names {missing}, which are not among the features {list(feature_names)}")
        positions = [list(feature_names).index(f) for f in config.adapt_embeddings]
        # Scatters the per-feature offsets into the [F, D] layout of a looked-up row.
        self.offset_layout = torch.zeros(len(feature_names), len(positions), device=embedded.device)
        self.offset_layout[positions, list(range(len(positions)))] = 1.0
        self.params = {name: p for name, p in module.named_parameters() if config.adapts(name)}
        if config.adapt_embeddings:
            self.params[_OFFSET] = torch.zeros(len(positions), embedded.shape[-1], device=embedded.device)

    def logits(self, params: dict[str, torch.Tensor], dense: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        weights = dict(params)
        offset = weights.pop(_OFFSET, None)
        if offset is not None:
            embedded = embedded + (self.offset_layout @ offset)[None]
        return functional_call(self.module, weights, (dense, embedded))

    def loss(self, params: dict[str, torch.Tensor], rows: tuple[torch.Tensor, ...]) -> torch.Tensor:
        dense, embedded, labels, mask = rows
        return _masked_bce(self.logits(params, dense, embedded), labels, mask)

    def adapt(self, rows: tuple[torch.Tensor, ...]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Inner loop on one task's support rows; returns the adapted params and the last support loss."""
        params = self.params
        support_loss = torch.zeros(())  # replaced by the first step (inner_steps >= 1)
        for _ in range(self.config.inner_steps):
            grads, support_loss = grad_and_value(self.loss)(params, rows)
            if self.config.first_order:
                # Inner gradients are constants: only the identity path reaches the originals.
                grads = {n: g.detach() for n, g in grads.items()}
            params = {
                n: p - (self.inner_lrs(n) if self.inner_lrs is not None else self.config.inner_lr) * grads[n]
                for n, p in params.items()
            }
        return params, support_loss.detach()

    def task_outputs(self, support: tuple[torch.Tensor, ...], query: tuple[torch.Tensor, ...]):
        adapted, support_loss = self.adapt(support)
        dense, embedded, labels, mask = query
        adapted_logits = self.logits(adapted, dense, embedded)
        unadapted_logits = self.logits(self.params, dense, embedded)
        return (
            _masked_bce(adapted_logits, labels, mask),
            support_loss,
            _masked_bce(unadapted_logits, labels, mask),
            adapted_logits,
            unadapted_logits,
        )

    def run(self):
        return vmap(self.task_outputs)(self.support, self.query)


def meta_step(
    module: nn.Module,
    dense: torch.Tensor,
    embedded: torch.Tensor,
    labels: torch.Tensor,
    task_offsets: torch.Tensor,
    support_sizes: torch.Tensor,
    config: MetaLearningConfig,
    feature_names: Sequence[str],
    inner_lrs: Optional[InnerLearningRates] = None,
) -> MetaStepOutput:
    """Adapt to every task of a meta-batch and return the outer (query) loss.

    ``module(dense, embedded)`` must return per-row logits. ``query_loss`` is differentiable with
    respect to every parameter of ``module`` (and of ``inner_lrs``) and to ``embedded``: one
    backward gives the meta-gradient.
    """
    tasks = _Tasks(module, dense, embedded, labels, task_offsets, support_sizes, config, feature_names, inner_lrs)
    query_losses, support_losses, unadapted_losses, _, _ = tasks.run()
    return MetaStepOutput(query_losses.mean(), support_losses.mean().detach(), unadapted_losses.mean().detach())


def adapt_and_predict(
    module: nn.Module,
    dense: torch.Tensor,
    embedded: torch.Tensor,
    labels: torch.Tensor,
    task_offsets: torch.Tensor,
    support_sizes: torch.Tensor,
    config: MetaLearningConfig,
    feature_names: Sequence[str],
    inner_lrs: Optional[InnerLearningRates] = None,
) -> AdaptResult:
    """Cold-start evaluation: adapt on each support set, predict its query set (with and without)."""
    with torch.enable_grad():
        tasks = _Tasks(module, dense, embedded, labels, task_offsets, support_sizes, config, feature_names, inner_lrs)
        query_losses, _, unadapted_losses, adapted, unadapted = tasks.run()
    valid = tasks.query_mask
    return AdaptResult(
        adapted_logits=adapted[valid].detach(),
        unadapted_logits=unadapted[valid].detach(),
        labels=tasks.query[2][valid].detach(),
        adapted_loss=query_losses.mean().detach(),
        unadapted_loss=unadapted_losses.mean().detach(),
    )
