"""`ColdStartEvaluation` and `MetaLearningLoop` in a one-process Trainer: what they log and leave behind."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc

from lightning_dembed.data.batch import TaskBatch
from lightning_dembed.meta import ColdStartEvaluation, MetaLearningLoop

from test_meta_functional import FEATURES, TinyDLRM, meta_batch


class TinyModule(LightningModule):
    """A plain click model with the meta-learning contract (embed, forward on looked-up rows)."""

    def __init__(self, feature_names: Optional[list[str]] = FEATURES) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyDLRM()
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


def task_batches(count: int = 3) -> DataLoader:
    batches = []
    for seed in range(count):
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
    assert set(metrics) == {f"val/query_{m}_{k}" for m in ("auc", "loss") for k in ("adapted", "unadapted")}
    # "unadapted" is the model as it is, on exactly the query rows of every task.
    scores, labels = [], []
    with torch.no_grad():
        for batch in task_batches():
            offsets, supports = batch.task_offsets, batch.support_sizes
            query = torch.cat([torch.arange(int(offsets[t] + supports[t]), int(offsets[t + 1]))
                               for t in range(len(supports))])
            scores.append(torch.sigmoid(module(batch.dense_features, batch.sparse_features))[query])
            labels.append(batch.labels[query])
    want = binary_auroc(torch.cat(scores), torch.cat(labels).long())
    assert metrics["val/query_auc_unadapted"] == pytest.approx(float(want), abs=1e-6)
    # Fine-tuned: other scores.
    assert metrics["val/query_loss_adapted"] != metrics["val/query_loss_unadapted"]
    assert "validation_step" not in module.__dict__


class Fail(Callback):
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: TaskBatch, batch_idx: int
    ) -> None:
        if batch_idx == 1:
            raise RuntimeError("a failure in the middle of fit")


def test_a_failed_fit_leaves_the_module_as_it_was() -> None:
    module = TinyModule()
    own_test_step = module.test_step = lambda batch, batch_idx: None  # an instance attribute of the user's
    with pytest.raises(RuntimeError, match="middle of fit"):
        trainer([MetaLearningLoop(inner_steps=1, adapt=["over_arch"]), Fail()], max_steps=3).fit(
            module, task_batches(), task_batches()
        )
    assert "training_step" not in module.__dict__ and "validation_step" not in module.__dict__
    assert module.test_step is own_test_step
    assert module.training_step.__func__ is TinyModule.training_step


def test_a_fit_that_ends_leaves_the_module_as_it_was() -> None:
    module = TinyModule()
    trainer([MetaLearningLoop(inner_steps=1, adapt=["over_arch"])], max_steps=2, limit_val_batches=1).fit(
        module, task_batches(), task_batches()
    )
    assert not {"training_step", "validation_step", "test_step"} & set(module.__dict__)


def test_adapt_embeddings_needs_the_module_to_name_its_features() -> None:
    with pytest.raises(TypeError, match="feature_names"):
        trainer([ColdStartEvaluation(adapt_embeddings=["user"])]).validate(
            TinyModule(feature_names=None), task_batches(), verbose=False
        )


def test_cold_start_evaluation_refuses_plain_batches_by_name() -> None:
    from lightning_dembed.data.batch import Batch

    dense, kjt, labels, _, _ = meta_batch()
    with pytest.raises(TypeError, match="eval_as_tasks"):
        trainer([ColdStartEvaluation(adapt=["over_arch"])]).validate(
            TinyModule(), DataLoader([Batch(dense, kjt, labels)], batch_size=None), verbose=False
        )
