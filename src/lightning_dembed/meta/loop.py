"""`MetaLearningLoop`: fit's optimization loop with a G-Meta meta-step; evaluation adapts per task.

Lightning's automatic optimization loop runs each training step through the strategy, inside the
DDP (and TorchRec) wrapper's forward, and then does backward, the optimizer step, ``global_step``,
logging and checkpoints. `MetaLearningLoop` puts a subclass of it in the fit loop's place for the
run, whose training step is the meta-step, so all of that stays Lightning's own: one step is one
meta-batch, ``max_steps`` counts meta-batches, resume works as in any fit. Every private Lightning
symbol it touches is in `lightning_dembed._private`. Per meta-batch and rank the step does:

1. one embedding lookup for the support and query rows of all its tasks together (with sharded
   tables: one input distribution and one output all-to-all forward, and one of each backward);
2. the inner loop on each task's support set, entirely local, vectorised over tasks when vmap can
   batch the module's forward (decided once per run, before the first meta-step);
3. one outer loss on the query sets, whose single backward updates the tables through their fused
   optimizer and all-reduces the dense gradients once.

Nothing in it depends on how many tasks a meta-batch holds or how many inner steps are taken.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import BinaryAUROC
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_dembed._private import AutomaticOptimization, swap_automatic_optimization
from lightning_dembed.data.batch import TaskBatch
from lightning_dembed.meta.config import MetaLearningConfig
from lightning_dembed.meta.functional import (
    InnerLearningRates, adapt_and_predict, adapted_names, meta_step, vmap_refusal,
)
from lightning_dembed.metrics import NormalizedEntropy, grouped_auroc
from lightning_dembed.modules.discovery import embedding_configs, find_embedding_modules

__all__ = ["ColdStartEvaluation", "MetaLearningLoop"]

_BATCH_NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d,
)


@contextmanager
def _step_bound(module: nn.Module, name: str, step: Callable) -> Iterator[None]:
    """``module.<name>`` is ``step`` inside the block; after it, the instance is exactly as before.

    Lightning resolves a step method on the instance, from inside the strategy (and, with a DDP
    wrapper, from inside the wrapper's forward, which its forward redirection binds the same way).
    """
    had, previous = name in vars(module), vars(module).get(name)
    vars(module)[name] = step
    try:
        yield
    finally:
        if had:
            vars(module)[name] = previous
        else:
            del vars(module)[name]


class ColdStartEvaluation(Callback):
    """Cold-start validation and test for any model: adapt on each held-out task's support set.

    Validation and test batches are `TaskBatch` meta-batches of held-out tasks (users never seen
    in training). Each task's query rows are scored by the model as it is (``unadapted``) and after
    ``inner_steps`` gradient steps on the task's support rows (``adapted``): the same inner loop
    (`adapt_and_predict`) that `MetaLearningLoop` meta-trains. On a model trained without
    meta-learning, ``adapted`` is the practitioners' baseline: plain training, then fine-tuning on
    each new user's first interactions. Logged per stage (``val``, ``test``):
    ``query_auc_adapted``, ``query_auc_unadapted`` (AUC over every query row of every rank),
    ``query_user_auc_adapted``, ``query_user_auc_unadapted`` (each task's own query AUC, averaged
    over the tasks whose query rows hold both labels: every user weighs alike, where the pooled AUC
    leans on the users with the most rows),
    ``query_ne_adapted``, ``query_ne_unadapted`` (normalized entropy over the same rows: log loss
    over the entropy of their click rate), ``query_loss_adapted``, ``query_loss_unadapted`` (mean
    over tasks of the query log loss).

    Training is left to the module: install it with plain training batches and cold-start
    evaluation batches (`TaskDataModule` with ``as_tasks=False, eval_as_tasks=True``). The module
    must provide ``embed`` and accept its output in ``forward``, as for `MetaLearningLoop`, and
    define the ``validation_step`` / ``test_step`` Lightning looks for: while a batch is evaluated
    (from ``on_{validation,test}_batch_start`` to ``..._batch_end``), the module's step method is
    this callback's, bound on the instance for that batch only and removed when it ends or fails.
    Evaluation adapts with gradients enabled although Lightning evaluates under inference mode.

    Args:
        inner_steps: gradient steps on each support set.
        inner_lr: their learning rate.
        adapt: parameter-name prefixes that adapt (fine-tune); by default the DLRM top MLP.
        adapt_embeddings: feature names whose looked-up vectors get a per-task offset, adapted too;
            the module must then name its features in order (``feature_names``).
        vectorize: adapt the tasks side by side under ``torch.func.vmap`` (``True``) or one after
            another (``False``, for a ``forward`` vmap cannot batch). ``None`` (the default) decides
            once per run, on the first meta-batch, by running one task under vmap (`vmap_refusal`),
            and logs the choice and its reason; a vmap failure after that is raised as it is.

    Example::

        trainer = Trainer(callbacks=[ColdStartEvaluation(inner_steps=5, inner_lr=0.1)])
        trainer.fit(dlrm, datamodule=TaskDataModule(as_tasks=False, eval_as_tasks=True))
        trainer.test(dlrm, datamodule=..., ckpt_path="best")  # test/query_auc_{unadapted,adapted}
    """

    def __init__(
        self,
        inner_steps: int = 1,
        inner_lr: float = 0.1,
        adapt: Sequence[str] = ("dlrm.over_arch",),
        adapt_embeddings: Sequence[str] = (),
        vectorize: Optional[bool] = None,
    ) -> None:
        self.config = MetaLearningConfig(
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            adapt=tuple(adapt),
            adapt_embeddings=tuple(adapt_embeddings),
            vectorize=_check_vectorize(vectorize),
        )
        self.vectorize = vectorize
        self._module: Optional[LightningModule] = None
        self._run_config: Optional[MetaLearningConfig] = None
        self._batch_binding = ExitStack()
        self._scores: dict[str, dict[str, Metric]] = {}

    # -- installation ----------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "embed", None)):
            raise TypeError(
                f"{type(self).__name__} needs {type(pl_module).__name__} to define embed(sparse_features) "
                "returning the looked-up [rows, features, dim] tensor, and forward(dense_features, sparse_features) "
                "accepting it in place of the KeyedJaggedTensor"
            )
        if self.config.adapt_embeddings and not getattr(pl_module, "feature_names", None):
            raise TypeError(
                f"adapt_embeddings {list(self.config.adapt_embeddings)} needs "
                f"{type(pl_module).__name__}.feature_names: the features of embed()'s output in order, so "
                "each offset lands on its feature"
            )
        unknown = [f for f in self.config.adapt_embeddings if f not in pl_module.feature_names]
        if unknown:
            # Before anything is built: Meta-SGD sizes its rates from these features' tables.
            raise ValueError(
                f"adapt_embeddings names {unknown}, which are not among {type(pl_module).__name__}'s features "
                f"{list(pl_module.feature_names)}: name the task's own feature (the user's), or none. In the "
                "shipped recipes: --meta.adapt_embeddings='[your_task_column]' (meta_dlrm), the ColdStartEvaluation "
                "callback's adapt_embeddings (dlrm_tasks)"
            )
        self._prepare_adaptation(pl_module)
        self._module = pl_module
        self._run_config = None  # vectorize is decided again, once, for this run

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._batch_binding.close()
        self._module = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # A failed run skips teardown; a batch that failed never reached its _batch_end hook.
        self.teardown(trainer, pl_module, trainer.state.fn or "")

    def _prepare_adaptation(self, module: LightningModule) -> None:
        names = [n for n, _ in module.named_parameters(remove_duplicate=False)]  # a shared one under each name
        for prefix in self.config.adapt:
            if not any(MetaLearningConfig(adapt=(prefix,)).adapts(n) for n in names):
                raise ValueError(
                    f"adapt prefix {prefix!r} matches no parameter of {type(module).__name__}; "
                    f"top-level parameter groups are {sorted({n.split('.')[0] for n in names})}"
                )
        adapted = adapted_names(self.config, module)
        tables = tuple(f"{path}." for path in find_embedding_modules(module) if path)
        looked_up_once = [n for n in adapted if n.startswith(tables)]
        if looked_up_once:
            raise ValueError(
                f"adapt {list(self.config.adapt)} matches embedding table weights {looked_up_once}: embed() "
                "looks the tables up once per meta-batch, before the inner loop, so adapting them would change "
                "nothing. Adapt what a task's looked-up vectors become with adapt_embeddings (a per-task offset "
                "per feature), and name only dense layers in adapt"
            )
        # A prefix also matches after any dot ("head" adapts "user_tower.head.0.weight" too): say what adapts.
        shown = ", ".join(adapted[:8]) + (f" and {len(adapted) - 8} more" if len(adapted) > 8 else "")
        rank_zero_info(f"{type(self).__name__}: {len(adapted)} parameters adapt in the inner loop: {shown}")

    # -- the meta-batch --------------------------------------------------------------------------

    def _adapt(self, function: Callable, batch: TaskBatch):
        """The one lookup of the meta-batch, then ``function`` (meta_step or adapt_and_predict) on it."""
        module = self._module
        assert module is not None
        adapted = set(adapted_names(self.config, module))
        inputs = (
            module,
            # Only what adapts is passed: the module's own parameters stand in for the rest.
            {n: p for n, p in module.named_parameters() if n in adapted},
            batch.dense_features,
            # Sharded lookups pad ranks' row counts themselves where an exchange needs them equal.
            module.embed(batch.sparse_features),
            batch.labels,
            batch.task_offsets,
            batch.support_sizes,
        )
        # The order of the looked-up [R, F, D] tensor: the module's (checked in setup when it matters).
        feature_names = list(getattr(module, "feature_names", None) or batch.sparse_features.keys())
        inner_lrs = getattr(module, "inner_lrs", None) if self.config.learn_inner_lr else None
        config = self._config_for_run(inputs, feature_names, inner_lrs)
        return function(*inputs, config, feature_names, inner_lrs=inner_lrs)

    def _config_for_run(
        self, inputs: tuple, feature_names: list[str], inner_lrs: Optional[InnerLearningRates]
    ) -> MetaLearningConfig:
        """The config with ``vectorize`` decided: once per run, before the first meta-step."""
        if self._run_config is not None:
            return self._run_config
        _check_first_meta_batch(*inputs)
        module = type(inputs[0]).__name__
        if self.vectorize is None:
            vectorized = dataclasses.replace(self.config, vectorize=True)
            refusal = vmap_refusal(*inputs, vectorized, feature_names, inner_lrs)
            vectorize = refusal is None
            why = (
                f"{module}.forward batches under it (tried on one task of the first meta-batch)"
                if vectorize
                else f"torch.func.vmap cannot batch {module}.forward ({refusal.splitlines()[0]}); make it "
                "vmap-friendly (no .item(), no Python branch on a tensor value) to vectorise, or set "
                "vectorize=false to skip this check"
            )
        else:
            vectorize, why = self.vectorize, f"vectorize={self.vectorize}"
        how = "side by side under torch.func.vmap" if vectorize else "one after another"
        rank_zero_info(f"{type(self).__name__}: the tasks of each meta-batch adapt {how}: {why}")
        self._run_config = dataclasses.replace(self.config, vectorize=vectorize)
        return self._run_config

    # -- evaluation ------------------------------------------------------------------------------

    def _evaluate(self, batch: TaskBatch, stage: str) -> None:
        module = self._module
        assert module is not None
        if not isinstance(batch, TaskBatch):
            raise TypeError(
                f"{type(self).__name__} scores {stage} batches of whole tasks (TaskBatch), got "
                f"{type(batch).__name__}; with TaskDataModule set eval_as_tasks=true"
            )
        # Lightning evaluates under inference mode; adaptation needs autograd, on ordinary tensors.
        with torch.inference_mode(False), torch.enable_grad():
            result = self._adapt(adapt_and_predict, _plain_tensors(batch))
        scores = self._metrics(stage, result.labels.device)
        for kind, logits, loss in (
            ("adapted", result.adapted_logits, result.adapted_loss),
            ("unadapted", result.unadapted_logits, result.unadapted_loss),
        ):
            probabilities = torch.sigmoid(logits)
            scores[f"auc_{kind}"].update(probabilities, result.labels.long())
            user_aucs = grouped_auroc(probabilities, result.labels, result.tasks)
            if user_aucs.numel():
                scores[f"user_auc_{kind}"].update(user_aucs)
            scores[f"ne_{kind}"].update(logits, result.labels)
            # A mean over this batch's tasks, weighted by their number: the epoch's is the mean over
            # every rank's tasks (Lightning's sync_dist would average the ranks' means instead).
            scores[f"loss_{kind}"].update(loss.detach(), weight=batch.num_tasks)

    def _validation_step(self, batch: TaskBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def _test_step(self, batch: TaskBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: TaskBatch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_binding.enter_context(_step_bound(pl_module, "validation_step", self._validation_step))

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: TaskBatch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_binding.close()

    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: TaskBatch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_binding.enter_context(_step_bound(pl_module, "test_step", self._test_step))

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: TaskBatch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_binding.close()

    def _metrics(self, stage: str, device: torch.device) -> dict[str, Metric]:
        if stage not in self._scores:
            self._scores[stage] = {
                f"{name}_{kind}": make().to(device)
                for name, make in (
                    ("auc", BinaryAUROC), ("user_auc", MeanMetric), ("ne", NormalizedEntropy), ("loss", MeanMetric)
                )
                for kind in ("adapted", "unadapted")
            }
        return self._scores[stage]

    def _log_scores(self, stage: str, pl_module: LightningModule) -> None:
        for name, metric in self._scores.get(stage, {}).items():
            # compute() gathers every rank's state: the score of all query rows (tasks, for the
            # losses), not a mean of ranks'.
            pl_module.log(f"{stage}/query_{name}", metric.compute(), sync_dist=True)
            metric.reset()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_scores("val", pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_scores("test", pl_module)


class _MetaOptimization(AutomaticOptimization):
    """Lightning's automatic optimization loop, with the meta-step as its training step.

    Everything else is Lightning's own: the closure, backward through the strategy, ``zero_grad``,
    ``optimizer_step`` and their hooks, gradient accumulation, the progress that ``global_step`` and
    ``max_steps`` count, the results that ``self.log`` fills.
    """

    def __init__(self, trainer: Trainer, meta_step: Callable[[TaskBatch, int], torch.Tensor]) -> None:
        super().__init__(trainer)
        self._meta_step = meta_step

    def _training_step(self, kwargs: OrderedDict) -> Any:
        # The strategy runs the step as any training step: its own preparation, the precision
        # context and, with a DDP wrapper, inside the wrapper's forward (which arms the dense
        # gradients' all-reduce). It calls module.training_step: for this call, the meta-step.
        with _step_bound(self.trainer.lightning_module, "training_step", self._meta_step):
            return super()._training_step(kwargs)


class MetaLearningLoop(ColdStartEvaluation):
    """Optimization-based meta-learning (MAML family) in ``trainer.fit``.

    Install it on any Trainer in one line, ``Trainer(callbacks=[MetaLearningLoop(...)])`` (or in a
    recipe's YAML under ``trainer.callbacks``), and feed `TaskBatch` meta-batches. For the run it
    puts its own optimization loop in the fit loop's place, a subclass of Lightning's whose training
    step is the meta-step; everything else (backward, optimizer and table updates, ``global_step``
    counting meta-batches, ``max_steps``, logging, checkpoints, resume) is Lightning's. Lightning's
    loop is back in place when the run ends or fails. The module stays an ordinary model, with its
    own ``training_step`` (which Lightning requires; it does not run under this loop); it must
    provide:

    - ``embed(sparse_features: KeyedJaggedTensor) -> Tensor[R, F, D]``, the embedding lookup;
    - ``forward(dense_features, sparse_features)`` returning ``[R]`` logits, where
      ``sparse_features`` is a `KeyedJaggedTensor` or the looked-up ``[R, F, D]`` tensor;
    - automatic optimization (the meta loss is returned to Lightning's closure).

    The loss is binary cross-entropy on click labels. The outer optimizer is the one
    ``configure_optimizers`` returns; embedding tables keep their fused optimizer. Validation and
    test are `ColdStartEvaluation`'s: adapt on each held-out task's support set and score its query
    set, logging query AUC and loss after adaptation and without it.

    Args:
        algorithm: ``"maml"`` (second order) or ``"fomaml"`` (first order).
        inner_steps: gradient steps on each support set.
        inner_lr: their learning rate (the initial one, with ``learn_inner_lr``).
        adapt: parameter-name prefixes that adapt in the inner loop (ANIL-style); by default the
            DLRM top MLP, as MeLU.
        learn_inner_lr: Meta-SGD: a learned inner learning rate per adapted weight (and per
            dimension of the embedding offsets), trained by the outer optimizer. The loop gives the
            module an `InnerLearningRates` as ``inner_lrs`` unless it has one (it stays, as a
            trained part of the model that checkpoints hold).
        adapt_embeddings: feature names whose looked-up vectors get a per-task offset adapted in
            the inner loop (cold-start users or items); done locally, tables stay as they are. The
            module must name its features in order (``feature_names``).
        plain_loss_weight: weight of the shared model's loss on every row of the meta-batch, added
            to the outer loss (see `MetaLearningConfig`); 0 is pure MAML.
        vectorize: tasks side by side under ``torch.func.vmap`` (``True``) or one after another
            (``False``); ``None`` (the default) decides once per run, before the first meta-step
            (see `ColdStartEvaluation`).

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
        plain_loss_weight: float = 0.0,
        vectorize: Optional[bool] = None,
    ) -> None:
        super().__init__(inner_steps, inner_lr, adapt, adapt_embeddings, vectorize)
        self.config = MetaLearningConfig(
            algorithm=algorithm,  # type: ignore[arg-type]
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            adapt=tuple(adapt),
            learn_inner_lr=learn_inner_lr,
            adapt_embeddings=tuple(adapt_embeddings),
            plain_loss_weight=plain_loss_weight,
            vectorize=_check_vectorize(vectorize),
        )
        self._lightning_optimization: Optional[AutomaticOptimization] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise TypeError(
                f"{type(self).__name__} returns the meta loss to Lightning's automatic optimization; "
                f"{type(pl_module).__name__}.automatic_optimization is False: set it to True"
            )
        batch_norms = [name for name, m in pl_module.named_modules() if isinstance(m, _BATCH_NORMS)]
        if batch_norms:
            # In training, BatchNorm normalises over the rows it is given: every task's padded rows,
            # or all tasks' rows, never one task's alone (and its running statistics are written in
            # place, which torch.func's inner loop cannot differentiate through).
            raise ValueError(
                f"{type(self).__name__} cannot train {type(pl_module).__name__}'s BatchNorm layers {batch_norms}: "
                "meta-batches pad each task to the longest and score rows of several tasks together, so batch "
                "statistics would mix tasks. Use LayerNorm (it normalises each row on its own)"
            )
        self._lightning_optimization = swap_automatic_optimization(
            trainer, _MetaOptimization(trainer, self._training_step)
        )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._lightning_optimization is not None:
            swap_automatic_optimization(trainer, self._lightning_optimization)
            self._lightning_optimization = None
        super().teardown(trainer, pl_module, stage)

    def _prepare_adaptation(self, module: LightningModule) -> None:
        super()._prepare_adaptation(module)
        if not self.config.learn_inner_lr:
            return
        if getattr(module, "inner_lrs", None) is None:
            # Before sharding and configure_optimizers: the outer optimizer and DDP pick the rates up.
            width = self._embedding_dim(module)
            module.inner_lrs = InnerLearningRates(module, self.config, embedding_dim=width)
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

    def _training_step(self, batch: TaskBatch, batch_idx: int) -> torch.Tensor:
        module = self._module
        assert module is not None
        if not isinstance(batch, TaskBatch):
            raise TypeError(
                f"{type(self).__name__} trains on meta-batches of whole tasks (TaskBatch), got "
                f"{type(batch).__name__}; with TaskDataModule set as_tasks=true"
            )
        out = self._adapt(meta_step, batch)
        tasks = batch.num_tasks
        module.log("train/query_loss", out.query_loss, prog_bar=True, batch_size=tasks)
        module.log("train/support_loss", out.support_loss, batch_size=tasks)
        module.log("train/query_loss_unadapted", out.query_loss_unadapted, batch_size=tasks)
        # This rank's tasks; summing over ranks would cost an all-reduce every meta-batch.
        module.log("train/tasks_per_rank", float(tasks), batch_size=tasks)
        return out.loss


def _check_first_meta_batch(
    module: nn.Module, params: Any, dense: torch.Tensor, embedded: torch.Tensor, labels: torch.Tensor,
    task_offsets: torch.Tensor, support_sizes: torch.Tensor,
) -> None:
    """What the loss and the task layout assume of the labels and the module, checked on a run's
    first meta-batch: labels in [0, 1], one logit per row, and rows scored independently."""
    low, high = float(labels.min()), float(labels.max())
    if low < 0 or high > 1:
        raise ValueError(
            f"the meta-batch's labels range over [{low:g}, {high:g}], but the meta loss is binary cross-entropy "
            "on labels in [0, 1]; derive click labels first (TaskDataModule(label_rule='rating >= 4'), say)"
        )
    rows = int(task_offsets[1])  # the first task's
    half = rows // 2  # >= 1: a task has a support and a query row
    training = {m: m.training for m in module.modules()}
    module.eval()  # no dropout: the two forwards must be comparable
    try:
        # In float32 (no bf16-mixed autocast), whose rounding does not hide a mixed row.
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(dense.device.type, enabled=False):
            whole = module(dense[:rows].clone(), embedded[:rows].clone())
            first_half = module(dense[:half].clone(), embedded[:half].clone())
    finally:
        for m, was_training in training.items():
            m.training = was_training
    name = type(module).__name__
    if whole.shape != (rows,):
        raise ValueError(
            f"{name}.forward returned shape {list(whole.shape)} for {rows} rows; the meta loss needs one logit per "
            f"row ([{rows}])"
        )
    if not torch.allclose(whole[:half], first_half, rtol=1e-4, atol=1e-5):
        # Tasks are padded to the longest and scored together, so such a forward would see other rows.
        raise ValueError(
            f"{name}.forward scores a row differently depending on the other rows of its batch (up to "
            f"{float((whole[:half] - first_half).abs().max()):.3g} apart on the first task's rows: a mean "
            "over rows, or BatchNorm without running statistics), but meta-batches pad each task to the "
            "longest and score rows of several tasks together. Make forward score each row on its own "
            "(LayerNorm in place of BatchNorm)"
        )


def _check_vectorize(vectorize: Optional[bool]) -> bool:
    """``vectorize`` validated (None: decided per run); what MetaLearningConfig holds until then."""
    if vectorize is not None and not isinstance(vectorize, bool):
        raise TypeError(f"vectorize must be true, false or null (decided once per run), got {vectorize!r}")
    return True if vectorize is None else vectorize


def _plain_tensors(batch: TaskBatch) -> TaskBatch:
    """Copies of inference-mode tensors, which autograd refuses to save."""

    def plain(t: torch.Tensor) -> torch.Tensor:
        return t.clone() if t.is_inference() else t

    kjt = batch.sparse_features
    weights = kjt.weights_or_none()
    return TaskBatch(
        dense_features=plain(batch.dense_features),
        sparse_features=KeyedJaggedTensor(
            keys=kjt.keys(), values=plain(kjt.values()), lengths=plain(kjt.lengths()),
            weights=None if weights is None else plain(weights),
        ),
        labels=plain(batch.labels),
        task_offsets=plain(batch.task_offsets),
        support_sizes=plain(batch.support_sizes),
        task_keys=plain(batch.task_keys),
    )

