"""Task-consistent batching from a task store (G-Meta's Meta-IO loader).

Reading a meta-batch from a `TaskStore` is a few contiguous row ranges of memory-mapped columns:
`MetaBatchDataset` gathers ``tasks_per_batch`` whole tasks into one `TaskBatch` (one
`KeyedJaggedTensor`), tasks dealt to ranks, in DataLoader workers; `QueryRowDataset` reads the
same rows as plain `Batch`es.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_dembed.data.batch import Batch, TaskBatch
from lightning_dembed.data.position import ResumablePasses
from lightning_dembed.data.task_store import TaskSplit, _ranges

__all__ = ["MetaBatchDataset", "QueryRowDataset"]


def _rank_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise ValueError(
            f"give both rank and world_size, or neither (got rank={rank}, world_size={world_size})"
        )
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_TORCH_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
}


def _packed(arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """Copies of the arrays as tensors that all share one storage.

    A DataLoader worker hands each storage to the main process as its own shared-memory block;
    one block per batch instead of one per tensor made worker-built meta-batches 3x faster.
    """
    words = [-(-a.nbytes // 8) for a in arrays]  # 8-byte aligned for every dtype
    buffer = torch.empty(sum(words), dtype=torch.int64)
    raw = buffer.numpy().view(np.uint8)
    typed: dict[torch.dtype, torch.Tensor] = {}
    tensors, offset = [], 0
    for array, size in zip(arrays, words):
        raw[offset : offset + array.nbytes].view(array.dtype)[:] = array.reshape(-1)
        dtype = _TORCH_DTYPES[array.dtype]
        whole = typed.setdefault(dtype, buffer.view(dtype))
        strides = [math.prod(array.shape[i + 1 :]) for i in range(array.ndim)]
        tensors.append(whole.as_strided(array.shape, strides, offset // dtype.itemsize))
        offset += 8 * size
    return tensors


class _RowReader:
    """Gathers rows of a `TaskSplit` into tensors: numpy gathers over memory-mapped columns."""

    def __init__(self, tasks: TaskSplit) -> None:
        self.tasks = tasks
        self._columns: Optional[dict[str, np.ndarray]] = None

    @property
    def columns(self) -> dict[str, np.ndarray]:
        # Opened lazily in each DataLoader worker: views of a memory map are not pickled.
        if self._columns is None:
            names = self.tasks.categorical + self.tasks.dense + ["label"]
            self._columns = {c: self.tasks.column(c) for c in names}
        return self._columns

    def __getstate__(self) -> dict:
        return {"tasks": self.tasks, "_columns": None}

    def gather(
        self, rows: np.ndarray, extra: Sequence[np.ndarray] = ()
    ) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor, list[torch.Tensor]]:
        """``(dense [R, num_dense], KJT, labels [R], extra as int64 tensors)`` of the given rows."""
        cols, tasks = self.columns, self.tasks
        # One id per row and feature: KJT values are feature-major, all lengths 1.
        values = np.concatenate([cols[c][rows] for c in tasks.categorical])
        dense = (
            np.stack([cols[c][rows] for c in tasks.dense], axis=1)
            if tasks.dense
            else np.zeros((rows.size, 0), dtype=np.float32)
        )
        dense, values, lengths, labels, *extras = _packed(
            [
                dense,
                values,
                np.ones(values.size, dtype=np.int32),
                cols["label"][rows],
                *[np.asarray(e, dtype=np.int64) for e in extra],
            ]
        )
        return (
            dense,
            KeyedJaggedTensor(keys=tasks.categorical, values=values, lengths=lengths),
            labels,
            extras,
        )


def _worker_share(items: list) -> list:
    info = get_worker_info()
    return items if info is None else items[info.id :: info.num_workers]


def _batches_per_rank(items: int, per_batch: int, world_size: int, drop_last: bool) -> int:
    if drop_last:
        return items // (per_batch * world_size)
    # Enough batches for every item, but never so many that a rank is left with an empty one.
    return min(-(-items // (per_batch * world_size)), items // world_size)


def _deal(order: np.ndarray, per_batch: int, rank: int, world_size: int, drop_last: bool) -> list[np.ndarray]:
    """This rank's batches of ``order``; every rank gets as many (collectives need each rank's step).

    With ``drop_last`` every batch holds ``per_batch`` items and the tail that cannot fill one on
    every rank waits for another pass; without it every item is in exactly one batch, and batches
    hold at most ``per_batch`` items (one more only with fewer than ``per_batch`` items per rank).
    """
    count = _batches_per_rank(order.size, per_batch, world_size, drop_last)
    if drop_last:
        return list(order[: count * per_batch * world_size][rank::world_size].reshape(count, per_batch))
    return np.array_split(order, count * world_size)[rank::world_size]


class MetaBatchDataset(ResumablePasses, IterableDataset):
    """Task-consistent meta-batches: every row of a task in one `TaskBatch`, on one rank.

    Each pass shuffles the tasks (by ``seed`` and the epoch), deals them to ranks (disjoint), and
    groups ``tasks_per_batch`` of them per meta-batch; every rank gets ``len(self)`` meta-batches.
    In training (``drop_last``) the last ``num_tasks mod (tasks_per_batch * world_size)`` tasks of
    the shuffled order wait for a later pass; for evaluation ``drop_last=False`` scores every task
    once, some meta-batches holding fewer tasks. A meta-batch is built with a few numpy gathers of contiguous row ranges and
    one `KeyedJaggedTensor`, all its tensors in one block of memory. Use it with
    ``DataLoader(data, batch_size=None, num_workers=k, prefetch_factor=p)`` to build batches in
    background workers; several workers take turns, and batches keep their order.

    The epoch advances each time a copy of the dataset is iterated (in the main process, or in
    persistent workers); with non-persistent workers call `set_epoch` before each epoch.

    Args:
        tasks: the split to read (``store.train``, ``store.cold_start``, or a `TaskSplit.task_range`).
        tasks_per_batch: tasks per meta-batch and rank.
        shuffle: reshuffle every epoch; False keeps the store order (evaluation).
        seed: seed of the shuffles.
        rank: this rank; with ``world_size``, or both from ``torch.distributed`` when left out.
        world_size: ranks sharing the tasks.
        drop_last: only full meta-batches (training); False covers every task (evaluation).

    Example::

        store = TaskStore.load("stores/ml")
        data = MetaBatchDataset(store.train, tasks_per_batch=32)
        loader = DataLoader(data, batch_size=None, num_workers=2, prefetch_factor=4, persistent_workers=True)
        batch = next(iter(loader))  # TaskBatch of 32 tasks
    """

    def __init__(
        self,
        tasks: TaskSplit,
        tasks_per_batch: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        drop_last: bool = True,
    ) -> None:
        if tasks_per_batch < 1:
            raise ValueError(f"tasks_per_batch must be >= 1, got {tasks_per_batch}")
        self.reader = _RowReader(tasks)
        self.tasks_per_batch, self.drop_last = tasks_per_batch, drop_last
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.rank, self.world_size = _rank_world(rank, world_size)
        if len(self) == 0:
            raise ValueError(
                f"{tasks.num_tasks} tasks make no meta-batch of {tasks_per_batch} tasks on each of "
                f"{self.world_size} "
                "ranks; lower tasks_per_batch or add tasks"
            )

    def __len__(self) -> int:
        return _batches_per_rank(self.reader.tasks.num_tasks, self.tasks_per_batch, self.world_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the next pass as epoch ``epoch``."""
        self.epoch = epoch

    def plan(self) -> list[np.ndarray]:
        """This rank's meta-batches of the current epoch, as arrays of task positions in the split."""
        order = np.arange(self.reader.tasks.num_tasks)
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(order)
        return _deal(order, self.tasks_per_batch, self.rank, self.world_size, self.drop_last)

    def batch(self, task_positions: np.ndarray) -> TaskBatch:
        """The `TaskBatch` of the given tasks (positions in the split), in that order."""
        tasks = self.reader.tasks
        starts = tasks.offsets[task_positions]
        lengths = tasks.offsets[task_positions + 1] - starts
        dense, kjt, labels, (offsets, support_sizes, keys) = self.reader.gather(
            _ranges(starts, lengths),
            extra=(
                np.concatenate(([0], np.cumsum(lengths))),
                tasks.support_sizes[task_positions],
                tasks.keys[task_positions],
            ),
        )
        return TaskBatch(
            dense_features=dense,
            sparse_features=kjt,
            labels=labels,
            task_offsets=offsets,
            support_sizes=support_sizes,
            task_keys=keys,
        )

    def __iter__(self) -> Iterator[TaskBatch]:
        plan = self.plan()[self._take_start_batch():]
        self.epoch += 1
        for task_positions in _worker_share(plan):
            yield self.batch(task_positions)


