"""Synthetic models and their click streams: sizes, determinism, sharding, id skew, learnable labels."""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import PoolingType

from lightning_dembed.data import (
    SYNTHETIC_MODELS,
    ClickDataset,
    RecDataModule,
    SyntheticClickDataset,
    materialize,
)

TINY = SYNTHETIC_MODELS["tiny"]


def assert_batches_equal(a, b) -> None:
    torch.testing.assert_close(a.dense_features, b.dense_features, rtol=0, atol=0)
    torch.testing.assert_close(a.labels, b.labels, rtol=0, atol=0)
    assert a.sparse_features.keys() == b.sparse_features.keys()
    assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
    assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())


@pytest.mark.parametrize(
    "name, num_tables, gib",
    [("tiny", 55, 4.2), ("small", 107, 26.3), ("medium", 311, 206.2), ("large", 612, 773.8),
     ("jumbo", 1022, 3109.5), ("colossal", 2002, 22327.0)],
)
def test_models_match_merlin_table_counts_and_sizes(name: str, num_tables: int, gib: float) -> None:
    config = SYNTHETIC_MODELS[name]
    assert config.num_tables == len(config.tables()) == num_tables
    assert config.size_bytes() / 2**30 == pytest.approx(gib, rel=0.05)


def test_tables_scale_rows_and_keep_fbgemm_widths() -> None:
    tables = TINY.tables(scale=0.001)
    assert [t.name for t in tables] == [f"t{i}" for i in range(55)]
    features = [f for t in tables for f in t.feature_names]
    assert features == [f"f{i}" for i in range(58)]  # three tables read by a one-hot and a 10-hot feature
    assert tables[0].feature_names == ["f0", "f1"] and tables[3].feature_names == ["f6"]
    assert all(t.embedding_dim % 4 == 0 for name in SYNTHETIC_MODELS for t in SYNTHETIC_MODELS[name].tables())
    assert min(t.num_embeddings for t in tables) == 8  # 10-row tables stay usable
    assert max(t.num_embeddings for t in tables) == 25_000
    assert TINY.size_bytes(0.001) < TINY.size_bytes() / 500
    with pytest.raises(ValueError, match="scale"):
        TINY.tables(scale=0)


def test_batch_layout() -> None:
    data = SyntheticClickDataset(TINY, batch_size=64, num_batches=3, scale=0.001)
    batches = list(data)
    assert len(batches) == len(data) == 3
    batch = batches[0]
    assert batch.dense_features.shape == (64, TINY.num_dense_features)
    assert batch.labels.shape == (64,) and set(batch.labels.unique().tolist()) <= {0.0, 1.0}
    kjt = batch.sparse_features
    assert kjt.stride() == 64 and kjt.keys() == data.feature_names
    assert kjt["f0"].lengths().eq(1).all() and kjt["f1"].lengths().eq(10).all()
    rows = {f: t.num_embeddings for t in TINY.tables(0.001) for f in t.feature_names}
    for feature in kjt.keys():
        ids = kjt[feature].values()
        assert ids.min() >= 0 and ids.max() < rows[feature]


def test_stream_is_deterministic_per_seed_split_rank_and_index() -> None:
    def stream(**kwargs) -> SyntheticClickDataset:
        args = dict(batch_size=32, num_batches=4, scale=0.001, seed=0, split="train", rank=0, world_size=2)
        return SyntheticClickDataset(TINY, **(args | kwargs))

    reference = stream().batch(2)
    assert_batches_equal(stream().batch(2), reference)
    assert_batches_equal(stream(num_batches=10).batch(2), reference)  # the length does not change a batch
    changed = [stream(seed=1), stream(split="val"), stream(rank=1)]
    for other in [stream().batch(1)] + [data.batch(2) for data in changed]:
        assert not torch.equal(other.sparse_features.values(), reference.sparse_features.values())
        assert not torch.equal(other.dense_features, reference.dense_features)
    # Splits are streams of one hidden model; the seed picks the model.
    assert np.array_equal(stream()._truth[0], stream(split="test")._truth[0])
    assert not np.array_equal(stream()._truth[0], stream(seed=1)._truth[0])


def test_ranks_get_different_rows() -> None:
    streams = [SyntheticClickDataset(TINY, 128, 2, 0.001, rank=r, world_size=2) for r in range(2)]
    first = [s.batch(0).dense_features for s in streams]
    assert not torch.equal(first[0], first[1])
    with pytest.raises(ValueError, match="rank"):
        SyntheticClickDataset(TINY, 128, 2, 0.001, rank=2, world_size=2)


def test_dataloader_workers_split_batches_and_keep_order() -> None:
    data = SyntheticClickDataset(TINY, 32, 5, 0.001, seed=3)
    expected = [data.batch(i) for i in range(5)]
    got = list(DataLoader(data, batch_size=None, num_workers=2))
    assert len(got) == 5
    for a, b in zip(got, expected):
        assert_batches_equal(a, b)


