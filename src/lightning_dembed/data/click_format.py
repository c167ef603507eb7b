"""The click-data format: preprocessed click logs on disk, and a sharded reader of them.

A click data directory holds Arrow IPC stream files (``part-00000.arrow``..., each one also opens
with ``datasets.Dataset.from_file``) and ``metadata.json`` (`ClickDataInfo`): every row a label,
a dense feature vector and one id (or a fixed number of ids) per sparse feature. `ClickDataWriter`
writes one atomically; `ClickDataset` memory-maps it and yields `Batch`es. Criteo's `preprocess`
and synthetic data's `materialize` write this format.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_dembed import _atomic
from lightning_dembed.data.batch import Batch
from lightning_dembed.data.position import ResumablePasses

__all__ = ["ClickDataInfo", "ClickDataWriter", "ClickDataset"]

PathLike = Union[str, Path]

_METADATA = "metadata.json"


def _rank_and_world_size(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    """Explicit values win; otherwise torch.distributed's, when it is initialised; otherwise 0 of 1."""
    if rank is None and world_size is None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return rank, world_size


@dataclass(frozen=True)
class ClickDataInfo:
    """What ``metadata.json`` of a preprocessed click data directory says.

    Every part file has the columns ``label`` (int8), ``dense`` (fixed-size list of float32) and one
    int32 column per sparse feature (a fixed-size list of int32 for a multi-hot one).
    """

    feature_names: tuple[str, ...]
    num_embeddings: tuple[int, ...]
    hotness: tuple[int, ...]
    num_dense_features: int
    files: tuple[str, ...] = ()
    rows_per_file: tuple[int, ...] = ()
    num_malformed: int = 0

    @property
    def num_rows(self) -> int:
        return sum(self.rows_per_file)

    def tables(self, embedding_dim: int) -> list[EmbeddingBagConfig]:
        """One table ``t_<feature>`` per feature, sized by ``num_embeddings``."""
        return [
            EmbeddingBagConfig(name=f"t_{name}", num_embeddings=rows, embedding_dim=embedding_dim,
                               feature_names=[name])
            for name, rows in zip(self.feature_names, self.num_embeddings)
        ]

    def schema(self) -> pa.Schema:
        fields = [
            pa.field("label", pa.int8()),
            pa.field("dense", pa.list_(pa.float32(), self.num_dense_features)),
        ]
        for name, hotness in zip(self.feature_names, self.hotness):
            fields.append(pa.field(name, pa.int32() if hotness == 1 else pa.list_(pa.int32(), hotness)))
        return pa.schema(fields)

    @classmethod
    def load(cls, path: PathLike) -> "ClickDataInfo":
        metadata = Path(path) / _METADATA
        if not metadata.is_file():
            raise FileNotFoundError(
                f"{path} is not a preprocessed click data directory (no {_METADATA}); make one with "
                "`lightning-dembed preprocess-criteo --input ... --output ...` or `materialize`"
            )
        fields = json.loads(metadata.read_text())
        return cls(**{key: tuple(value) if isinstance(value, list) else value
                      for key, value in fields.items()})


class ClickDataWriter:
    """Writes a click data directory, all or nothing (`lightning_dembed._atomic`).

    Parts go to a new version directory beside ``path``, which `commit` fsyncs and publishes at
    ``path`` (a link to it); leaving the ``with`` block without committing (an error, say) deletes
    it, and what a killed writer left is removed by the next write to ``path``.

    Example::

        with ClickDataWriter("out", info) as writer:
            writer.write_part(record_batches)  # one part-NNNNN.arrow file per call
            info = writer.commit()
    """

    def __init__(self, path: PathLike, info: ClickDataInfo) -> None:
        self.path = Path(path)
        if self.path.exists() or self.path.is_symlink():
            raise FileExistsError(f"{self.path} already exists; remove it or choose another output directory")
        self.info = info
        self._schema = info.schema()
        self._version: Optional[Path] = None
        self._files: list[str] = []
        self._rows: list[int] = []

    def __enter__(self) -> "ClickDataWriter":
        self._version = _atomic.new_version(self.path)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _atomic.discard(self.path, self._version)  # keeps it once committed

    def write_part(self, record_batches: Iterable[pa.RecordBatch]) -> int:
        """Write one part file; returns its number of rows."""
        name = f"part-{len(self._files):05d}.arrow"
        rows = 0
        # The IPC stream format is what `datasets` memory-maps, so each part is also a HF dataset.
        with (
            pa.OSFile(str(self._version / name), "wb") as sink,
            pa.ipc.new_stream(sink, self._schema) as writer,
        ):
            for record_batch in record_batches:
                writer.write_batch(record_batch)
                rows += record_batch.num_rows
        self._files.append(name)
        self._rows.append(rows)
        return rows

    def commit(self, num_malformed: int = 0) -> ClickDataInfo:
        """Write ``metadata.json`` and publish the directory at ``path``; returns its metadata."""
        if sum(self._rows) == 0:
            raise ValueError(f"no rows were written for {self.path}")
        info = replace(
            self.info, files=tuple(self._files), rows_per_file=tuple(self._rows), num_malformed=num_malformed,
        )
        (self._version / _METADATA).write_text(json.dumps(asdict(info), indent=1))
        _atomic.publish(self.path, self._version)
        return info


