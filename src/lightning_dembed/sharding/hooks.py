"""What makes a sharded embedding module behave like its unsharded twin.

- Feature checks: a sharded module sends every feature it is given to its tables' shards, where its
  unsharded twin ignores those no table consumes, and FBGEMM's id bounds check does not say which
  feature sent the id. `FeatureCheck` selects the module's own features, and names the feature and
  table at fault before the lookup (so no optimizer update has happened).
- Output order: a sharded `EmbeddingBagCollection` returns its features grouped by shard, not in
  the order of its tables, so ``KeyedTensor.values()`` would silently mean something else after
  sharding. The original order is restored where it differs.
- Mean pooling: where a mean-pooled table is sharded row-wise, TorchRec divides the module's
  pooled output by the bag sizes afterwards, also that of tables sharded otherwise, which FBGEMM
  pooled already: their means are divided twice, their sums divided. Only the row-wise ones are.
- Padding: `pad_to_stride` adds empty bags, which look nothing up and receive no gradient.

`lightning_dembed.sharding.lookup` runs these around TorchRec's input and output stages.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.types import LazyAwaitable
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from lightning_dembed._private import sharded_output_keys, undivided_by_mean_pooling
from lightning_dembed.modules.discovery import embedding_configs
from lightning_dembed.sharding.types import ROW_SPLIT_TYPES

__all__ = ["FeatureCheck", "divide_only_row_wise_bags", "pad_to_stride", "register_output_order", "then"]


class FeatureCheck:
    """The features an embedding module consumes and the ids its tables hold, with errors that name them."""

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

    def own(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The features this module's tables consume, as its unsharded twin reads them from ``features``.

        Unsharded, TorchRec looks each table's features up by name and ignores the others (several
        modules fed one `KeyedJaggedTensor`); sharded, every feature given is sent to a table's shards,
        so the others are left out here. Fails, naming them, on tables' features that are missing.
        """
        position = {k: i for i, k in enumerate(features.keys())}
        missing = [k for k in self.table_of if k not in position]
        if missing:
            raise ValueError(
                f"{self.module_path}: feature(s) {missing} (tables "
                f"{sorted({self.table_of[k] for k in missing})}) are missing from the input"
            )
        exact = len(position) == len(self.table_of)
        if features.variable_stride_per_key():
            if exact:
                return features  # TorchRec orders these itself; permute would drop their inverse indices
            raise ValueError(
                f"{self.module_path}: a variable-batch KeyedJaggedTensor (stride_per_key_per_rank) holding "
                f"features no table of this module consumes ({sorted(set(position) - set(self.table_of))}); "
                "give the module a KeyedJaggedTensor of its own features only"
            )
        # Always in the module's own order: TorchRec's sharded input stage keeps the feature order of
        # the first input it is given and applies it to every later one without looking at the keys.
        order = [position[k] for k in self.table_of]
        if exact and order == list(range(len(order))):
            return features
        return features.permute(order)

    def ids(self, features: KeyedJaggedTensor) -> None:
        """Fail, naming the feature and table, on an id outside its table (one host sync)."""
        values = features.values()
        if values.numel() == 0:
            return
        keys = tuple(features.keys())
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

    @classmethod
    def of(cls, unsharded: nn.Module, module_path: str) -> "FeatureCheck":
        """The checks for the tables of ``unsharded`` (an `EmbeddingBagCollection` or `EmbeddingCollection`)."""
        return cls(module_path, embedding_configs(unsharded))


def then(output: Any, transform: Callable[[Any], Any]) -> Any:
    """``transform(output)``; on a lazy TorchRec output, when it is waited for, so nothing waits early."""
    if isinstance(output, LazyAwaitable):
        output.callbacks.append(transform)
        return output
    return transform(output)


class _OutputOrder:
    """Reorders a sharded module's pooled output into its tables' order."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return then(output, self.reorder)

    def reorder(self, pooled: Any) -> Any:
        if not isinstance(pooled, KeyedTensor):
            return pooled
        by_key = pooled.to_dict()
        return KeyedTensor.from_tensor_list(self.keys, [by_key[k] for k in self.keys], key_dim=pooled.key_dim())


def register_output_order(sharded: nn.Module, unsharded: nn.Module) -> bool:
    """Make ``sharded`` return pooled features in the order its unsharded twin did; whether it had to.

    Nothing is installed where the plan already gives that order (the strategy places
    interchangeable tables so that it usually does); elsewhere the hook runs when TorchRec's lazy
    output is used, so nothing waits early.
    """
    if not isinstance(unsharded, EmbeddingBagCollection):
        return False
    order = [f for config in unsharded.embedding_bag_configs() for f in config.feature_names]
    if isinstance(sharded, ShardedEmbeddingBagCollection) and sharded_output_keys(sharded) == order:
        return False
    sharded.register_forward_hook(_OutputOrder(order))
    return True


def divide_only_row_wise_bags(sharded: nn.Module, unsharded: nn.Module, sharding_types: dict[str, str]) -> None:
    """Make TorchRec's mean-pooling division leave alone the features of tables not sharded row-wise.

    Args:
        sharded: the sharded module.
        unsharded: its unsharded twin (for its tables' features).
        sharding_types: the sharding type of each of its tables, by table name.
    """
    if not isinstance(sharded, ShardedEmbeddingBagCollection):
        return
    undivided = undivided_by_mean_pooling(sharded)
    if undivided is None:
        return
    for config in embedding_configs(unsharded):
        # Row-split kernels sum partial bags; TorchRec divides those mean-pooled ones afterwards.
        if sharding_types[config.name] not in ROW_SPLIT_TYPES:
            undivided.extend(f for f in config.feature_names if f not in undivided)


def pad_to_stride(features: KeyedJaggedTensor, stride: int) -> KeyedJaggedTensor:
    """``features`` with empty bags appended to every key up to ``stride`` rows."""
    rows = features.stride()
    if stride == rows:
        return features
    lengths = features.lengths().reshape(len(features.keys()), rows)
    lengths = torch.cat([lengths, lengths.new_zeros(lengths.shape[0], stride - rows)], dim=1).reshape(-1)
    weights = features.weights_or_none()
    return KeyedJaggedTensor(keys=features.keys(), values=features.values(), lengths=lengths, weights=weights)
