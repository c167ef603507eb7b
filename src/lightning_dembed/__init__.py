"""lightning-dembed: sharded embeddings (TorchRec) and distributed meta-learning for Lightning.

Importing the package registers ``"hybrid_parallel"`` (and ``_spawn`` / ``_fork`` variants) in
Lightning's strategy registry, so ``Trainer(strategy="hybrid_parallel")`` works.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_dembed.checkpoint import consolidate_checkpoint
from lightning_dembed.modules import DistributedEmbedding
from lightning_dembed.sharding import EmbeddingOptimizer, MemoryBudgetError, ShardingPolicy, dense_parameters
from lightning_dembed.strategies import HybridParallelStrategy

HybridParallelStrategy.register_strategies(StrategyRegistry)

__all__ = [
    "DistributedEmbedding",
    "EmbeddingOptimizer",
    "HybridParallelStrategy",
    "MemoryBudgetError",
    "ShardingPolicy",
    "consolidate_checkpoint",
    "dense_parameters",
]
__version__ = "0.1.0"
