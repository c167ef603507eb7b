"""Plain modules users put in their models. No Lightning, no torch.distributed."""

from lightning_dembed.modules.distributed_embedding import DistributedEmbedding

__all__ = ["DistributedEmbedding"]
