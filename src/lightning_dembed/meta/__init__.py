"""Optimization-based meta-learning (MAML family) over sharded embeddings."""

from lightning_dembed.meta.config import MetaLearningConfig
from lightning_dembed.meta.functional import InnerLearningRates, adapt_and_predict, meta_step, task_index
from lightning_dembed.meta.loop import MetaLearningLoop

__all__ = [
    "InnerLearningRates",
    "MetaLearningConfig",
    "MetaLearningLoop",
    "adapt_and_predict",
    "meta_step",
    "task_index",
]
