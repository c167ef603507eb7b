"""`MetaLearningLoop`: fit's training step becomes a G-Meta meta-step; evaluation adapts per task.

Lightning runs each training step through the strategy, inside the DDP (and TorchRec) wrapper's
forward, and then does backward, the optimizer step, ``global_step``, logging and checkpoints.
The loop installs its meta-step there, so all of that stays Lightning's own: one step is one
meta-batch, ``max_steps`` counts meta-batches, resume works as in any fit. Per meta-batch and
rank the step does:

1. one embedding lookup for the support and query rows of all its tasks together (with sharded
   tables: one input distribution and one output all-to-all forward, and one of each backward);
2. the inner loop on each task's support set, vectorised over tasks, entirely local;
3. one outer loss on the query sets, whose single backward updates the tables through their fused
   optimizer and all-reduces the dense gradients once.

Nothing in it depends on how many tasks a meta-batch holds or how many inner steps are taken.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torchmetrics.classification import BinaryAUROC
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_dembed.data.batch import TaskBatch
from lightning_dembed.meta.config import MetaLearningConfig
from lightning_dembed.meta.functional import InnerLearningRates, adapt_and_predict, meta_step
from lightning_dembed.sharding.planner import embedding_configs, find_embedding_modules

__all__ = ["MetaLearningLoop", "lookup_in_step"]

_STEPS = ("training_step", "validation_step", "test_step")


def lookup_in_step(module: nn.Module, features: KeyedJaggedTensor) -> torch.Tensor:
    """``module.embed(features)``, run in step with the other ranks whatever each one's row count.

    Sharded lookups exchange pooled rows between ranks (all-to-all, reduce-scatter), which needs
    one row count on all ranks; meta-batches of whole tasks differ in rows. Empty bags make up the
    difference (one scalar all-reduce per meta-batch, whatever its tasks) and are sliced off.
    """
    rows = features.stride()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return module.embed(features)
    most = torch.tensor([rows], device=features.values().device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    padding = int(most) - rows
    if padding:
        lengths = features.lengths().reshape(len(features.keys()), rows)
        lengths = torch.cat([lengths, lengths.new_zeros(lengths.shape[0], padding)], dim=1).reshape(-1)
        features = KeyedJaggedTensor(keys=features.keys(), values=features.values(), lengths=lengths)
    return module.embed(features)[:rows]


def _feature_names(module: nn.Module, batch: TaskBatch) -> list[str]:
    # The order of the looked-up [R, F, D] tensor: the module's, when it says (DLRM: its tables').
    return list(getattr(module, "feature_names", None) or batch.sparse_features.keys())


class MetaLearningLoop(Callback):
    """Optimization-based meta-learning (MAML family) in ``trainer.fit``.

    Install it on any Trainer in one line, ``Trainer(callbacks=[MetaLearningLoop(...)])`` (or in a
    recipe's YAML under ``trainer.callbacks``), and feed `TaskBatch` meta-batches. The module stays
    an ordinary model; it must provide:

    - ``embed(sparse_features: KeyedJaggedTensor) -> Tensor[R, F, D]``, the embedding lookup;
    - ``forward(dense_features, sparse_features)`` returning ``[R]`` logits, where
      ``sparse_features`` is a `KeyedJaggedTensor` or the looked-up ``[R, F, D]`` tensor.

    The loss is binary cross-entropy on click labels. The outer optimizer is the one
    ``configure_optimizers`` returns; embedding tables keep their fused optimizer. Validation and
    test adapt on each held-out task's support set and score its query set (cold start), with
    gradients enabled although Lightning evaluates under inference mode; they log query AUC and
    loss after adaptation and without it.

    Args:
        algorithm: ``"maml"`` (second order) or ``"fomaml"`` (first order).
        inner_steps: gradient steps on each support set.
        inner_lr: their learning rate (the initial one, with ``learn_inner_lr``).
        adapt: parameter-name prefixes that adapt in the inner loop (ANIL-style); by default the
            DLRM top MLP, as MeLU.
        learn_inner_lr: Meta-SGD: a learned inner learning rate per adapted weight (and per
            dimension of the embedding offsets), trained by the outer optimizer. The loop gives the
            module an `InnerLearningRates` as ``inner_lrs`` unless it has one.
        adapt_embeddings: feature names whose looked-up vectors get a per-task offset adapted in
            the inner loop (cold-start users or items); done locally, tables stay as they are.

    Example::

        trainer = Trainer(strategy="hybrid_parallel", devices=2, max_steps=1000,
                          callbacks=[MetaLearningLoop(inner_steps=2, inner_lr=0.1)])
        trainer.fit(model, datamodule=meta_data)   # meta_data yields TaskBatch
    """

    def __init__(
        self,
        algorithm: str = "maml",
        inner_steps: int = 1,
        inner_lr: float = 0.1,
        adapt: Sequence[str] = ("dlrm.over_arch",),
        learn_inner_lr: bool = False,
        adapt_embeddings: Sequence[str] = (),
    ) -> None:
        self.config = MetaLearningConfig(
            algorithm=algorithm,  # type: ignore[arg-type]
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            adapt=tuple(adapt),
            learn_inner_lr=learn_inner_lr,
            adapt_embeddings=tuple(adapt_embeddings),
        )
        self._module: Optional[LightningModule] = None
        self._auc: dict[str, dict[str, BinaryAUROC]] = {}

    # -- installation ----------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        missing = [name for name in ("embed",) if not callable(getattr(pl_module, name, None))]
        if missing:
            raise TypeError(
                f"MetaLearningLoop needs {type(pl_module).__name__} to define {missing}: embed(sparse_features) "
                "returning the looked-up [rows, features, dim] tensor, and forward(dense_features, sparse_features) "
                "accepting it in place of the KeyedJaggedTensor"
            )
        self._prepare_adaptation(pl_module)
        self._module = pl_module
        # Lightning resolves the step methods on the instance, inside the strategy's wrapped forward.
        pl_module.training_step = self._training_step  # type: ignore[method-assign]
        pl_module.validation_step = self._validation_step  # type: ignore[method-assign]
        pl_module.test_step = self._test_step  # type: ignore[method-assign]

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for name in _STEPS:
            pl_module.__dict__.pop(name, None)

    def _prepare_adaptation(self, module: LightningModule) -> None:
        names = [n for n, _ in module.named_parameters()]
        for prefix in self.config.adapt:
            if not any(MetaLearningConfig(adapt=(prefix,)).adapts(n) for n in names):
                raise ValueError(
                    f"adapt prefix {prefix!r} matches no parameter of {type(module).__name__}; "
                    f"top-level parameter groups are {sorted({n.split('.')[0] for n in names})}"
                )
        if not self.config.learn_inner_lr:
            return
        if getattr(module, "inner_lrs", None) is None:
            # Before sharding and configure_optimizers: the outer optimizer and DDP pick the rates up.
            module.inner_lrs = InnerLearningRates(module, self.config, embedding_dim=self._embedding_dim(module))
        if not isinstance(module.inner_lrs, InnerLearningRates):
            raise TypeError(
                f"learn_inner_lr (Meta-SGD): {type(module).__name__}.inner_lrs must be an InnerLearningRates, "
                f"got {type(module.inner_lrs).__name__}"
            )

    def _embedding_dim(self, module: LightningModule) -> Optional[int]:
        """The width of the features whose looked-up vectors adapt (their rates' width)."""
        if not self.config.adapt_embeddings:
            return None
        dims = {
            config.embedding_dim
            for m in find_embedding_modules(module).values()
            for config in embedding_configs(m)
            if set(config.feature_names) & set(self.config.adapt_embeddings)
        }
        if len(dims) != 1:
            raise ValueError(
                f"adapt_embeddings {list(self.config.adapt_embeddings)} must name features of tables of one "
                f"width; found widths {sorted(dims)}"
            )
        return dims.pop()

    # -- steps -----------------------------------------------------------------------------------

    def _adapt(self, function, batch: TaskBatch):
        """The one lookup of the meta-batch, then ``function`` (meta_step or adapt_and_predict) on it."""
        module = self._module
        assert module is not None
        return function(
            module,
            # Only what adapts is passed: the module's own parameters stand in for the rest.
            {n: p for n, p in module.named_parameters() if self.config.adapts(n)},
            batch.dense_features,
            lookup_in_step(module, batch.sparse_features),
            batch.labels,
            batch.task_offsets,
            batch.support_sizes,
            self.config,
            _feature_names(module, batch),
            inner_lrs=getattr(module, "inner_lrs", None) if self.config.learn_inner_lr else None,
        )

    def _training_step(self, batch: TaskBatch, batch_idx: int) -> torch.Tensor:
        module = self._module
        assert module is not None
        out = self._adapt(meta_step, batch)
        tasks = batch.num_tasks
        module.log("train/query_loss", out.query_loss, prog_bar=True, batch_size=tasks)
        module.log("train/support_loss", out.support_loss, batch_size=tasks)
        module.log("train/query_loss_unadapted", out.query_loss_unadapted, batch_size=tasks)
        # This rank's tasks; summing over ranks would cost an all-reduce every meta-batch.
        module.log("train/tasks_per_rank", float(tasks), batch_size=tasks)
        return out.query_loss

    def _evaluate(self, batch: TaskBatch, stage: str) -> None:
        module = self._module
        assert module is not None
        # Lightning evaluates under inference mode; adaptation needs autograd, on ordinary tensors.
        with torch.inference_mode(False), torch.enable_grad():
            result = self._adapt(adapt_and_predict, _plain_tensors(batch))
        aucs = self._metrics(stage, result.labels.device)
        aucs["adapted"].update(torch.sigmoid(result.adapted_logits), result.labels.long())
        aucs["unadapted"].update(torch.sigmoid(result.unadapted_logits), result.labels.long())
        rows = result.labels.numel()
        module.log(f"{stage}/query_loss_adapted", result.adapted_loss, sync_dist=True, batch_size=rows)
        module.log(f"{stage}/query_loss_unadapted", result.unadapted_loss, sync_dist=True, batch_size=rows)

    def _validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def _test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _metrics(self, stage: str, device: torch.device) -> dict[str, BinaryAUROC]:
        if stage not in self._auc:
            self._auc[stage] = {"adapted": BinaryAUROC().to(device), "unadapted": BinaryAUROC().to(device)}
        return self._auc[stage]

    def _log_auc(self, stage: str, pl_module: LightningModule) -> None:
        for kind, metric in self._auc.get(stage, {}).items():
            # compute() gathers every rank's scores: the AUC of all query rows, not a mean of ranks'.
            pl_module.log(f"{stage}/query_auc_{kind}", metric.compute(), sync_dist=True)
            metric.reset()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_auc("val", pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_auc("test", pl_module)


def _plain_tensors(batch: TaskBatch) -> TaskBatch:
    """Copies of inference-mode tensors, which autograd refuses to save."""

    def plain(t: torch.Tensor) -> torch.Tensor:
        return t.clone() if t.is_inference() else t

    kjt = batch.sparse_features
    return TaskBatch(
        dense_features=plain(batch.dense_features),
        sparse_features=KeyedJaggedTensor(keys=kjt.keys(), values=plain(kjt.values()), lengths=plain(kjt.lengths())),
        labels=plain(batch.labels),
        task_offsets=plain(batch.task_offsets),
        support_sizes=plain(batch.support_sizes),
        task_keys=plain(batch.task_keys),
    )

