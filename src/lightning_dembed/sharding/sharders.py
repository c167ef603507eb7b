"""The one list of sharders the strategy uses.

TorchRec's `EmbeddingBagCollectionSharder` offers ``row_wise`` and ``table_row_wise`` only on CUDA,
a guard from when gloo had no reduce-scatter. gloo has one now, and those types train exactly on
CPU (the distributed parity tests check it), so the CPU guard is lifted here and nowhere else.

On CUDA TorchRec's sharders also offer kernels that keep a table in host memory or on SSD, and its
planner picks them by itself when the GPUs look full: a model would train, slower, where the user
asked for a plan that fits. These sharders offer the in-GPU kernels only, plus the one ``offload``
names when the user asks for it.
"""

from __future__ import annotations

from typing import Any, Optional

from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder, ShardingType

from lightning_dembed.sharding.types import OFFLOAD_KERNELS, ROW_SPLIT_TYPES

__all__ = ["EmbeddingBagCollectionSharderWithCPURowWise", "EmbeddingCollectionSharderInGPU", "default_sharders"]

_IN_DEVICE_KERNELS = (EmbeddingComputeKernel.DENSE.value, EmbeddingComputeKernel.FUSED.value)


class _KernelsOnDevice:
    """Offers the in-device kernels of a TorchRec sharder, and the offload kernel only when asked."""

    def __init__(self, fused_params: Optional[dict[str, Any]] = None, offload: Optional[str] = None) -> None:
        super().__init__(fused_params=fused_params)  # type: ignore[call-arg]
        self.offload = offload

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        allowed = set(_IN_DEVICE_KERNELS) | ({OFFLOAD_KERNELS[self.offload]} if self.offload else set())
        offered = super().compute_kernels(sharding_type, compute_device_type)  # type: ignore[misc]
        return [kernel for kernel in offered if kernel in allowed]


class EmbeddingBagCollectionSharderWithCPURowWise(_KernelsOnDevice, EmbeddingBagCollectionSharder):
    """TorchRec's sharder for `EmbeddingBagCollection`: row-wise types on CPU too, in-device kernels
    unless ``offload`` names one that keeps tables in host memory."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types += [t for t in ROW_SPLIT_TYPES if t not in types]
        return types


class EmbeddingCollectionSharderInGPU(_KernelsOnDevice, EmbeddingCollectionSharder):
    """TorchRec's sharder for `EmbeddingCollection`, with in-device kernels unless ``offload`` names
    one, and without ``data_parallel`` on CPU: there FBGEMM's dense kernel pools the sequences it
    should return row by row (TorchRec's own `DistributedModelParallel` then fails on the output)."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types = [t for t in types if t != ShardingType.DATA_PARALLEL.value]
        return types


def default_sharders(
    fused_params: Optional[dict[str, Any]] = None, offload: Optional[str] = None
) -> list[ModuleSharder[nn.Module]]:
    """Sharders for every embedding module type the strategy shards.

    Args:
        fused_params: FBGEMM kernel arguments for every table (e.g. ``{"output_dtype":
            SparseType.BF16}``); each table's optimizer hyper-parameters are added to them.
            Ids are bounds-checked by the kernels and fail the step (``BoundsCheckMode.FATAL``),
            where FBGEMM's default would silently look up row 0 instead.
        offload: ``"uvm"`` or ``"uvm_caching"`` to also offer that kernel (`ShardingPolicy.offload`).
    """
    fused_params = {"bounds_check_mode": BoundsCheckMode.FATAL, **(fused_params or {})}
    return [
        EmbeddingBagCollectionSharderWithCPURowWise(fused_params=fused_params, offload=offload),
        EmbeddingCollectionSharderInGPU(fused_params=fused_params, offload=offload),
    ]
