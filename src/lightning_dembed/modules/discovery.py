"""Where a model's embedding tables are: discovery of TorchRec's embedding collections, and the rest.

Used by the strategy to find what to shard and by users to give their dense optimizer everything
but the tables. Plain module inspection: no Lightning, no torch.distributed.
"""

from __future__ import annotations

from torch import nn
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection
from torchrec.modules.itep_embedding_modules import ITEPEmbeddingBagCollection, ITEPEmbeddingCollection
from torchrec.modules.mc_embedding_modules import BaseManagedCollisionEmbeddingCollection
from torchrec.optim.optimizers import in_backward_optimizer_filter

__all__ = [
    "EMBEDDING_MODULE_TYPES",
    "dense_parameters",
    "embedding_configs",
    "find_embedding_modules",
    "find_plain_embedding_layers",
    "input_rewritten_by_wrapper",
]

EMBEDDING_MODULE_TYPES = (EmbeddingBagCollection, EmbeddingCollection)
# TorchRec modules that hold an embedding collection and rewrite the features before it sees them:
# managed collision and ITEP (in-training embedding pruning) remap the ids, feature processors
# compute the weights.
_INPUT_REWRITING_WRAPPERS = (
    BaseManagedCollisionEmbeddingCollection,
    FeatureProcessedEmbeddingBagCollection,
    ITEPEmbeddingBagCollection,
    ITEPEmbeddingCollection,
)


def find_embedding_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Every TorchRec embedding collection in ``module``, by its path (not looking inside one).

    One collection reachable at two paths (``self.ebc`` also held by a submodule) is refused: it
    would be sharded under one path and left as it is under the other.
    """
    found: dict[str, nn.Module] = {}

    def visit(mod: nn.Module, path: str) -> None:
        if isinstance(mod, EMBEDDING_MODULE_TYPES):
            first = next((p for p, m in found.items() if m is mod), None)
            if first is not None:
                raise ValueError(
                    f"the same {type(mod).__name__} is both {first!r} and {path!r} of {type(module).__name__}; "
                    "sharding replaces it under one path only. Hold it in one place (pass the other module a "
                    "reference that is not an attribute, e.g. a property or a function argument)"
                )
            found[path] = mod
            return
        for name, child in mod.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(module, "")
    return found


def find_plain_embedding_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Embedding`` / ``nn.EmbeddingBag`` outside TorchRec's collections, by its path.

    These are not sharded: they train as dense parameters, a full copy on every rank. Wrapping
    them in `lightning_dembed.DistributedEmbedding` makes them tables the strategy shards.
    """
    inside = {id(m) for collection in find_embedding_modules(module).values() for m in collection.modules()}
    return {
        path: m
        for path, m in module.named_modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and id(m) not in inside
    }


def input_rewritten_by_wrapper(module: nn.Module, path: str) -> bool:
    """Whether the collection at ``path`` is held by a TorchRec module that rewrites its features first.

    Managed-collision and ITEP collections remap the ids and feature-processed ones compute the
    weights, so the collection inside never sees the batch's features as the batch holds them.
    """
    parent = path.rpartition(".")[0]
    return isinstance(module.get_submodule(parent), _INPUT_REWRITING_WRAPPERS)


def embedding_configs(module: nn.Module) -> list[BaseEmbeddingConfig]:
    """The table configs of an `EmbeddingBagCollection` or `EmbeddingCollection`."""
    if isinstance(module, EmbeddingBagCollection):
        return list(module.embedding_bag_configs())
    return list(module.embedding_configs())


def dense_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters a dense optimizer should get: all but the embedding tables'.

    Tables train with their fused optimizer, so an optimizer built over ``self.parameters()``
    only wastes what it allocates for them up front (``torch.optim.Adagrad`` allocates a full copy
    of every table shard, dropped again by the strategy). Works before and after sharding.

    Example::

        def configure_optimizers(self):
            return torch.optim.Adagrad(dense_parameters(self), lr=0.01)  # tables: fused Adagrad, lr 0.01
    """
    tables = {id(p) for m in find_embedding_modules(module).values() for p in m.parameters()}
    return [p for _, p in in_backward_optimizer_filter(module.named_parameters()) if id(p) not in tables]
