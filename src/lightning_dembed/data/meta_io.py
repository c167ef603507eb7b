"""Meta-IO: task-grouped storage and task-consistent batching (G-Meta's data pipeline).

`build_task_store` turns an interactions table (parquet, CSV or Arrow) into Arrow files, via HF
``datasets``, whose rows are grouped task by task, each task's support rows before its query rows,
with the task boundaries beside them. Reading a meta-batch is then a few contiguous slices of
memory-mapped columns: `MetaBatchDataset` gathers ``tasks_per_batch`` whole tasks into one
`TaskBatch` (one `KeyedJaggedTensor`), tasks sharded across ranks, in DataLoader workers.
"""

from __future__ import annotations

import json
import operator
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from datasets import Dataset
from datasets.table import InMemoryTable
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_dembed.data.batch import Batch, TaskBatch

__all__ = ["MetaBatchDataset", "QueryRowDataset", "TaskStore", "build_task_store", "parse_label_rule"]

_TASKS_FILE = "tasks.npz"
_STATS_FILE = "stats.json"
_SPLITS = ("train", "cold_start")
_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq, "!=": operator.ne}


def parse_label_rule(rule: str) -> tuple[str, str, float]:
    """``"rating >= 4"`` -> ``("rating", ">=", 4.0)``; no eval, only ``column op number``."""
    match = re.fullmatch(r"\s*(\w+)\s*(>=|<=|==|!=|>|<)\s*(-?\d+(?:\.\d+)?)\s*", rule)
    if match is None:
        raise ValueError(f"label_rule {rule!r} is not of the form 'column op number' (op one of {list(_OPS)})")
    return match.group(1), match.group(2), float(match.group(3))


def _read(source: Union[str, Path, pa.Table]) -> pa.Table:
    if isinstance(source, pa.Table):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"interactions file {path} does not exist")
    if path.suffix == ".parquet":
        return Dataset.from_parquet(str(path)).data.table
    if path.suffix == ".csv":
        return Dataset.from_csv(str(path)).data.table
    raise ValueError(f"{path}: interactions must be .parquet or .csv")


def _ids(column: pa.ChunkedArray, rows: int) -> np.ndarray:
    """Any categorical column as non-negative int64 ids (strings by first appearance)."""
    if pa.types.is_integer(column.type):
        return np.abs(column.to_numpy().astype(np.int64))
    return np.unique(column.to_numpy(zero_copy_only=False), return_inverse=True)[1].astype(np.int64).reshape(rows)


@dataclass
class TaskStore:
    """One split of a task store: memory-mapped rows and the task boundaries over them.

    ``offsets[t]:offsets[t + 1]`` are task ``t``'s rows, the first ``support_sizes[t]`` its support set.
    """

    dataset: Dataset
    offsets: np.ndarray
    support_sizes: np.ndarray
    keys: np.ndarray
    single_class: np.ndarray
    categorical: list[str]
    dense: list[str]

    @classmethod
    def load(cls, directory: Union[str, Path], split: str = "train") -> "TaskStore":
        directory = Path(directory)
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        if not (directory / _STATS_FILE).is_file():
            raise FileNotFoundError(f"{directory} is not a task store (no {_STATS_FILE}); build it with build_task_store")
        meta = json.loads((directory / _STATS_FILE).read_text())
        tasks = np.load(directory / split / _TASKS_FILE)
        return cls(
            dataset=Dataset.load_from_disk(str(directory / split / "rows")),
            offsets=tasks["offsets"], support_sizes=tasks["support_sizes"], keys=tasks["keys"],
            single_class=tasks["single_class"], categorical=meta["categorical"], dense=meta["dense"],
        )

    @property
    def num_tasks(self) -> int:
        return self.support_sizes.size

    def column(self, name: str) -> np.ndarray:
        # Zero-copy view of the memory-mapped Arrow column.
        return self.dataset.data.column(name).to_numpy()

    def task_range(self, start: int, stop: int) -> "TaskStore":
        """Tasks ``start..stop - 1`` over the same rows (e.g. validation and test halves)."""
        return TaskStore(
            self.dataset, self.offsets[start: stop + 1], self.support_sizes[start:stop], self.keys[start:stop],
            self.single_class[start:stop], self.categorical, self.dense,
        )


