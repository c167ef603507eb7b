"""Merlin Distributed Embeddings' synthetic recommender models, and click data generated for them.

The six models (Tiny to Colossal) follow the table layout of Merlin DE's synthetic benchmark (its
``config_v3``): groups of identical tables, a few of them read by a one-hot and a multi-hot feature
at once, the rest by one one-hot feature each. `SyntheticClickDataset` generates batches for any of
them on the fly, fast enough that a trainer never waits: ids follow a power law, as real click logs
do, and labels come from a hidden model fixed by the seed, so that a model that learns does better
than chance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Iterator, Literal, Optional, Union

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_dembed.data.batch import Batch
from lightning_dembed.data.click_format import ClickDataInfo, ClickDataWriter, _rank_and_world_size
from lightning_dembed.data.position import ResumablePasses

__all__ = [
    "SYNTHETIC_MODELS",
    "SyntheticClickDataset",
    "SyntheticModelConfig",
    "TableGroup",
    "materialize",
]

Split = Literal["train", "val", "test"]
_SPLITS = ("train", "val", "test")
# A floor for small scales: every table keeps a row for each rank of an 8-way row-wise split.
MIN_ROWS = 8
# Hidden model: each feature scores ids by their low bits, so the hot ids (the small ones) each get
# their own score, which is what an embedding table can learn.
_TRUTH_BUCKETS = 4096
# Logit = bias + sparse part + dense part; these standard deviations give a best possible AUC of
# 0.8-0.85 and a click rate of 25-40 % (Criteo's: AUC 0.80 for the best models, clicks 3-25 %).
_SPARSE_LOGIT_STD = 1.5
_DENSE_LOGIT_STD = 1.0
_LOGIT_BIAS = -1.0


@dataclass(frozen=True)
class TableGroup:
    """``count`` identical tables, each read by one feature per entry of ``hotness``.

    ``hotness=(1, 10)`` is Merlin DE's ``shared`` table: a one-hot and a 10-hot feature look up the
    same table.
    """

    count: int
    num_embeddings: int
    embedding_dim: int
    hotness: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class _Feature:
    name: str
    table: str
    num_embeddings: int
    hotness: int


@dataclass(frozen=True)
class SyntheticModelConfig:
    """The embedding tables and dense width of one synthetic recommender model.

    Tables are named ``t0..tN`` and features ``f0..fM`` in the order of ``table_groups`` (a table
    read by two features, as in ``hotness=(1, 10)``, has two consecutive feature names). Weights are
    fp32.

    Args:
        name: model name, as in `SYNTHETIC_MODELS`.
        table_groups: the tables, group by group.
        num_dense_features: width of the dense input.

    Example::

        config = SYNTHETIC_MODELS["tiny"]
        config.num_tables, round(config.size_bytes() / 2**30, 1)  # (55, 4.2)
        tables = config.tables(scale=0.001)  # same tables with 1/1000 of the rows (at least 8)
        tables[0].name, tables[0].feature_names, tables[0].num_embeddings  # ('t0', ['f0', 'f1'], 10)
    """

    name: str
    table_groups: tuple[TableGroup, ...]
    num_dense_features: int

    @property
    def num_tables(self) -> int:
        return sum(group.count for group in self.table_groups)

    def tables(self, scale: float = 1.0) -> list[EmbeddingBagConfig]:
        """The tables with ``num_embeddings`` multiplied by ``scale`` (at least ``MIN_ROWS``)."""
        features_by_table: dict[str, list[_Feature]] = {}
        for feature in self._features(scale):
            features_by_table.setdefault(feature.table, []).append(feature)
        dims = [group.embedding_dim for group in self.table_groups for _ in range(group.count)]
        return [
            EmbeddingBagConfig(
                name=table, num_embeddings=features[0].num_embeddings, embedding_dim=dim,
                feature_names=[feature.name for feature in features],
            )
            for (table, features), dim in zip(features_by_table.items(), dims)
        ]

    def size_bytes(self, scale: float = 1.0) -> int:
        """Bytes of all fp32 table weights at ``scale``."""
        return sum(4 * table.num_embeddings * table.embedding_dim for table in self.tables(scale))

    def _features(self, scale: float) -> list[_Feature]:
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        features = []
        table_index = 0
        for group in self.table_groups:
            rows = max(MIN_ROWS, int(group.num_embeddings * scale))
            for _ in range(group.count):
                for hotness in group.hotness:
                    features.append(_Feature(f"f{len(features)}", f"t{table_index}", rows, hotness))
                table_index += 1
        return features


def _model(
    name: str, num_dense: int, groups: list[tuple[int, int, int, tuple[int, ...]]]
) -> SyntheticModelConfig:
    return SyntheticModelConfig(name, tuple(TableGroup(*group) for group in groups), num_dense)


# (count, rows, width, hotness) per group, from Merlin DE's synthetic benchmark. Table counts and
# sizes: 55 / 4.2 GiB, 107 / 26.3, 311 / 206.2, 612 / 773.8, 1022 / 3109.5, 2002 / 22327.4.
SYNTHETIC_MODELS: dict[str, SyntheticModelConfig] = {
    "tiny": _model("tiny", 10, [
        (1, 10_000, 8, (1, 10)), (1, 1_000_000, 16, (1, 10)), (1, 25_000_000, 16, (1, 10)),
        (1, 25_000_000, 16, (1,)), (16, 10, 8, (1,)), (10, 1_000, 8, (1,)), (4, 10_000, 8, (1,)),
        (2, 100_000, 16, (1,)), (19, 1_000_000, 16, (1,)),
    ]),
    "small": _model("small", 10, [
        (5, 10_000, 16, (1, 30)), (3, 4_000_000, 32, (1, 30)), (1, 50_000_000, 32, (1, 30)),
        (1, 50_000_000, 32, (1,)), (30, 10, 16, (1,)), (30, 1_000, 16, (1,)), (5, 10_000, 16, (1,)),
        (5, 100_000, 32, (1,)), (27, 4_000_000, 32, (1,)),
    ]),
    "medium": _model("medium", 25, [
        (20, 100_000, 64, (1, 50)), (5, 10_000_000, 64, (1, 50)), (1, 100_000_000, 128, (1, 50)),
        (1, 100_000_000, 128, (1,)), (80, 10, 32, (1,)), (60, 1_000, 32, (1,)), (80, 100_000, 64, (1,)),
        (24, 200_000, 64, (1,)), (40, 10_000_000, 64, (1,)),
    ]),
    "large": _model("large", 100, [
        (40, 100_000, 64, (1, 100)), (16, 15_000_000, 64, (1, 100)), (1, 200_000_000, 128, (1, 100)),
        (1, 200_000_000, 128, (1,)), (100, 10, 32, (1,)), (100, 10_000, 32, (1,)),
        (160, 100_000, 64, (1,)), (50, 500_000, 64, (1,)), (144, 15_000_000, 64, (1,)),
    ]),
    "jumbo": _model("jumbo", 200, [
        (50, 100_000, 128, (1, 200)), (24, 20_000_000, 128, (1, 200)), (1, 400_000_000, 256, (1, 200)),
        (1, 400_000_000, 256, (1,)), (100, 10, 32, (1,)), (200, 10_000, 64, (1,)),
        (350, 100_000, 128, (1,)), (80, 1_000_000, 128, (1,)), (216, 20_000_000, 128, (1,)),
    ]),
    "colossal": _model("colossal", 500, [
        (100, 100_000, 128, (1, 300)), (50, 40_000_000, 256, (1, 300)),
        (1, 2_000_000_000, 256, (1, 300)), (1, 1_000_000_000, 256, (1,)), (100, 10, 32, (1,)),
        (400, 10_000, 128, (1,)), (100, 100_000, 128, (1,)), (800, 1_000_000, 128, (1,)),
        (450, 40_000_000, 256, (1,)),
    ]),
}


@dataclass(frozen=True)
class _Layout:
    """Per-value constants of one batch, in `KeyedJaggedTensor` order (feature by feature, row by row)."""

    lengths: torch.Tensor  # [F * B] int32
    span: np.ndarray  # [V] float64: (rows + 1) ** (1 - alpha) - 1, the inverse-CDF scale
    max_id: np.ndarray  # [V] int64: rows - 1
    score_offset: np.ndarray  # [V] int64: feature index * _TRUTH_BUCKETS
    score_weight: np.ndarray  # [V] float32: 1 / hotness, so a bag scores the mean of its ids
    row: np.ndarray  # [V] int64: the row each value belongs to


class SyntheticClickDataset(ResumablePasses, IterableDataset):
    """Click batches for a synthetic model, generated on the fly, one rank's share.

    Batch ``i`` of rank ``r`` depends only on ``(seed, split, r, i)``, so a stream is reproducible
    and ranks never see the same rows. Ids of a table with ``N`` rows follow a power law
    ``P(id = k) ~ (k + 1) ** -alpha`` (id 0 the most frequent); multi-hot features always have
    their group's hotness. Labels are drawn from a hidden logistic model fixed by ``seed`` alone
    (the same for every split): a per-feature score of each id's low bits plus a linear function of
    the dense features. DataLoader workers split the batches between them and yield them in order.

    Args:
        config: the model whose tables the ids index.
        batch_size: rows per batch (per rank).
        num_batches: batches per rank.
        scale: table row scale, as in `SyntheticModelConfig.tables`.
        seed: seeds both the stream and the hidden model.
        split: ``"train"``, ``"val"`` or ``"test"``: a different stream of the same hidden model.
        alpha: power-law exponent of the ids (positive).
        rank: this process's rank; with ``world_size`` left out, taken from ``torch.distributed``
            when it is initialised, else 0.
        world_size: number of ranks.

    Example::

        config = SYNTHETIC_MODELS["tiny"]
        data = SyntheticClickDataset(config, batch_size=1024, num_batches=10, scale=0.001)
        batch = next(iter(data))
        batch.dense_features.shape, batch.labels.shape  # ([1024, 10], [1024])
        batch.sparse_features.keys()[:2], batch.sparse_features["f1"].lengths()[:3]
        # (['f0', 'f1'], tensor([10, 10, 10], dtype=torch.int32)): f0 one-hot, f1 10-hot on table t0
    """

    def __init__(
        self,
        config: SyntheticModelConfig,
        batch_size: int,
        num_batches: int,
        scale: float = 1.0,
        seed: int = 0,
        split: Split = "train",
        alpha: float = 1.05,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_batches < 1:
            raise ValueError(f"batch_size and num_batches must be positive, got {batch_size}, {num_batches}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.config = config
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.scale = scale
        self.seed = seed
        self.split = split
        self.alpha = alpha
        self.rank, self.world_size = _rank_and_world_size(rank, world_size)
        self._features = config._features(scale)
        self.feature_names = [feature.name for feature in self._features]

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        # Every pass is the same stream; a resumed pass starts where the saved one stood.
        start = self._take_start_batch()
        self.epoch += 1
        worker = get_worker_info()
        first, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for index in range(start + first, self.num_batches, step):
            yield self.batch(index)

    @cached_property
    def _truth(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, 0, 0, 0])
        num_features = len(self._features)
        scores = rng.standard_normal(num_features * _TRUTH_BUCKETS, dtype=np.float32)
        scores *= _SPARSE_LOGIT_STD / math.sqrt(num_features)
        dense_weights = rng.standard_normal(self.config.num_dense_features) * (
            _DENSE_LOGIT_STD / math.sqrt(max(1, self.config.num_dense_features))
        )
        return scores, dense_weights.astype(np.float32)

    @cached_property
    def _layout(self) -> _Layout:
        rows = np.array([f.num_embeddings for f in self._features], dtype=np.float64)
        hotness = np.array([f.hotness for f in self._features])
        repeat = partial(np.repeat, repeats=self.batch_size * hotness)
        span = (rows + 1) ** (1 - self.alpha) - 1 if self.alpha != 1 else np.log(rows + 1)
        return _Layout(
            lengths=torch.from_numpy(np.repeat(hotness, self.batch_size).astype(np.int32)),
            span=repeat(span),
            max_id=repeat(rows.astype(np.int64) - 1),
            score_offset=repeat(np.arange(len(self._features), dtype=np.int64) * _TRUTH_BUCKETS),
            score_weight=repeat(1 / hotness.astype(np.float32)),
            row=np.concatenate([np.repeat(np.arange(self.batch_size), h) for h in hotness]),
        )

    def batch(self, index: int) -> Batch:
        """Batch ``index`` (``0 <= index < num_batches``) of this rank's stream."""
        layout = self._layout
        rng = np.random.default_rng([self.seed, 1 + _SPLITS.index(self.split), self.rank, index])
        # Inverse CDF of a continuous power law on [1, rows + 1), floored to 0-based ids: float64,
        # so that every id of a large table can come up, and torch's vectorised log and exp, about
        # twice as fast as numpy's pow.
        x = torch.from_numpy(np.multiply(layout.span, rng.random(layout.span.size)))
        if self.alpha != 1:
            x.add_(1).log_().mul_(1 / (1 - self.alpha))
        ids = x.exp_().numpy().astype(np.int64)
        ids -= 1
        np.minimum(ids, layout.max_id, out=ids)
        dense = rng.standard_normal((self.batch_size, self.config.num_dense_features), dtype=np.float32)

        scores, dense_weights = self._truth
        value_scores = scores[layout.score_offset + (ids & (_TRUTH_BUCKETS - 1))] * layout.score_weight
        logits = _LOGIT_BIAS + np.bincount(layout.row, weights=value_scores, minlength=self.batch_size)
        logits += dense @ dense_weights
        labels = (rng.random(self.batch_size) < 1 / (1 + np.exp(-logits))).astype(np.float32)

        sparse = KeyedJaggedTensor(
            keys=self.feature_names, values=torch.from_numpy(ids), lengths=layout.lengths,
            stride=self.batch_size,
        )
        return Batch(
            dense_features=torch.from_numpy(dense), sparse_features=sparse, labels=torch.from_numpy(labels)
        )


