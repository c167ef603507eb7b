"""The one list of sharders the strategy uses.

TorchRec's `EmbeddingBagCollectionSharder` offers ``row_wise`` and ``table_row_wise`` only on CUDA,
a guard from when gloo had no reduce-scatter. gloo has one now, and those types train exactly on
CPU (the distributed parity tests check it), so the CPU guard is lifted here and nowhere else.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder, ShardingType

__all__ = ["EmbeddingBagCollectionSharderWithCPURowWise", "default_sharders"]

_ROW_WISE_TYPES = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)


class EmbeddingBagCollectionSharderWithCPURowWise(EmbeddingBagCollectionSharder):
    """TorchRec's sharder for `EmbeddingBagCollection`, with the row-wise types allowed on CPU."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types += [t for t in _ROW_WISE_TYPES if t not in types]
        return types


def default_sharders(fused_params: Optional[dict[str, Any]] = None) -> list[ModuleSharder[nn.Module]]:
    """Sharders for every embedding module type the strategy shards.

    Args:
        fused_params: FBGEMM kernel arguments for every table (e.g. ``{"gradient_clipping": True,
            "max_gradient": 1.0}``); each table's optimizer hyper-parameters are added to them.
    """
    return [
        EmbeddingBagCollectionSharderWithCPURowWise(fused_params=fused_params),
        EmbeddingCollectionSharder(fused_params=fused_params),
    ]
