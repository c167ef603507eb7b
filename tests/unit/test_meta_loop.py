"""`ColdStartEvaluation` and `MetaLearningLoop` in a one-process Trainer: what they log and leave behind."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc

from lightning_dembed._private import AutomaticOptimization
from lightning_dembed.data.batch import Batch, TaskBatch
from lightning_dembed.meta import ColdStartEvaluation, MetaLearningLoop

from test_meta_functional import FEATURES, ItemCallingDLRM, TinyDLRM, meta_batch


class TinyModule(LightningModule):
    """A plain click model with the meta-learning contract (embed, forward on looked-up rows)."""

    def __init__(self, feature_names: Optional[list[str]] = FEATURES, vmap_friendly: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyDLRM() if vmap_friendly else ItemCallingDLRM()
        if feature_names is not None:
            self.feature_names = feature_names

    def embed(self, sparse_features):
        return self.model.embed(sparse_features)

    def forward(self, dense, sparse):
        return self.model(dense, sparse)

    def training_step(self, batch: TaskBatch, batch_idx: int) -> torch.Tensor:
        logits = self(batch.dense_features, batch.sparse_features)
        return nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        raise AssertionError("replaced by the callback during evaluation")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def task_batches(count: int = 3, seeds: Optional[list[int]] = None) -> DataLoader:
    batches = []
    for seed in seeds if seeds is not None else range(count):
        dense, kjt, labels, offsets, supports = meta_batch(seed=seed)
        batches.append(TaskBatch(dense, kjt, labels, offsets, supports, torch.arange(supports.numel())))
    return DataLoader(batches, batch_size=None)


def trainer(callbacks: list[Callback], **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kwargs)


def test_cold_start_evaluation_scores_a_plain_model_as_is_and_fine_tuned() -> None:
    module = TinyModule()
    metrics = trainer([ColdStartEvaluation(inner_steps=3, inner_lr=0.5, adapt=["over_arch"],
                                           adapt_embeddings=["user"])]).validate(module, task_batches(),
                                                                                verbose=False)[0]
    assert set(metrics) == {
        f"val/query_{m}_{k}" for m in ("auc", "user_auc", "ne", "loss") for k in ("adapted", "unadapted")
    }
    # "unadapted" is the model as it is, on exactly the query rows of every task.
    scores, labels, user_aucs = [], [], []
    with torch.no_grad():
        for batch in task_batches():
            offsets, supports = batch.task_offsets, batch.support_sizes
            queries = [torch.arange(int(offsets[t] + supports[t]), int(offsets[t + 1])) for t in range(len(supports))]
            predicted = torch.sigmoid(module(batch.dense_features, batch.sparse_features))
            scores.append(predicted[torch.cat(queries)])
            labels.append(batch.labels[torch.cat(queries)])
            # The per-user AUC: each task's own, over the tasks with both labels among their query rows.
            user_aucs += [binary_auroc(predicted[q], batch.labels[q].long()) for q in queries
                          if 0 < batch.labels[q].sum() < len(q)]
    want = binary_auroc(torch.cat(scores), torch.cat(labels).long())
    assert metrics["val/query_auc_unadapted"] == pytest.approx(float(want), abs=1e-6)
    assert len(user_aucs) > 1
    assert metrics["val/query_user_auc_unadapted"] == pytest.approx(float(torch.stack(user_aucs).mean()), abs=1e-6)
    all_labels = torch.cat(labels)
    ctr = all_labels.mean()
    log_loss = torch.nn.functional.binary_cross_entropy(torch.cat(scores), all_labels)
    entropy = -(ctr * ctr.log() + (1 - ctr) * (1 - ctr).log())
    assert metrics["val/query_ne_unadapted"] == pytest.approx(float(log_loss / entropy), rel=1e-4)
    # Fine-tuned: other scores.
    assert metrics["val/query_loss_adapted"] != metrics["val/query_loss_unadapted"]
    assert "validation_step" not in vars(module)


STEP_METHODS = ("training_step", "validation_step", "test_step")


class PlainModule(TinyModule):
    """Trained by its own training_step, for what a plain Lightning fit leaves on a module."""

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        return None


def assert_as_the_user_made_it(module: LightningModule, attributes: set[str]) -> None:
    """No instance attribute added or dropped, and every step method the class's own."""
    # Lightning itself adds _hparams to any module it fits (see the plain fit in the test below).
    assert set(vars(module)) - {"_hparams"} == attributes - {"_hparams"}
    for name in STEP_METHODS:
        assert name not in vars(module)
        assert getattr(module, name).__func__ is getattr(type(module), name)