def _to_record_batch(batch: Batch, feature_names: list[str], hotness: list[int]) -> pa.RecordBatch:
    dense = batch.dense_features.numpy()
    values = batch.sparse_features.values().numpy().astype(np.int32)
    columns = {
        "label": pa.array(batch.labels.numpy().astype(np.int8)),
        "dense": pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1)), dense.shape[1]),
    }
    start = 0
    for name, h in zip(feature_names, hotness):
        end = start + h * dense.shape[0]
        ids = pa.array(values[start:end])
        columns[name] = ids if h == 1 else pa.FixedSizeListArray.from_arrays(ids, h)
        start = end
    return pa.RecordBatch.from_pydict(columns)


def materialize(
    config: SyntheticModelConfig,
    scale: float,
    path: Union[str, Path],
    num_rows: int,
    seed: int = 0,
    split: Split = "train",
    alpha: float = 1.05,
    rows_per_chunk: int = 65536,
) -> ClickDataInfo:
    """Write ``num_rows`` rows of the ``split`` stream to ``path`` in the preprocessed click format.

    The rows are those `SyntheticClickDataset` yields with ``batch_size=rows_per_chunk`` on one rank;
    `ClickDataset` reads them back (a multi-hot feature is a fixed-size list column). The
    directory appears only once it is complete.
    """
    if num_rows < 1:
        raise ValueError(f"num_rows must be positive, got {num_rows}")
    rows_per_chunk = min(rows_per_chunk, num_rows)
    data = SyntheticClickDataset(
        config, rows_per_chunk, math.ceil(num_rows / rows_per_chunk), scale, seed, split, alpha,
        rank=0, world_size=1,
    )
    hotness = [feature.hotness for feature in data._features]

    def record_batches() -> Iterator[pa.RecordBatch]:
        for index in range(data.num_batches):
            record_batch = _to_record_batch(data.batch(index), data.feature_names, hotness)
            yield record_batch.slice(0, min(rows_per_chunk, num_rows - index * rows_per_chunk))

    info = ClickDataInfo(
        feature_names=tuple(data.feature_names),
        num_embeddings=tuple(feature.num_embeddings for feature in data._features),
        hotness=tuple(hotness),
        num_dense_features=config.num_dense_features,
    )
    with ClickDataWriter(path, info) as writer:
        writer.write_part(record_batches())
        return writer.commit()
