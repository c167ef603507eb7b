"""Optimization-based meta-learning (MAML family) over sharded embeddings.

`config` and `functional` are plain PyTorch (no Lightning, no torch.distributed): the inner and
outer computation of one meta-batch, vectorised over tasks. `loop` is the Lightning glue.
"""

from lightning_dembed.meta.config import MetaLearningConfig
from lightning_dembed.meta.functional import (
    AdaptResult,
    InnerLearningRates,
    MetaStepOutput,
    TaskIndex,
    adapt_and_predict,
    meta_step,
    task_index,
    vmap_refusal,
)
from lightning_dembed.meta.loop import ColdStartEvaluation, MetaLearningLoop

__all__ = [
    "AdaptResult",
    "ColdStartEvaluation",
    "InnerLearningRates",
    "MetaLearningConfig",
    "MetaLearningLoop",
    "MetaStepOutput",
    "TaskIndex",
    "adapt_and_predict",
    "meta_step",
    "task_index",
    "vmap_refusal",
]