class WatchTheStep(Callback):
    """Records, outside the training step, what the module and the fit loop look like."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, str]] = []

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        loop = trainer.fit_loop.epoch_loop.automatic_optimization
        self.seen.append(("training_step" in vars(pl_module), type(loop).__name__))


def test_fit_runs_the_meta_step_in_lightnings_loop_and_leaves_the_module_as_the_user_made_it() -> None:
    plain = PlainModule()
    trainer([], max_steps=2, limit_val_batches=1).fit(plain, task_batches(), task_batches())

    module = TinyModule()
    attributes = set(vars(module))
    watch = WatchTheStep()
    fit = trainer([MetaLearningLoop(inner_steps=1, adapt=["over_arch"]), watch], max_steps=4,
                  limit_val_batches=1)
    fit.fit(module, task_batches(), task_batches())
    # max_steps counts meta-batches; the meta-step logged through Lightning; validation ran (epoch of 3).
    assert fit.global_step == 4
    assert {"train/query_loss", "train/support_loss", "val/query_auc_adapted"} <= set(fit.callback_metrics)
    # While fitting: the loop in the fit loop's place; the step method bound only inside the step's call.
    assert watch.seen == [(False, "_MetaOptimization")] * 4
    assert type(fit.fit_loop.epoch_loop.automatic_optimization) is AutomaticOptimization
    assert_as_the_user_made_it(module, attributes)
    assert set(vars(module)) == set(vars(plain))


class Fail(Callback):
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: TaskBatch, batch_idx: int
    ) -> None:
        if batch_idx == 1:
            raise RuntimeError("a failure in the middle of fit")


def plain_batch_second() -> DataLoader:
    dense, kjt, labels, offsets, supports = meta_batch()
    task = TaskBatch(dense, kjt, labels, offsets, supports, torch.arange(supports.numel()))
    return DataLoader([task, Batch(dense, kjt, labels)], batch_size=None)


@pytest.mark.parametrize(
    "failure, data, error",
    [
        (Fail(), task_batches, "middle of fit"),  # between steps
        (None, plain_batch_second, "TaskBatch"),  # inside the meta-step
    ],
    ids=["between_steps", "inside_the_step"],
)
def test_a_failed_fit_leaves_the_module_and_the_trainer_as_they_were(failure, data, error) -> None:
    module = TinyModule()
    own_test_step = module.test_step = lambda batch, batch_idx: None  # an instance attribute of the user's
    attributes = set(vars(module))
    fit = trainer([MetaLearningLoop(inner_steps=1, adapt=["over_arch"])] + ([failure] if failure else []),
                  max_steps=3)
    with pytest.raises((RuntimeError, TypeError), match=error):
        fit.fit(module, data(), task_batches())
    assert set(vars(module)) - {"_hparams"} == attributes and module.test_step is own_test_step
    assert "training_step" not in vars(module) and "validation_step" not in vars(module)
    assert module.training_step.__func__ is TinyModule.training_step
    assert type(fit.fit_loop.epoch_loop.automatic_optimization) is AutomaticOptimization


def test_checkpoints_and_resume_are_lightnings(tmp_path: Path) -> None:
    # One meta-batch repeated: any order of steps gives the same weights, so resume is compared exactly.
    data = lambda: task_batches(seeds=[0, 0, 0])  # noqa: E731
    straight = TinyModule()
    trainer([MetaLearningLoop(adapt=["over_arch"])], max_steps=4, limit_val_batches=0).fit(straight, data())

    first = trainer([MetaLearningLoop(adapt=["over_arch"])], max_steps=2, limit_val_batches=0)
    first.fit(TinyModule(), data())
    first.save_checkpoint(tmp_path / "step2.ckpt")
    loops = torch.load(tmp_path / "step2.ckpt", weights_only=False)["loops"]["fit_loop"]
    # The loop's progress is saved where Lightning's own is: global_step counts meta-steps.
    progress = loops["epoch_loop.automatic_optimization.optim_progress"]
    assert progress["optimizer"]["step"]["total"]["completed"] == 2

    resumed_module = TinyModule()
    resumed = trainer([MetaLearningLoop(adapt=["over_arch"])], max_steps=4, limit_val_batches=0)
    resumed.fit(resumed_module, data(), ckpt_path=tmp_path / "step2.ckpt")
    assert resumed.global_step == 4
    for (name, got), want in zip(resumed_module.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(got, want, msg=name)


def test_installed_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "meta.yaml"
    config.write_text(
        "trainer:\n"
        "  accelerator: cpu\n"
        "  max_steps: 2\n"
        "  logger: false\n"
        "  enable_checkpointing: false\n"
        "  callbacks:\n"
        "    - class_path: lightning_dembed.meta.MetaLearningLoop\n"
        "      init_args:\n"
        "        {algorithm: fomaml, adapt: [over_arch], adapt_embeddings: [user], vectorize: null}\n"
    )
    cli = LightningCLI(TinyModule, run=False, args=["--config", str(config)], save_config_callback=None)
    (loop,) = [c for c in cli.trainer.callbacks if isinstance(c, MetaLearningLoop)]
    assert loop.config.first_order and loop.vectorize is None
    cli.trainer.fit(cli.model, task_batches())
    assert cli.trainer.global_step == 2 and "train/query_loss" in cli.trainer.callback_metrics


@pytest.mark.parametrize("vmap_friendly", [True, False], ids=["vmap", "loop"])
def test_vectorize_is_decided_once_per_run_and_said(
    vmap_friendly: bool, caplog: pytest.LogCaptureFixture
) -> None:
    losses = {}
    for vectorize in (None, vmap_friendly):
        module = TinyModule(vmap_friendly=vmap_friendly)
        fit = trainer([MetaLearningLoop(adapt=["over_arch"], adapt_embeddings=["user"], vectorize=vectorize)],
                      max_steps=2, limit_val_batches=0)
        with caplog.at_level(logging.INFO):
            fit.fit(module, task_batches())
        losses[vectorize] = fit.callback_metrics["train/query_loss"]
    said = [r.getMessage() for r in caplog.records if "each meta-batch adapt" in r.getMessage()]
    assert len(said) == 2  # once per run
    how = "side by side under torch.func.vmap" if vmap_friendly else "one after another"
    assert all(how in message for message in said)
    if not vmap_friendly:
        assert "cannot batch TinyModule.forward (vmap:" in said[0] and "vectorize=false" in said[0]
    # Chosen by the probe, the run is the run that setting it by hand gives.
    assert losses[None] == losses[vmap_friendly]


def test_vectorize_forced_on_a_forward_vmap_cannot_batch_fails_as_torch_says() -> None:
    fit = trainer([MetaLearningLoop(adapt=["over_arch"], vectorize=True)], max_steps=1, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="^vmap:"):
        fit.fit(TinyModule(vmap_friendly=False), task_batches())


def test_manual_optimization_is_refused_by_name() -> None:
    module = TinyModule()
    module.automatic_optimization = False
    with pytest.raises(TypeError, match="automatic_optimization"):
        trainer([MetaLearningLoop(adapt=["over_arch"])], max_steps=1).fit(module, task_batches())


def test_adapt_embeddings_needs_the_module_to_name_its_features() -> None:
    with pytest.raises(TypeError, match="feature_names"):
        trainer([ColdStartEvaluation(adapt_embeddings=["user"])]).validate(
            TinyModule(feature_names=None), task_batches(), verbose=False
        )
    # A feature the module does not have (a recipe's user_id on data whose user column is named otherwise).
    for callback in (MetaLearningLoop(adapt=["over_arch"], adapt_embeddings=["user_id"], learn_inner_lr=True),
                     ColdStartEvaluation(adapt_embeddings=["user_id"])):
        with pytest.raises(ValueError, match=r"adapt_embeddings names \['user_id'\], which are not among .*'user'"):
            trainer([callback], max_steps=1).fit(TinyModule(), task_batches())


def test_adapting_table_weights_is_refused_and_what_adapts_is_said(caplog: pytest.LogCaptureFixture) -> None:
    # The tables are looked up once, before the inner loop: adapting them would silently do nothing.
    with pytest.raises(ValueError, match=r"matches embedding table weights \['model.ebc.embedding_bags.t_user.weight"):
        trainer([MetaLearningLoop(adapt=["ebc"])], max_steps=1).fit(TinyModule(), task_batches())
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        trainer([MetaLearningLoop(adapt=["over_arch"])], max_steps=1, limit_val_batches=0).fit(
            TinyModule(), task_batches()
        )
    assert "4 parameters adapt in the inner loop: model.over_arch.0.weight, model.over_arch.0.bias" in caplog.text


def test_cold_start_evaluation_refuses_plain_batches_by_name() -> None:
    dense, kjt, labels, _, _ = meta_batch()
    with pytest.raises(TypeError, match="eval_as_tasks"):
        trainer([ColdStartEvaluation(adapt=["over_arch"])]).validate(
            TinyModule(), DataLoader([Batch(dense, kjt, labels)], batch_size=None), verbose=False
        )


class RowMixingModule(TinyModule):
    """Scores each row against the mean of its batch: the padding of other tasks would leak in."""

    def forward(self, dense, sparse):
        logits = self.model(dense, sparse)
        return logits - logits.mean()


class TwoLogitModule(TinyModule):
    def forward(self, dense, sparse):
        return torch.stack([self.model(dense, sparse)] * 2, dim=-1)


class BatchNormModule(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.model.over_arch.insert(1, nn.BatchNorm1d(8))


class DropoutModule(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.model.over_arch.insert(1, nn.Dropout(0.5))


@pytest.mark.parametrize(
    ("module", "labels_times", "error"),
    [
        (TinyModule, 5.0, r"labels range over \[0, 5\], but the meta loss is binary cross-entropy"),
        (RowMixingModule, 1.0, r"RowMixingModule.forward scores a row differently depending on the other rows"),
        (TwoLogitModule, 1.0, r"TwoLogitModule.forward returned shape \[\d+, 2\] for \d+ rows"),
        (BatchNormModule, 1.0, r"cannot train BatchNormModule's BatchNorm layers \['model.over_arch.1'\]"),
    ],
    ids=["ratings-as-labels", "rows-mixed", "two-logits", "batch-norm"],
)
def test_what_the_meta_loss_and_padding_assume_is_refused_before_the_first_step(module, labels_times, error) -> None:
    # Each of these trained silently (or failed inside torch) before: checked on the first meta-batch.
    batches = [dataclasses.replace(b, labels=b.labels * labels_times) for b in task_batches()]
    model = module()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=error):
        trainer([MetaLearningLoop(adapt=["over_arch"])], max_steps=1).fit(model, DataLoader(batches, batch_size=None))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())  # the probe's eval() undone


def test_dropout_adapts_under_vmap_with_a_draw_per_task(caplog: pytest.LogCaptureFixture) -> None:
    # The decision is taken on the sanity check's eval-mode batch; training then draws dropout masks
    # under vmap, each task its own.
    with caplog.at_level(logging.INFO):
        trainer([MetaLearningLoop(adapt=["over_arch"])], max_steps=2, num_sanity_val_steps=1).fit(
            DropoutModule(), task_batches(), task_batches(1)
        )
    assert any("side by side under torch.func.vmap" in r.getMessage() for r in caplog.records)


def test_evaluation_copies_of_inference_tensors_keep_the_ids_weights() -> None:
    from torchrec import KeyedJaggedTensor

    from lightning_dembed.meta.loop import _plain_tensors

    with torch.inference_mode():
        kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]),
                                weights=torch.tensor([0.5, 2.0]))
        batch = TaskBatch(torch.zeros(2, 1), kjt, torch.zeros(2), torch.tensor([0, 2]), torch.tensor([1]),
                          torch.tensor([0]))
    copied = _plain_tensors(batch).sparse_features
    assert copied.weights().tolist() == [0.5, 2.0] and not copied.weights().is_inference()
