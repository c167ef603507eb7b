"""lightning-dembed: sharded embeddings (TorchRec) and distributed meta-learning for Lightning.

Importing the package registers ``"hybrid_parallel"`` (and ``_spawn`` / ``_fork`` variants) in
Lightning's strategy registry, so ``Trainer(strategy="hybrid_parallel")`` works.
"""

from lightning_dembed._stack import check_stack

check_stack()  # before anything imports fbgemm_gpu, whose own error on a mismatch names no version

from lightning.pytorch.strategies import StrategyRegistry  # noqa: E402

from lightning_dembed.checkpoint import consolidate_checkpoint  # noqa: E402
from lightning_dembed.modules import DistributedEmbedding  # noqa: E402
from lightning_dembed.sharding import EmbeddingOptimizer, MemoryBudgetError, ShardingPolicy, dense_parameters  # noqa: E402
from lightning_dembed.strategies import HybridParallelStrategy  # noqa: E402

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