class ClickDataset(ResumablePasses, IterableDataset):
    """Batches from a preprocessed click data directory (Criteo, or `materialize`'s synthetic data).

    The rows ``row_range`` (default: all) are cut into ``world_size`` equal contiguous slices, one
    per rank; each rank reads whole batches from the start of its slice, the same number on every
    rank (so no rank waits on a collective the others never reach). The rows left over at the end of
    each slice are dropped: at most ``batch_size - 1`` per rank, plus ``(stop - start) % world_size``.
    With ``shuffle``, each pass reads the batches in an order drawn from ``(seed, pass number)``;
    rows inside a batch stay together, so reads remain sequential. Files are memory-mapped, so a
    batch costs one copy of its rows.

    Args:
        path: the directory `preprocess` (or `materialize`) wrote.
        batch_size: rows per batch (per rank).
        row_range: ``(start, stop)`` global rows to read; default all.
        num_batches: batches per rank; default as many as the slice holds. More is an error.
        shuffle: read batches in a seeded random order, new every pass.
        seed: seeds the order.
        rank: this process's rank; with ``world_size`` left out, taken from ``torch.distributed``
            when it is initialised, else 0.
        world_size: number of ranks.

    Example::

        data = ClickDataset("criteo_pre", batch_size=4096, shuffle=True, rank=0, world_size=2)
        batch = next(iter(data))
        batch.dense_features.shape, batch.sparse_features.keys()[:2]  # ([4096, 13], ['cat_0', 'cat_1'])
    """

    def __init__(
        self,
        path: PathLike,
        batch_size: int,
        row_range: Optional[tuple[int, int]] = None,
        num_batches: Optional[int] = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.path = Path(path)
        self.info = ClickDataInfo.load(self.path)
        start, stop = row_range if row_range is not None else (0, self.info.num_rows)
        if not 0 <= start <= stop <= self.info.num_rows:
            raise ValueError(
                f"row_range {row_range} is not inside the {self.info.num_rows} rows of {self.path}"
            )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = _rank_and_world_size(rank, world_size)
        rows_per_rank = (stop - start) // self.world_size
        available = rows_per_rank // batch_size
        if num_batches is not None and num_batches > available:
            raise ValueError(
                f"{num_batches} batches per rank requested from rows [{start}, {stop}) of {self.path}, but "
                f"{self.world_size} ranks with batch_size {batch_size} have only {available} each"
            )
        self.num_batches = available if num_batches is None else num_batches
        if self.num_batches < 1:
            raise ValueError(
                f"rows [{start}, {stop}) of {self.path} hold no full batch of {batch_size} rows for each of "
                f"{self.world_size} ranks"
            )
        self._first_row = start + self.rank * rows_per_rank
        self._file_starts = np.cumsum((0, *self.info.rows_per_file)).tolist()

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        order = np.arange(self.num_batches)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        order = order[self._take_start_batch():]
        self.epoch += 1
        worker = get_worker_info()
        first, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for index in order[first::step]:
            yield self._batch(self._first_row + int(index) * self.batch_size)

    @cached_property
    def _tables(self) -> list[pa.Table]:
        # Opened lazily, so that only paths travel to DataLoader workers; zero-copy from the mapping.
        return [
            pa.ipc.open_stream(pa.memory_map(str(self.path / name))).read_all() for name in self.info.files
        ]

    @cached_property
    def _lengths(self) -> torch.Tensor:
        return torch.from_numpy(np.repeat(np.array(self.info.hotness, dtype=np.int32), self.batch_size))

    def _rows(self, start: int) -> pa.Table:
        stop = start + self.batch_size
        pieces = []
        file = bisect_right(self._file_starts, start) - 1
        while start < stop:
            offset = start - self._file_starts[file]
            piece = self._tables[file].slice(offset, stop - start)
            pieces.append(piece)
            start += piece.num_rows
            file += 1
        return pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces)

    def _batch(self, start: int) -> Batch:
        rows = self._rows(start)
        # A copy: the mapped buffers are read-only, torch tensors are not.
        dense = pc.list_flatten(rows["dense"]).to_numpy().reshape(self.batch_size, -1).copy()
        sparse_columns = []
        for name, hotness in zip(self.info.feature_names, self.info.hotness):
            column = rows[name]
            sparse_columns.append((column if hotness == 1 else pc.list_flatten(column)).to_numpy())
        sparse = KeyedJaggedTensor(
            keys=list(self.info.feature_names),
            values=torch.from_numpy(np.concatenate(sparse_columns, dtype=np.int64)),
            lengths=self._lengths,
            stride=self.batch_size,
        )
        labels = torch.from_numpy(rows["label"].to_numpy().astype(np.float32))
        return Batch(dense_features=torch.from_numpy(dense), sparse_features=sparse, labels=labels)
