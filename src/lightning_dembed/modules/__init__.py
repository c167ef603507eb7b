"""Plain modules users put in their models. No Lightning, no torch.distributed."""

from lightning_dembed.modules.discovery import dense_parameters, find_embedding_modules
from lightning_dembed.modules.distributed_embedding import DistributedEmbedding

__all__ = ["DistributedEmbedding", "dense_parameters", "find_embedding_modules"]
