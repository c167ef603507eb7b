"""`DistributedEmbedding`: plain ``nn.Embedding`` / ``nn.EmbeddingBag`` layers as TorchRec collections.

The Merlin Distributed Embeddings one-liner for PyTorch: wrap a list of ordinary embedding layers,
call it on a list of inputs, get what the layers would return. Inside, the layers become one
TorchRec `EmbeddingBagCollection` (bags) and one `EmbeddingCollection` (plain lookups), which
`HybridParallelStrategy` shards like any other. No torch.distributed here.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["DistributedEmbedding"]

EmbeddingLayer = Union[nn.Embedding, nn.EmbeddingBag]
_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def _check_layer(index: int, layer: nn.Module) -> None:
    if not isinstance(layer, (nn.Embedding, nn.EmbeddingBag)):
        raise TypeError(f"layer {index} is a {type(layer).__name__}; DistributedEmbedding takes nn.Embedding "
                        "and nn.EmbeddingBag layers")
    unsupported = {
        "padding_idx": layer.padding_idx is not None,
        "max_norm": layer.max_norm is not None,
        "sparse": layer.sparse,
        "scale_grad_by_freq": layer.scale_grad_by_freq,
        "include_last_offset": isinstance(layer, nn.EmbeddingBag) and layer.include_last_offset,
        "mode='max'": isinstance(layer, nn.EmbeddingBag) and layer.mode not in _POOLING,
    }
    bad = [name for name, is_set in unsupported.items() if is_set]
    if bad:
        raise ValueError(f"layer {index} ({layer}) sets {bad}, which sharded tables do not support")


class DistributedEmbedding(nn.Module):
    """A list of embedding layers behind one call, shardable by `HybridParallelStrategy`.

    Calling it on ``inputs`` (one tensor per layer, all with the same batch size ``B``) returns
    ``[layer(x) for layer, x in zip(layers, inputs)]``, with the layers' initial weights. An
    ``nn.EmbeddingBag`` takes ``[B, L]`` ids and returns ``[B, D]``; an ``nn.Embedding`` takes ids of
    any shape ``[B, ...]`` and returns ``[B, ..., D]``.

    Args:
        layers: the embedding layers, on any device including ``meta``.
        names: table names (default ``table_0``, ``table_1``...), used in sharding overrides and logs.

    Example::

        layers = [nn.EmbeddingBag(1000, 16, mode="sum"), nn.Embedding(50, 8)]
        embedding = DistributedEmbedding(layers)
        bag, seq = embedding([torch.randint(1000, (4, 3)), torch.randint(50, (4,))])
        bag.shape, seq.shape  # (torch.Size([4, 16]), torch.Size([4, 8]))
    """

    def __init__(self, layers: Sequence[EmbeddingLayer], names: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        if not layers:
            raise ValueError("DistributedEmbedding needs at least one layer")
        names = list(names) if names is not None else [f"table_{i}" for i in range(len(layers))]
        if len(names) != len(layers) or len(set(names)) != len(names):
            raise ValueError(f"names must be {len(layers)} distinct table names, got {names}")
        for i, layer in enumerate(layers):
            _check_layer(i, layer)
        self.table_names = names
        self._is_bag = [isinstance(layer, nn.EmbeddingBag) for layer in layers]
        device = layers[0].weight.device
        bag_configs = [
            EmbeddingBagConfig(
                name=name, num_embeddings=layer.num_embeddings, embedding_dim=layer.embedding_dim,
                feature_names=[name], pooling=_POOLING[layer.mode],
            )
            for name, layer, is_bag in zip(names, layers, self._is_bag) if is_bag
        ]
        seq_configs = [
            EmbeddingConfig(
                name=name, num_embeddings=layer.num_embeddings, embedding_dim=layer.embedding_dim,
                feature_names=[name],
            )
            for name, layer, is_bag in zip(names, layers, self._is_bag) if not is_bag
        ]
        self.bags = EmbeddingBagCollection(tables=bag_configs, device=device) if bag_configs else None
        self.sequences = EmbeddingCollection(tables=seq_configs, device=device) if seq_configs else None
        self._copy_weights(layers)

    @torch.no_grad()
    def _copy_weights(self, layers: Sequence[EmbeddingLayer]) -> None:
        for name, layer, is_bag in zip(self.table_names, layers, self._is_bag):
            tables = self.bags.embedding_bags if is_bag else self.sequences.embeddings  # type: ignore[union-attr]
            if layer.weight.is_meta:
                tables[name].weight.requires_grad_(layer.weight.requires_grad)
                continue
            tables[name].weight.copy_(layer.weight)
            # A frozen layer (nn.Embedding.from_pretrained(freeze=True)) stays frozen.
            tables[name].weight.requires_grad_(layer.weight.requires_grad)

    def _keyed(self, names: list[str], ids: list[torch.Tensor], batch: int) -> KeyedJaggedTensor:
        per_row = [x.numel() // batch for x in ids]
        lengths = torch.cat([torch.full((batch,), n, dtype=torch.int64, device=ids[0].device) for n in per_row])
        values = torch.cat([x.reshape(-1).to(torch.int64) for x in ids])
        return KeyedJaggedTensor(keys=names, values=values, lengths=lengths)

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != len(self.table_names):
            raise ValueError(f"expected {len(self.table_names)} inputs (one per layer), got {len(inputs)}")
        batch = inputs[0].shape[0]
        for name, x, is_bag in zip(self.table_names, inputs, self._is_bag):
            if x.shape[0] != batch:
                raise ValueError(f"input for {name!r} has batch size {x.shape[0]}, the first input has {batch}")
            if is_bag and x.dim() != 2:
                raise ValueError(f"input for nn.EmbeddingBag {name!r} must be [batch, ids per bag], got {tuple(x.shape)}")
        outputs: dict[str, torch.Tensor] = {}
        bag_names = [n for n, b in zip(self.table_names, self._is_bag) if b]
        seq_names = [n for n, b in zip(self.table_names, self._is_bag) if not b]
        if bag_names:
            ids = [x for x, b in zip(inputs, self._is_bag) if b]
            pooled = self.bags(self._keyed(bag_names, ids, batch))  # type: ignore[misc]
            outputs.update(pooled.to_dict())
        if seq_names:
            ids = [x for x, b in zip(inputs, self._is_bag) if not b]
            looked_up = self.sequences(self._keyed(seq_names, ids, batch))  # type: ignore[misc]
            for name, x in zip(seq_names, ids):
                values = looked_up[name].values()
                outputs[name] = values.reshape(*x.shape, values.shape[-1])
        return [outputs[name] for name in self.table_names]