def build_task_store(
    source: Union[str, Path, pa.Table],
    out_dir: Union[str, Path],
    task_key: str,
    categorical: Sequence[str],
    num_embeddings: Mapping[str, int],
    dense: Sequence[str] = (),
    label: Optional[str] = None,
    label_rule: Optional[str] = None,
    time_column: Optional[str] = None,
    split: Literal["time", "random"] = "time",
    support_fraction: float = 0.5,
    min_rows_per_task: int = 4,
    holdout_fraction: float = 0.1,
    seed: int = 0,
) -> dict:
    """Group an interactions table by task into a store `TaskStore.load` reads; returns its stats.

    Per task (rows sharing ``task_key``), rows are ordered by ``time_column`` (``split="time"``:
    the earliest ``support_fraction`` are the support set) or shuffled (``split="random"``).
    Tasks with fewer than ``min_rows_per_task`` rows are dropped and counted; tasks whose labels are
    all one class are kept and counted. ``holdout_fraction`` of the task keys, chosen by a hash of
    the key, form the ``cold_start`` split: tasks never seen in training. Categorical values are
    mapped into ``num_embeddings[column]`` rows (modulo; strings by their code). The labels are
    ``label`` or ``label_rule`` (e.g. ``"rating >= 4"``). The store is written beside ``out_dir``
    and renamed into place when complete.

    Example::

        stats = build_task_store("ratings.parquet", "stores/ml", task_key="user_id",
                                 categorical=["user_id", "item_id"], num_embeddings={"user_id": 10**5,
                                 "item_id": 10**4}, label_rule="rating >= 4", time_column="timestamp")
    """
    if (label is None) == (label_rule is None):
        raise ValueError("give exactly one of label (a 0/1 column) and label_rule (e.g. 'rating >= 4')")
    if not 0.0 < support_fraction < 1.0:
        raise ValueError(f"support_fraction must be in (0, 1), got {support_fraction}")
    table = _read(source)
    rule = parse_label_rule(label_rule) if label_rule is not None else None
    needed = [task_key, *categorical, *dense, *([label] if label else [rule[0]]), *([time_column] if time_column else [])]
    missing = sorted({c for c in needed if c not in table.column_names})
    if missing:
        raise ValueError(f"interactions have no column(s) {missing}; columns are {table.column_names}")
    unsized = [c for c in categorical if c not in num_embeddings]
    if unsized:
        raise ValueError(f"num_embeddings has no table size for categorical column(s) {unsized}")

    rows = table.num_rows
    if rule is not None:
        column, op, value = rule
        labels = _OPS[op](table.column(column).to_numpy(zero_copy_only=False), value).astype(np.float32)
    else:
        labels = table.column(label).to_numpy(zero_copy_only=False).astype(np.float32)
        if not np.isin(labels, (0.0, 1.0)).all():
            raise ValueError(f"label column {label!r} must hold 0/1 values; use label_rule to derive them")
    keys = _ids(table.column(task_key), rows)
    rng = np.random.default_rng(seed)
    secondary = table.column(time_column).to_numpy() if split == "time" and time_column else rng.random(rows)
    order = np.lexsort((secondary, keys))
    keys = keys[order]
    starts, counts = np.unique(keys, return_index=True, return_counts=True)[1:]
    task_keys = keys[starts]
    task_labels = np.add.reduceat(labels[order], starts)
    kept = counts >= min_rows_per_task
    single_class = (task_labels == 0) | (task_labels == counts)
    held_out = ((task_keys * 2654435761) % 2**32) / 2**32 < holdout_fraction

    columns = {c: _ids(table.column(c), rows)[order] % num_embeddings[c] for c in categorical}
    columns.update({c: table.column(c).to_numpy(zero_copy_only=False).astype(np.float32)[order] for c in dense})
    columns["label"] = labels[order]
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    stats = {
        "rows": int(rows), "tasks": int(starts.size), "dropped_too_small": int((~kept).sum()),
        "single_class": int((single_class & kept).sum()), "categorical": list(categorical), "dense": list(dense),
        "num_embeddings": {c: int(num_embeddings[c]) for c in categorical}, "split": split,
        "support_fraction": support_fraction,
    }
    for name, chosen in (("train", kept & ~held_out), ("cold_start", kept & held_out)):
        task_rows = [np.arange(s, s + n) for s, n in zip(starts[chosen], counts[chosen])]
        take = np.concatenate(task_rows) if task_rows else np.zeros(0, dtype=np.int64)
        sizes = counts[chosen]
        # One shard even when the split is empty, which load_from_disk can read back.
        Dataset(InMemoryTable(pa.table({c: v[take] for c, v in columns.items()}))).save_to_disk(
            str(partial / name / "rows"), num_shards=1
        )
        np.savez(
            partial / name / _TASKS_FILE,
            offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            support_sizes=np.clip(np.floor(sizes * support_fraction), 1, sizes - 1).astype(np.int64),
            keys=task_keys[chosen], single_class=single_class[chosen],
        )
        stats[f"{name}_tasks"] = int(chosen.sum())
        stats[f"{name}_rows"] = int(take.size)
    (partial / _STATS_FILE).write_text(json.dumps(stats, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return stats


def _rank_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _StoreReader:
    """Gathers rows of a `TaskStore` into batches (vectorised slices of the Arrow columns)."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self._columns: Optional[dict[str, np.ndarray]] = None

    @property
    def columns(self) -> dict[str, np.ndarray]:
        # Opened lazily in each DataLoader worker (memory maps do not pickle as views).
        if self._columns is None:
            names = self.store.categorical + self.store.dense + ["label"]
            self._columns = {c: self.store.column(c) for c in names}
        return self._columns

    def __getstate__(self) -> dict:
        return {"store": self.store, "_columns": None}

    def rows(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        total = int(lengths.sum())
        shift = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return np.arange(total) + shift

    def features(self, rows: np.ndarray) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
        cols = self.columns
        cat = self.store.categorical
        values = torch.from_numpy(np.concatenate([cols[c][rows] for c in cat]))
        kjt = KeyedJaggedTensor(keys=cat, values=values, lengths=torch.ones(values.numel(), dtype=torch.int64))
        dense = (np.stack([cols[c][rows] for c in self.store.dense], axis=1) if self.store.dense
                 else np.zeros((rows.size, 0), dtype=np.float32))
        return torch.from_numpy(dense), kjt, torch.from_numpy(cols["label"][rows])


def _worker_share(items: Sequence) -> Sequence:
    info = get_worker_info()
    return items if info is None else items[info.id:: info.num_workers]


class MetaBatchDataset(IterableDataset):
    """Task-consistent meta-batches: every row of a task in one `TaskBatch`, on one rank.

    Tasks are shuffled per pass (by ``seed`` and the pass number), dealt to ranks, and grouped
    ``tasks_per_batch`` at a time; every rank gets the same number of meta-batches (the remainder
    of tasks is left for the next pass). Use it with ``DataLoader(batch_size=None, num_workers=k)``
    to build batches in background workers.

    Example::

        data = MetaBatchDataset(TaskStore.load("stores/ml"), tasks_per_batch=32)
        batch = next(iter(data))  # TaskBatch with 32 tasks
    """

    def __init__(
        self,
        store: TaskStore,
        tasks_per_batch: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        self.reader = _StoreReader(store)
        self.tasks_per_batch = tasks_per_batch
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = _rank_world(rank, world_size)
        self._passes = 0
        if len(self) == 0:
            raise ValueError(
                f"{store.num_tasks} tasks make no meta-batch of {tasks_per_batch} tasks on each of {self.world_size} "
                "ranks; lower tasks_per_batch or add tasks"
            )

    def __len__(self) -> int:
        return self.reader.store.num_tasks // (self.tasks_per_batch * self.world_size)

    def _plan(self) -> list[np.ndarray]:
        store = self.reader.store
        order = np.arange(store.num_tasks)
        if self.shuffle:
            order = np.random.default_rng((self.seed, self._passes)).permutation(order)
        mine = order[self.rank:: self.world_size][: len(self) * self.tasks_per_batch]
        return list(mine.reshape(len(self), self.tasks_per_batch))

    def batch(self, tasks: np.ndarray) -> TaskBatch:
        store = self.reader.store
        starts = store.offsets[tasks]
        lengths = store.offsets[tasks + 1] - starts
        dense, kjt, labels = self.reader.features(self.reader.rows(starts, lengths))
        return TaskBatch(
            dense_features=dense, sparse_features=kjt, labels=labels,
            task_offsets=torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])),
            support_sizes=torch.from_numpy(store.support_sizes[tasks]),
            task_keys=torch.from_numpy(store.keys[tasks]),
        )

    def __iter__(self) -> Iterator[TaskBatch]:
        plan = self._plan()
        self._passes += 1
        for tasks in _worker_share(plan):
            yield self.batch(tasks)


class QueryRowDataset(IterableDataset):
    """Plain `Batch`es of a task store's rows, for training and scoring a model without adaptation.

    ``query_only`` keeps just each task's query rows: the rows meta-learning is scored on, so a plain
    model's AUC on them compares with the meta-learned one's.
    """

    def __init__(
        self,
        store: TaskStore,
        batch_size: int,
        query_only: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        self.reader = _StoreReader(store)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = _rank_world(rank, world_size)
        starts = store.offsets[:-1] + (store.support_sizes if query_only else 0)
        self.rows = self.reader.rows(starts, store.offsets[1:] - starts)
        self._passes = 0
        if len(self) == 0:
            raise ValueError(f"{self.rows.size} rows make no batch of {batch_size} on each of {self.world_size} ranks")

    def __len__(self) -> int:
        return self.rows.size // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[Batch]:
        rows = self.rows
        if self.shuffle:
            rows = np.random.default_rng((self.seed, self._passes)).permutation(rows)
        self._passes += 1
        per_rank = len(self) * self.batch_size
        mine = rows[self.rank * per_rank: (self.rank + 1) * per_rank].reshape(len(self), self.batch_size)
        for batch_rows in _worker_share(list(mine)):
            dense, kjt, labels = self.reader.features(np.sort(batch_rows))
            yield Batch(dense_features=dense, sparse_features=kjt, labels=labels)