class QueryRowDataset(ResumablePasses, IterableDataset):
    """Plain `Batch`es of a split's rows, for training and scoring a model without adaptation.

    ``query_only`` keeps just each task's query rows: the rows meta-learning is scored on, so a
    plain model's AUC on them compares with the meta-learned one's. Epochs and ``drop_last``
    work as in `MetaBatchDataset`.

    Example::

        data = QueryRowDataset(store.cold_start, batch_size=512, query_only=True, shuffle=False)
    """

    def __init__(
        self,
        tasks: TaskSplit,
        batch_size: int,
        query_only: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        drop_last: bool = True,
    ) -> None:
        self.reader = _RowReader(tasks)
        self.batch_size, self.drop_last = batch_size, drop_last
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.rank, self.world_size = _rank_world(rank, world_size)
        starts = tasks.offsets[:-1] + (tasks.support_sizes if query_only else 0)
        self.rows = _ranges(starts, tasks.offsets[1:] - starts)
        if len(self) == 0:
            raise ValueError(
                f"{self.rows.size} rows make no batch of {batch_size} on each of {self.world_size} ranks"
            )

    def __len__(self) -> int:
        return _batches_per_rank(self.rows.size, self.batch_size, self.world_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the next pass as epoch ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        rows = self.rows
        if self.shuffle:
            rows = np.random.default_rng((self.seed, self.epoch)).permutation(rows)
        self.epoch += 1
        mine = _deal(rows, self.batch_size, self.rank, self.world_size, self.drop_last)
        for batch_rows in _worker_share(mine[self._take_start_batch():]):
            dense, kjt, labels, _ = self.reader.gather(np.sort(batch_rows))
            yield Batch(dense_features=dense, sparse_features=kjt, labels=labels)
