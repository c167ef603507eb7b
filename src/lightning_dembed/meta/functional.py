"""The MAML family as pure functions of a module and one meta-batch (no Lightning, no torch.distributed).

The embedding lookup has already happened: ``embedded`` holds the looked-up ``[R, F, D]`` vectors
of every row of every task, so the inner loop touches only local tensors. Per task, the adapted
parameters (and optional per-feature embedding offsets) take ``inner_steps`` gradient steps on the
support rows and are then scored on the query rows. Tasks run side by side under
``torch.func.vmap`` (rows padded to the longest task and masked); the outer loss stays
differentiable with respect to every parameter given and to ``embedded``, so a single backward
reaches the (possibly sharded) tables through their one lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn
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
    "vmap_refusal",
]

_State = dict  # {"params": {name: tensor}, "offsets": [A, D] tensor (only with adapt_embeddings)}
_Rows = tuple  # (dense, embedded, labels, mask), each with a leading task dimension when batched


class TaskIndex(NamedTuple):
    """Row indices of each task's support and query sets, padded to the longest set.

    Padding entries hold row 0 and are False in the masks.
    """

    support_index: Tensor
    support_mask: Tensor
    query_index: Tensor
    query_mask: Tensor


def task_index(task_offsets: Tensor, support_sizes: Tensor) -> TaskIndex:
    """Padded support and query row indices of a `TaskBatch` layout, without a loop over tasks.

    Args:
        task_offsets: ``[T + 1]`` first row of each task, then the row count.
        support_sizes: ``[T]`` support rows of each task (its first rows).

    Returns:
        ``(support_index [T, S], support_mask [T, S], query_index [T, Q], query_mask [T, Q])``
        with ``S`` and ``Q`` the largest support and query sets.

    Example::

        index = task_index(torch.tensor([0, 5, 9]), torch.tensor([3, 1]))
        index.support_index  # [[0, 1, 2], [5, 0, 0]]
        index.query_index    # [[3, 4, 0], [6, 7, 8]]
    """
    starts = task_offsets[:-1]
    query_sizes = task_offsets[1:] - starts - support_sizes
    if bool((support_sizes < 1).any()) or bool((query_sizes < 1).any()):
        raise ValueError(
            "every task needs at least one support row and one query row; "
            f"support sizes {support_sizes.tolist()}, "
            f"query sizes {query_sizes.tolist()}"
        )

    def padded(first: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
        steps = torch.arange(int(sizes.max()), device=sizes.device)
        mask = steps[None, :] < sizes[:, None]
        return torch.where(mask, first[:, None] + steps[None, :], 0), mask

    support_index, support_mask = padded(starts, support_sizes)
    query_index, query_mask = padded(starts + support_sizes, query_sizes)
    return TaskIndex(support_index, support_mask, query_index, query_mask)


def adapted_names(config: MetaLearningConfig, module: nn.Module) -> list[str]:
    """The ``named_parameters()`` names of ``module``'s parameters that ``config`` adapts.

    A parameter that two submodules share has a name under each, and ``named_parameters()``
    gives only the first: it adapts when any of its names matches ``config.adapt``.
    """
    matching = {id(p) for name, p in module.named_parameters(remove_duplicate=False) if config.adapts(name)}
    return [name for name, p in module.named_parameters() if id(p) in matching]


def _key(name: str) -> str:
    # ParameterDict keys cannot hold ".".
    return name.replace(".", "/")


class InnerLearningRates(nn.Module):
    """Meta-SGD's learned inner learning rates: one per adapted weight, plus one per embedding offset.

    Every rate tensor has the shape of what it updates and starts at ``config.inner_lr``. The
    user's module must own it as a submodule (for instance ``self.inner_lrs``, assigned after the
    adapted layers are built): then ``configure_optimizers``' ``self.parameters()`` includes the
    rates, the outer step learns them, and checkpoints hold them. Pass it to `meta_step` and
    `adapt_and_predict` as ``inner_lrs``.

    Args:
        module: the model; the rates cover its parameters that ``config.adapts``.
        config: which parameters and embedding offsets adapt, and the initial rate.
        embedding_dim: width ``D`` of the looked-up vectors; needed with ``config.adapt_embeddings``.

    Example::

        class Model(LightningModule):
            def __init__(self, config: MetaLearningConfig):
                super().__init__()
                ...  # tables, bottom MLP, over_arch
                self.inner_lrs = InnerLearningRates(self, config, embedding_dim=16)

        model.inner_lrs.rate("over_arch.0.weight").shape  # == model.over_arch[0].weight.shape
    """

    def __init__(
        self, module: nn.Module, config: MetaLearningConfig, embedding_dim: Optional[int] = None
    ) -> None:
        super().__init__()
        rates = {}
        adapted = set(adapted_names(config, module))
        for name, p in module.named_parameters():
            if name not in adapted:
                continue
            if p.is_meta:
                raise ValueError(
                    f"parameter {name!r} is on the meta device; build InnerLearningRates once the adapted "
                    "layers "
                    "hold real weights"
                )
            rates[_key(name)] = nn.Parameter(torch.full_like(p, config.inner_lr))
        if config.adapt and not rates:
            raise ValueError(
                f"adapt prefixes {list(config.adapt)} match no parameter of {type(module).__name__}"
            )
        self.rates = nn.ParameterDict(rates)
        self.embedding_offsets: Optional[nn.Parameter] = None
        if config.adapt_embeddings:
            if embedding_dim is None:
                raise ValueError("embedding_dim is needed to learn the rates of adapt_embeddings offsets")
            self.embedding_offsets = nn.Parameter(
                torch.full((len(config.adapt_embeddings), embedding_dim), config.inner_lr)
            )

    def rate(self, name: str) -> Tensor:
        """The learned rate of one adapted parameter, by its ``named_parameters()`` name."""
        key = _key(name)
        if key not in self.rates:
            raise KeyError(
                f"no learned inner rate for {name!r}; these rates cover "
                f"{[k.replace('/', '.') for k in self.rates]}"
            )
        return self.rates[key]


@dataclass
class MetaStepOutput:
    """Losses and query predictions of one meta-batch.

    Attributes:
        loss: the outer loss, to backpropagate: ``query_loss``, plus ``config.plain_loss_weight``
            times the shared model's mean BCE over every row of the meta-batch when that is set.
        query_loss: mean over tasks of each task's mean query BCE after adaptation.
            Differentiable with respect to the given parameters, ``embedded`` and the inner rates.
        query_logits_adapted: ``[N]`` detached logits of every query row after adaptation, in row
            order (task by task).
        query_labels: ``[N]`` their labels.
        support_loss: detached mean over tasks of the support loss at the last inner step (before
            its update; with ``inner_steps=1``, the loss before adaptation).
        query_loss_unadapted: the query loss of the shared parameters, not adapted (no gradient).
    """

    query_loss: Tensor
    query_logits_adapted: Tensor
    query_labels: Tensor
    support_loss: Tensor
    query_loss_unadapted: Tensor
    loss: Tensor


@dataclass
class AdaptResult:
    """Detached query predictions of every task, with and without adaptation (cold-start evaluation).

    Attributes:
        adapted_logits: ``[N]`` query-row logits after adapting on the task's support set.
        unadapted_logits: ``[N]`` the same rows scored by the shared parameters.
        labels: ``[N]`` their labels (row order: task by task).
        tasks: ``[N]`` the task of each row, its position ``0..T-1`` in the meta-batch.
        adapted_loss: mean over tasks of the mean query BCE after adaptation.
        unadapted_loss: the same without adaptation.
    """

    adapted_logits: Tensor
    unadapted_logits: Tensor
    labels: Tensor
    tasks: Tensor
    adapted_loss: Tensor
    unadapted_loss: Tensor


def _vmap_tasks(task: Callable) -> Callable:
    """``task`` over the leading (task) dimension; random ops (dropout) draw for each task apart,
    as they do when the tasks run one after another."""
    return vmap(task, randomness="different")


def _masked_bce(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Mean BCE over the rows where ``mask`` is set (along the last dimension)."""
    losses = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (losses * mask).sum(-1) / mask.sum(-1).clamp(min=1)


