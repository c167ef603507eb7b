"""Planning and machinery for sharded embedding tables (no Lightning in here)."""

from lightning_dembed.modules.discovery import dense_parameters
from lightning_dembed.sharding.optimizer import EmbeddingOptimizer
from lightning_dembed.sharding.planner import plan_sharding
from lightning_dembed.sharding.policy import ShardingPolicy, decide_tables
from lightning_dembed.sharding.types import MemoryBudgetError, PlanSummary
from lightning_dembed.sharding.sharders import default_sharders

__all__ = [
    "EmbeddingOptimizer",
    "MemoryBudgetError",
    "PlanSummary",
    "ShardingPolicy",
    "decide_tables",
    "dense_parameters",
    "default_sharders",
    "plan_sharding",
]
