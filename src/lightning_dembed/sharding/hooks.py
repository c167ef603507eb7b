"""Hooks that make a sharded embedding module behave like its unsharded twin.

- Input checks: FBGEMM's kernels clamp or read past an out-of-range id without saying which
  feature sent it, and a sharded module fed an unknown feature fails deep in the input all-to-all.
  The checks run before the lookup (so no optimizer update has happened) and name the feature and
  table at fault.
- Output order: a sharded `EmbeddingBagCollection` returns its features grouped by shard, not in
  the order of its tables, so ``KeyedTensor.values()`` would silently mean something else after
  sharding. The original order is restored (nothing is done when the orders already agree).
- Ragged batches: row-wise shardings reduce-scatter pooled rows between ranks, and on gloo the
  backward all-gather needs one row count on every rank. Ranks whose batch is smaller (or empty)
  add empty bags up to the largest batch, and the extra output rows are sliced off: empty bags
  look nothing up and receive no gradient, so the tables train as if each rank had its own rows.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.types import LazyAwaitable
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from lightning_dembed.sharding.planner import embedding_configs

__all__ = ["pad_to_stride", "register_input_checks", "register_output_order", "register_ragged_batches"]


class _FeatureCheck:
    def __init__(self, module_path: str, configs: list) -> None:
        self.module_path = module_path
        self.table_of: dict[str, str] = {}
        self.rows_of: dict[str, int] = {}
        for config in configs:
            for feature in config.feature_names:
                self.table_of[feature] = config.name
                self.rows_of[feature] = min(self.rows_of.get(feature, config.num_embeddings), config.num_embeddings)
        self._limits: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}

    def _limits_for(self, keys: tuple[str, ...], device: torch.device) -> torch.Tensor:
        cached = self._limits.get((keys, device))
        if cached is None:
            cached = torch.tensor([self.rows_of[k] for k in keys], dtype=torch.int64, device=device)
            self._limits[(keys, device)] = cached
        return cached

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        features = args[0] if args else None
        if not isinstance(features, KeyedJaggedTensor):
            return
        keys = tuple(features.keys())
        unknown = [k for k in keys if k not in self.table_of]
        if unknown:
            raise ValueError(
                f"{self.module_path}: feature(s) {unknown} are fed to the embedding module but no table consumes "
                f"them; its features are {sorted(self.table_of)}"
            )
        missing = [k for k in self.table_of if k not in keys]
        if missing:
            raise ValueError(
                f"{self.module_path}: feature(s) {missing} (tables "
                f"{sorted({self.table_of[k] for k in missing})}) are missing from the input"
            )
        values = features.values()
        if values.numel() == 0:
            return
        # One vectorised pass: each id against its own feature's table size.
        limit = torch.repeat_interleave(
            self._limits_for(keys, values.device),
            torch.tensor(features.length_per_key(), device=values.device),
        )
        bad = (values < 0) | (values >= limit)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            ends = torch.tensor(features.length_per_key()).cumsum(0)
            feature = keys[int(torch.searchsorted(ends, first, right=True))]
            raise ValueError(
                f"{self.module_path}: feature {feature!r} has id {int(values[first])} outside table "
                f"{self.table_of[feature]!r}, which has {self.rows_of[feature]} rows (valid ids: 0.."
                f"{self.rows_of[feature] - 1}); map or hash ids into the table size before the lookup"
            )


def register_input_checks(sharded: nn.Module, unsharded: nn.Module, module_path: str) -> None:
    """Check every input of ``sharded`` against the tables of its unsharded twin ``unsharded``."""
    sharded.register_forward_pre_hook(_FeatureCheck(module_path, embedding_configs(unsharded)))


def _then(output: Any, transform: Callable[[Any], Any]) -> Any:
    """``transform(output)``; on a lazy TorchRec output, when it is waited for, so nothing waits early."""
    if isinstance(output, LazyAwaitable):
        output.callbacks.append(transform)
        return output
    return transform(output)


class _OutputOrder:
    """Reorders a sharded output into its tables' order, and removes itself if it already is."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.handle: Optional[RemovableHandle] = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return _then(output, self.reorder)

    def reorder(self, pooled: Any) -> Any:
        if not isinstance(pooled, KeyedTensor):
            return pooled
        if pooled.keys() == self.keys:
            # The order is fixed by the plan: it will match in every later step too.
            assert self.handle is not None
            self.handle.remove()
            return pooled
        by_key = pooled.to_dict()
        return KeyedTensor.from_tensor_list(self.keys, [by_key[k] for k in self.keys], key_dim=pooled.key_dim())


def register_output_order(sharded: nn.Module, unsharded: nn.Module) -> None:
    """Make ``sharded`` return pooled features in the order its unsharded twin did.

    The hook never waits for TorchRec's lazy output early (it runs when the output is used), and
    removes itself after the first forward when the sharded order already is the tables' order
    (the strategy places interchangeable tables so that it usually is).
    """
    if isinstance(unsharded, EmbeddingBagCollection):
        order = _OutputOrder([f for config in unsharded.embedding_bag_configs() for f in config.feature_names])
        order.handle = sharded.register_forward_hook(order)


# Sharding types whose pooled output is reduce-scattered across ranks.
_REDUCE_SCATTER_TYPES = frozenset({"row_wise", "table_row_wise", "grid_shard"})


def pad_to_stride(features: KeyedJaggedTensor, stride: int) -> KeyedJaggedTensor:
    """``features`` with empty bags appended to every key up to ``stride`` rows."""
    rows = features.stride()
    if stride == rows:
        return features
    lengths = features.lengths().reshape(len(features.keys()), rows)
    lengths = torch.cat([lengths, lengths.new_zeros(lengths.shape[0], stride - rows)], dim=1).reshape(-1)
    weights = features.weights_or_none()
    return KeyedJaggedTensor(keys=features.keys(), values=features.values(), lengths=lengths, weights=weights)


class _RaggedBatches:
    """Pads a rank's features to the largest row count of all ranks, and slices the output back."""

    def __init__(self) -> None:
        self._rows: list[int] = []

    def pad(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        features = args[0] if args else None
        if not isinstance(features, KeyedJaggedTensor):
            return None
        rows = features.stride()
        most = torch.tensor([rows], dtype=torch.int64)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        self._rows.append(rows)
        return (pad_to_stride(features, int(most)), *args[1:])

    def unpad(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not self._rows:
            return output
        rows = self._rows.pop()

        def first_rows(pooled: Any) -> Any:
            if not isinstance(pooled, KeyedTensor) or pooled.values().shape[0] == rows:
                return pooled
            return KeyedTensor(
                keys=pooled.keys(), length_per_key=pooled.length_per_key(), values=pooled.values()[:rows],
                key_dim=pooled.key_dim(),
            )

        return _then(output, first_rows)


def register_ragged_batches(sharded: nn.Module, sharding_types: set[str]) -> None:
    """Let ranks feed ``sharded`` (a sharded `EmbeddingBagCollection`) different row counts.

    Only needed, and only installed, where a row-wise sharding meets gloo (NCCL gathers uneven
    sizes itself); it costs one scalar all-reduce per forward.
    """
    if not sharding_types & _REDUCE_SCATTER_TYPES or dist.get_backend() != "gloo":
        return
    if not isinstance(sharded, ShardedEmbeddingBagCollection):
        return  # sequence (EmbeddingCollection) outputs are exchanged by all-to-all, which copes
    ragged = _RaggedBatches()
    sharded.register_forward_pre_hook(ragged.pad)
    sharded.register_forward_hook(ragged.unpad)