class _MetaBatch:
    """One meta-batch gathered task by task, and the per-task computation vmap runs."""

    def __init__(
        self,
        module: nn.Module,
        params: Mapping[str, Tensor],
        dense: Tensor,
        embedded: Tensor,
        labels: Tensor,
        task_offsets: Tensor,
        support_sizes: Tensor,
        config: MetaLearningConfig,
        feature_names: Sequence[str],
        inner_lrs: Optional[InnerLearningRates],
    ) -> None:
        if config.learn_inner_lr and inner_lrs is None:
            raise ValueError(
                "config.learn_inner_lr (Meta-SGD) needs inner_lrs, an InnerLearningRates the module owns"
            )
        if embedded.dim() != 3 or not (embedded.shape[0] == dense.shape[0] == labels.shape[0]):
            raise ValueError(
                f"expected embedded [R, F, D], dense [R, num_dense] and labels [R] over the same R rows; got "
                f"{list(embedded.shape)}, {list(dense.shape)}, {list(labels.shape)}"
            )
        self.module, self.config = module, config
        adapting = set(adapted_names(config, module))
        adapted = {n: p for n, p in params.items() if n in adapting}
        if config.adapt and not adapted:
            raise ValueError(
                f"adapt prefixes {list(config.adapt)} match none of the parameters given to the meta-step "
                f"(first names: {list(params)[:8]})"
            )
        self.fixed = {n: p for n, p in params.items() if n not in adapted}
        self.initial: _State = {"params": adapted}
        self.layout: Optional[Tensor] = None
        if config.adapt_embeddings:
            names = list(feature_names)
            missing = [f for f in config.adapt_embeddings if f not in names]
            if missing:
                raise ValueError(
                    f"adapt_embeddings names {missing}, which are not among the features {names}"
                )
            if len(names) != embedded.shape[1]:
                raise ValueError(
                    f"{len(names)} feature names for {embedded.shape[1]} looked-up features per row"
                )
            # [F, A] one-hot: scatters the A adapted offsets into a row's [F, D] layout by a matmul,
            # which vmap batches without an in-place write.
            self.layout = torch.zeros(
                len(names), len(config.adapt_embeddings), dtype=embedded.dtype, device=embedded.device
            )
            for column, feature in enumerate(config.adapt_embeddings):
                self.layout[names.index(feature), column] = 1.0
            self.initial["offsets"] = embedded.new_zeros(len(config.adapt_embeddings), embedded.shape[-1])
        self.rates = self._rates(inner_lrs if config.learn_inner_lr else None)

        self.index = task_index(task_offsets, support_sizes)
        mask_dtype = embedded.dtype
        si, qi = self.index.support_index, self.index.query_index
        self.support: _Rows = (dense[si], embedded[si], labels[si], self.index.support_mask.to(mask_dtype))
        self.query: _Rows = (dense[qi], embedded[qi], labels[qi], self.index.query_mask.to(mask_dtype))
        self.all_rows = (dense, embedded)

    def _rates(self, inner_lrs: Optional[InnerLearningRates]) -> dict:
        if inner_lrs is None:
            rates: dict = {"params": {n: self.config.inner_lr for n in self.initial["params"]}}
            if "offsets" in self.initial:
                rates["offsets"] = self.config.inner_lr
            return rates
        rates = {"params": {n: inner_lrs.rate(n) for n in self.initial["params"]}}
        if "offsets" in self.initial:
            if (
                inner_lrs.embedding_offsets is None
                or inner_lrs.embedding_offsets.shape != self.initial["offsets"].shape
            ):
                raise ValueError(
                    "inner_lrs has no embedding-offset rates of shape "
                    f"{list(self.initial['offsets'].shape)}; build it with the config's adapt_embeddings and "
                    "embedding_dim"
                )
            rates["offsets"] = inner_lrs.embedding_offsets
        return rates

    def logits(self, state: _State, dense: Tensor, embedded: Tensor) -> Tensor:
        if "offsets" in state:
            embedded = embedded + self.layout @ state["offsets"]
        return functional_call(self.module, {**self.fixed, **state["params"]}, (dense, embedded))

    def loss(self, state: _State, rows: _Rows) -> Tensor:
        dense, embedded, labels, mask = rows
        return _masked_bce(self.logits(state, dense, embedded), labels, mask)

    def _step(self, state: _State, grads: _State) -> _State:
        rates = self.rates
        new = {"params": {n: p - rates["params"][n] * grads["params"][n] for n, p in state["params"].items()}}
        if "offsets" in state:
            new["offsets"] = state["offsets"] - rates["offsets"] * grads["offsets"]
        return new

    def task(self, support: _Rows, query: _Rows) -> tuple[Tensor, Tensor, Tensor]:
        """One task: inner loop on its support rows; (query loss, last support loss, query logits)."""
        state = self.initial
        support_loss = None
        for _ in range(self.config.inner_steps):
            if self.config.first_order:
                # torch.func.grad computes its gradient whatever the grad mode; no_grad only keeps the
                # outer graph out of it, so the update depends on the originals by the identity path.
                with torch.no_grad():
                    grads, support_loss = grad_and_value(self.loss)(state, support)
            else:
                grads, support_loss = grad_and_value(self.loss)(state, support)
            state = self._step(state, grads)
        dense, embedded, labels, mask = query
        logits = self.logits(state, dense, embedded)
        return _masked_bce(logits, labels, mask), support_loss.detach(), logits

    def run(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every task: ``[T]`` query losses, ``[T]`` support losses, ``[T, Q]`` query logits."""
        # Chosen by the config (the loops probe it once, with `vmap_refusal`), never by catching
        # errors here: a failure (an out-of-memory included) is raised as it is.
        if self.config.vectorize:
            return _vmap_tasks(self.task)(self.support, self.query)
        return self._loop()

    def _loop(self) -> tuple[Tensor, Tensor, Tensor]:
        per_task = [
            self.task(tuple(x[t] for x in self.support), tuple(x[t] for x in self.query))
            for t in range(self.support[0].shape[0])
        ]
        return tuple(torch.stack(outputs) for outputs in zip(*per_task))  # type: ignore[return-value]

    def unadapted_query_logits(self) -> Tensor:
        """``[T, Q]`` query logits of the shared parameters: one forward over all rows, no graph."""
        with torch.no_grad():
            logits = self.logits(self.initial, *self.all_rows)
        return logits[self.index.query_index]


def meta_step(
    module: nn.Module,
    params: Mapping[str, Tensor],
    dense: Tensor,
    embedded: Tensor,
    labels: Tensor,
    task_offsets: Tensor,
    support_sizes: Tensor,
    config: MetaLearningConfig,
    feature_names: Sequence[str],
    inner_lrs: Optional[InnerLearningRates] = None,
) -> MetaStepOutput:
    """Adapt to every task of a meta-batch and return the outer (query) loss.

    For each task, ``config.inner_steps`` SGD steps on its support rows update the parameters that
    ``config.adapts`` (and the ``config.adapt_embeddings`` offsets), with ``config.inner_lr`` or
    the Meta-SGD rates of ``inner_lrs``; the adapted model then scores the task's query rows.
    ``module`` is only called through ``torch.func.functional_call(module, params, (dense, embedded))``.

    Args:
        module: the model; ``module(dense, embedded)`` returns ``[R]`` logits.
        params: the tensors to call it with, name -> tensor (typically
            ``dict(module.named_parameters())``); the module's own stand in for names left out.
        dense: ``[R, num_dense]`` dense features of every row.
        embedded: ``[R, F, D]`` looked-up sparse features (``module.embed``'s output).
        labels: ``[R]`` 0/1 labels.
        task_offsets: ``[T + 1]`` task boundaries over the rows.
        support_sizes: ``[T]`` support rows at the start of each task.
        config: the algorithm.
        feature_names: the ``F`` features in ``embedded``'s order (the KJT's), for ``adapt_embeddings``.
        inner_lrs: Meta-SGD's rates, with ``config.learn_inner_lr``.

    Returns:
        `MetaStepOutput`; ``loss.backward()`` gives the meta-gradient of every tensor in
        ``params``, of ``inner_lrs`` and of ``embedded`` (hence of the tables) in one backward.

    Example::

        embedded = model.embed(batch.sparse_features)          # the meta-batch's one lookup
        out = meta_step(model, dict(model.named_parameters()), batch.dense_features, embedded,
                        batch.labels, batch.task_offsets, batch.support_sizes, config,
                        batch.sparse_features.keys())
        out.loss.backward()
    """
    batch = _MetaBatch(
        module,
        params,
        dense,
        embedded,
        labels,
        task_offsets,
        support_sizes,
        config,
        feature_names,
        inner_lrs,
    )
    query_losses, support_losses, logits = batch.run()
    query_mask = batch.index.query_mask
    query_labels = batch.query[2]
    unadapted = _masked_bce(batch.unadapted_query_logits(), query_labels, batch.query[3])
    query_loss = query_losses.mean()
    loss = query_loss
    if config.plain_loss_weight:
        # The shared model on every row, as plain training sees them: one more forward, no lookup.
        plain_logits = batch.logits({"params": batch.initial["params"]}, *batch.all_rows)
        plain = nn.functional.binary_cross_entropy_with_logits(plain_logits, labels)
        loss = query_loss + config.plain_loss_weight * plain
    return MetaStepOutput(
        query_loss=query_loss,
        query_logits_adapted=logits.detach()[query_mask],
        query_labels=query_labels.detach()[query_mask],
        support_loss=support_losses.mean().detach(),
        query_loss_unadapted=unadapted.mean(),
        loss=loss,
    )


def _plain(t: Tensor) -> Tensor:
    # Tensors made under inference mode cannot be saved for backward: copy them out of it.
    return t.clone() if t.is_inference() else t


def _outside_inference(
    params: Mapping[str, Tensor], dense: Tensor, embedded: Tensor, labels: Tensor
) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
    """``params, dense, embedded, labels`` usable by autograd, copied where inference mode made them."""
    return {n: _plain(p) for n, p in params.items()}, _plain(dense), _plain(embedded), _plain(labels)


def adapt_and_predict(
    module: nn.Module,
    params: Mapping[str, Tensor],
    dense: Tensor,
    embedded: Tensor,
    labels: Tensor,
    task_offsets: Tensor,
    support_sizes: Tensor,
    config: MetaLearningConfig,
    feature_names: Sequence[str],
    inner_lrs: Optional[InnerLearningRates] = None,
) -> AdaptResult:
    """Cold-start evaluation: adapt on each task's support set, score its query set, with and without.

    Same arguments as `meta_step`. Safe to call from Lightning's evaluation loops: it works under
    ``torch.inference_mode`` and ``torch.no_grad`` (inputs made under inference mode are copied),
    builds no graph back to ``params`` or ``embedded``, and returns tensors that need no grad.

    Example::

        with torch.inference_mode():                      # as in validation_step
            embedded = model.embed(batch.sparse_features)
            result = adapt_and_predict(model, dict(model.named_parameters()), batch.dense_features,
                                       embedded, batch.labels, batch.task_offsets, batch.support_sizes,
                                       config, batch.sparse_features.keys())
        auc.update(torch.sigmoid(result.adapted_logits), result.labels.long())
    """
    # torch.func.grad differentiates whatever the grad mode, so under no_grad the adaptation is
    # the same and no outer graph (never backpropagated here) is built.
    with torch.inference_mode(False), torch.no_grad():
        batch = _MetaBatch(
            module,
            *_outside_inference(params, dense, embedded, labels),
            task_offsets,
            support_sizes,
            config,
            feature_names,
            inner_lrs,
        )
        query_losses, _, adapted = batch.run()
        unadapted = batch.unadapted_query_logits()
        _, _, query_labels, query_weights = batch.query
        mask = batch.index.query_mask
        return AdaptResult(
            adapted_logits=adapted[mask],
            unadapted_logits=unadapted[mask],
            labels=query_labels[mask],
            tasks=torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask],
            adapted_loss=query_losses.mean(),
            unadapted_loss=_masked_bce(unadapted, query_labels, query_weights).mean(),
        )


# What torch.func.vmap's own refusals (``.item()``, Python control flow on a tensor value, an
# in-place write it cannot batch) start with; tests/unit/test_meta_functional.py pins it.
VMAP_REFUSAL_PREFIX = "vmap:"


def vmap_refusal(
    module: nn.Module,
    params: Mapping[str, Tensor],
    dense: Tensor,
    embedded: Tensor,
    labels: Tensor,
    task_offsets: Tensor,
    support_sizes: Tensor,
    config: MetaLearningConfig,
    feature_names: Sequence[str],
    inner_lrs: Optional[InnerLearningRates] = None,
) -> Optional[str]:
    """Why ``torch.func.vmap`` cannot run the inner loop of ``module``, or None when it can.

    Runs the inner loop and query scoring of the meta-batch's first task once under vmap, as
    `meta_step` and `adapt_and_predict` would with ``config.vectorize``, without building an outer
    graph. Only vmap's own refusals are answered (a ``RuntimeError`` whose message starts with
    ``"vmap:"``: ``.item()``, Python control flow on a tensor value, an in-place write vmap cannot
    batch); any other error, an out-of-memory included, is raised as it is. Same arguments as
    `meta_step`; the loops call it once, on their first meta-batch, to choose ``config.vectorize``.

    Example::

        reason = vmap_refusal(model, dict(model.named_parameters()), dense, embedded, labels,
                              offsets, supports, config, features)
        config = dataclasses.replace(config, vectorize=reason is None)
    """
    first_task_rows = int(task_offsets[1])
    with torch.inference_mode(False), torch.no_grad():
        batch = _MetaBatch(
            module,
            *_outside_inference(
                params, dense[:first_task_rows], embedded[:first_task_rows], labels[:first_task_rows]
            ),
            task_offsets[:2],
            support_sizes[:1],
            config,
            feature_names,
            inner_lrs,
        )
        try:
            _vmap_tasks(batch.task)(batch.support, batch.query)
        except RuntimeError as error:
            if not str(error).startswith(VMAP_REFUSAL_PREFIX):
                raise
            return str(error)
    return None