def test_ids_follow_a_power_law() -> None:
    alpha, rows = 1.05, 250_000
    # f6 is one-hot on a 250k-row table
    ids = SyntheticClickDataset(TINY, 8192, 1, scale=0.01, alpha=alpha).batch(0).sparse_features["f6"]
    ids = ids.values()
    assert ids.numel() == 8192 and 0 <= ids.min() and ids.max() < rows
    for k in (1, 10, 100, 1000, 10_000):
        # P(id < k) of a power law with density ~ x ** -alpha on [1, rows + 1)
        expected = ((k + 1) ** (1 - alpha) - 1) / ((rows + 1) ** (1 - alpha) - 1)
        assert (ids < k).float().mean().item() == pytest.approx(expected, abs=0.025)
    assert (ids < rows // 100).float().mean() > 0.6  # the top 1 % of rows take most lookups
    assert ids.unique().numel() > 1000  # ...and the tail is reached
    steeper = SyntheticClickDataset(TINY, 8192, 1, scale=0.01, alpha=1.5).batch(0).sparse_features["f6"]
    steeper = steeper.values()
    assert (steeper == 0).float().mean() > 2 * (ids == 0).float().mean()


class _LogisticModel(nn.Module):
    """One weight per id (mean-pooled per feature) plus a linear dense term: logistic regression."""

    def __init__(self, tables, num_dense: int) -> None:
        super().__init__()
        for table in tables:
            table.embedding_dim, table.pooling = 1, PoolingType.MEAN
        self.ebc = EmbeddingBagCollection(tables=tables)
        self.dense = nn.Linear(num_dense, 1)

    def forward(self, batch) -> torch.Tensor:
        return self.ebc(batch.sparse_features).values().sum(1) + self.dense(batch.dense_features).squeeze(1)


@pytest.fixture
def one_thread():
    # Two intra-op threads on two busy cores can make this tiny model 20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_labels_are_learnable(one_thread) -> None:
    torch.manual_seed(0)
    train = SyntheticClickDataset(TINY, 2048, 60, scale=0.001, seed=7)
    val = SyntheticClickDataset(TINY, 4096, 1, scale=0.001, seed=7, split="val")
    model = _LogisticModel(TINY.tables(0.001), TINY.num_dense_features)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    for batch in train:
        loss = nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    batch = val.batch(0)
    with torch.no_grad():
        auc = binary_auroc(model(batch), batch.labels.long())
    assert 0.2 < batch.labels.mean() < 0.6
    assert auc > 0.7


def test_materialize_round_trips_through_the_reader(tmp_path) -> None:
    info = materialize(TINY, 0.001, tmp_path / "tiny", num_rows=1000, seed=5, rows_per_chunk=256)
    assert info.num_rows == 1000 and len(info.feature_names) == 58 and info.hotness[:2] == (1, 10)
    stream = SyntheticClickDataset(TINY, 256, 4, 0.001, seed=5, rank=0, world_size=1)
    expected = [stream.batch(i) for i in range(4)]
    read = list(ClickDataset(tmp_path / "tiny", batch_size=250))
    assert len(read) == 4
    torch.testing.assert_close(
        torch.cat([b.dense_features for b in read]), torch.cat([b.dense_features for b in expected])[:1000]
    )
    torch.testing.assert_close(
        torch.cat([b.labels for b in read]), torch.cat([b.labels for b in expected])[:1000]
    )
    for feature in ("f0", "f1", "f57"):
        got = torch.cat([b.sparse_features[feature].values() for b in read])
        want = torch.cat([b.sparse_features[feature].values() for b in expected])
        assert torch.equal(got, want[: got.numel()])
    assert datasets.Dataset.from_file(str(tmp_path / "tiny" / info.files[0])).num_rows == 1000


def test_datamodule_shards_by_trainer_rank() -> None:
    data = RecDataModule(
        synthetic_model="tiny", scale=0.001, global_batch_size=64, train_batches=3, val_batches=2
    )
    assert len(data.tables()) == 55 and data.num_dense_features == 10
    loaders = []
    for rank in range(2):
        cpu = SimpleNamespace(root_device=torch.device("cpu"))
        data.trainer = SimpleNamespace(global_rank=rank, world_size=2, strategy=cpu)
        data.setup("fit")
        loaders.append((list(data.train_dataloader()), list(data.val_dataloader())))
    (train0, val0), (train1, val1) = loaders
    assert len(train0) == len(train1) == 3 and len(val0) == len(val1) == 2
    assert train0[0].labels.shape == (32,)
    assert not torch.equal(train0[0].dense_features, train1[0].dense_features)
    assert not torch.equal(train0[0].dense_features, val0[0].dense_features)
    data.trainer = SimpleNamespace(global_rank=0, world_size=3)
    with pytest.raises(ValueError, match="does not divide by the world size 3"):
        data.setup("fit")
    with pytest.raises(ValueError, match="synthetic_model"):
        RecDataModule(synthetic_model="huge")


class _TinyModule(LightningModule):
    def __init__(self, data: RecDataModule) -> None:
        super().__init__()
        self.model = _LogisticModel(data.tables(), data.num_dense_features)

    def training_step(self, batch, batch_idx):
        return nn.functional.binary_cross_entropy_with_logits(self.model(batch), batch.labels)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.binary_cross_entropy_with_logits(self.model(batch), batch.labels))

    def configure_optimizers(self):
        return torch.optim.Adagrad(self.parameters(), lr=0.1)


def test_datamodule_drives_a_trainer(one_thread) -> None:
    data = RecDataModule(
        synthetic_model="tiny", scale=0.001, global_batch_size=256, train_batches=4, val_batches=2
    )
    trainer = Trainer(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(_TinyModule(data), datamodule=data)
    assert trainer.global_step == 8
    assert "val_loss" in trainer.callback_metrics
