"""Batch types that the data pipelines produce and the models consume.

`Batch` is TorchRec's own (dense features, a `KeyedJaggedTensor` of sparse features, labels), so any
TorchRec model or pipeline reads it. `TaskBatch` is the meta-learning twin: the rows of several tasks
in one `KeyedJaggedTensor`, grouped task by task, each task's support rows before its query rows.
Both implement `to()`/`pin_memory()`/`record_stream()`, so Lightning moves them like tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

__all__ = ["Batch", "TaskBatch"]


@dataclass
class TaskBatch(Pipelineable):
    """One meta-batch: every row of ``T`` tasks, laid out task by task.

    Rows ``task_offsets[t]:task_offsets[t + 1]`` belong to task ``t``; of those, the first
    ``support_sizes[t]`` are its support set and the rest its query set. Keeping all rows in one
    `KeyedJaggedTensor` is what lets a meta-batch cost one embedding lookup, whatever ``T``.

    Args:
        dense_features: ``[R, num_dense]`` float tensor (``num_dense`` may be 0).
        sparse_features: `KeyedJaggedTensor` with stride ``R``.
        labels: ``[R]`` float tensor of 0/1 labels.
        task_offsets: ``[T + 1]`` int64, ``task_offsets[0] == 0`` and ``task_offsets[-1] == R``.
        support_sizes: ``[T]`` int64, each at least 1 and below its task's row count.
        task_keys: ``[T]`` int64 identifier of each task (a user id, say), for logging.

    Example::

        batch = TaskBatch(dense, kjt, labels, torch.tensor([0, 5, 9]), torch.tensor([3, 2]), keys)
        batch.num_tasks  # 2: task 0 has rows 0..4 (support 0..2), task 1 rows 5..8 (support 5..6)
    """

    dense_features: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor
    task_offsets: torch.Tensor
    support_sizes: torch.Tensor
    task_keys: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_sizes.numel()

    @property
    def num_rows(self) -> int:
        return self.labels.numel()

    def to(self, device: torch.device, non_blocking: bool = False) -> "TaskBatch":
        return TaskBatch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            task_offsets=self.task_offsets.to(device=device, non_blocking=non_blocking),
            support_sizes=self.support_sizes.to(device=device, non_blocking=non_blocking),
            task_keys=self.task_keys.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        for tensor in (self.dense_features, self.labels, self.task_offsets, self.support_sizes, self.task_keys):
            tensor.record_stream(stream)
        self.sparse_features.record_stream(stream)

    def pin_memory(self) -> "TaskBatch":
        return TaskBatch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            task_offsets=self.task_offsets.pin_memory(),
            support_sizes=self.support_sizes.pin_memory(),
            task_keys=self.task_keys.pin_memory(),
        )
