"""The vocabulary of sharding: what a table is, what the policy decides, what a plan holds.

Plain data, shared by the policy (`policy`), the planner (`planner`), the sharders and the strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.types import ShardingType

__all__ = [
    "MemoryBudgetError",
    "OFFLOAD_KERNELS",
    "Offload",
    "PLACEMENTS",
    "Placement",
    "PlanSummary",
    "ROW_SPLIT_TYPES",
    "SHARDING_TYPES",
    "TableDecision",
    "TableShardingInfo",
    "TableSpec",
]

Placement = Literal["basic", "memory_balanced", "memory_optimized"]
PLACEMENTS: tuple[str, ...] = ("basic", "memory_balanced", "memory_optimized")

Offload = Literal["uvm", "uvm_caching"]
# TorchRec's compute kernel for each way of keeping a table in host memory.
OFFLOAD_KERNELS: dict[str, str] = {
    "uvm": EmbeddingComputeKernel.FUSED_UVM.value,
    "uvm_caching": EmbeddingComputeKernel.FUSED_UVM_CACHING.value,
}

SHARDING_TYPES: tuple[str, ...] = (
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
    ShardingType.DATA_PARALLEL.value,
)
# The types that split a table's rows over ranks: each rank pools its part of a bag, and the parts
# are summed across ranks (a reduce-scatter).
ROW_SPLIT_TYPES: tuple[str, ...] = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)


@dataclass(frozen=True)
class TableSpec:
    """What planning needs to know of one table: its name, shape and the module that holds it."""

    name: str
    num_embeddings: int
    embedding_dim: int
    module_path: str

    @property
    def num_elements(self) -> int:
        return self.num_embeddings * self.embedding_dim


@dataclass(frozen=True)
class TableDecision:
    """A table's sharding type and, where the policy places it, its ranks (one per slice)."""

    sharding_type: str
    ranks: Optional[tuple[int, ...]] = None


@dataclass(frozen=True)
class TableShardingInfo:
    """One table in the plan: how it is sharded, where, and how big it is."""

    name: str
    module_path: str
    num_embeddings: int
    embedding_dim: int
    sharding_type: str
    compute_kernel: str
    ranks: tuple[int, ...]
    size_bytes: int


@dataclass
class PlanSummary:
    """A sharding plan as plain data, for the log at start-up and for loggers such as W&B."""

    tables: list[TableShardingInfo]
    rank_bytes: list[int]  # in device memory (all of it on CPU)
    memory_budget: int
    optimizer_state_factor: float = field(default=0.0)
    rank_host_bytes: list[int] = field(default_factory=list)  # of tables offloaded to host memory
    # TorchRec's estimate of each rank's embedding time per step, in ms, at its planning batch size
    # (512 per rank); its planner only.
    rank_estimated_ms: list[float] = field(default_factory=list)

    def as_rows(self) -> list[list]:
        """One row per table: name, rows, dim, sharding type, kernel, ranks (as ranges: ``0-3,7``), MiB."""
        return [
            [t.name, t.num_embeddings, t.embedding_dim, t.sharding_type, t.compute_kernel,
             _rank_ranges(t.ranks), round(t.size_bytes / 2**20, 3)]
            for t in self.tables
        ]

    COLUMNS = ["table", "rows", "dim", "sharding", "kernel", "ranks", "MiB"]

    def as_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data: per rank its bytes, per table its sharding, ranks and bytes.

        Where TorchRec's planner planned, also its estimate of each rank's embedding time per step
        (``estimated_ms``) and of the step's (``estimated_step_ms``, the slowest rank's).
        """
        def extra(rank: int) -> dict[str, Any]:
            host = {"host_bytes": self.rank_host_bytes[rank]} if any(self.rank_host_bytes) else {}
            estimate = {"estimated_ms": self.rank_estimated_ms[rank]} if self.rank_estimated_ms else {}
            return {**host, **estimate}

        return {
            "world_size": len(self.rank_bytes),
            "memory_budget": self.memory_budget,
            **({"estimated_step_ms": max(self.rank_estimated_ms)} if self.rank_estimated_ms else {}),
            "ranks": [{"rank": r, "bytes": b, **extra(r)} for r, b in enumerate(self.rank_bytes)],
            "tables": [
                {"name": t.name, "sharding": t.sharding_type, "kernel": t.compute_kernel, "ranks": list(t.ranks),
                 "bytes": t.size_bytes}
                for t in self.tables
            ],
        }

    def __str__(self) -> str:
        rows = [self.COLUMNS] + [[str(v) for v in row] for row in self.as_rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.COLUMNS))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
        lines.append(
            f"per-rank memory (tables + optimizer state): {_per_rank_mib(self.rank_bytes)} "
            f"(budget {self.memory_budget / 2**20:.0f} MiB)"
        )
        if any(self.rank_host_bytes):
            lines.append(
                "per-rank host memory (offloaded tables + optimizer state): "
                + _per_rank_mib(self.rank_host_bytes)
            )
        if self.rank_estimated_ms:
            lines.append(
                f"TorchRec's estimate of the embeddings' time per step, at its planning batch of 512 per rank: "
                f"{max(self.rank_estimated_ms):.3f} ms (slowest rank; ranks from {min(self.rank_estimated_ms):.3f} ms)"
            )
        return "\n".join(lines)


def _rank_ranges(ranks: Sequence[int]) -> str:
    """``0,1,2,3,7`` as ``0-3,7``: a row-wise table on 640 ranks is one short cell."""
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 2 else ",".join(map(str, run)) for run in runs)


_RANKS_LISTED = 16  # more ranks are summed up in the text (every rank's bytes are in as_dict)


def _per_rank_mib(values: list[int]) -> str:
    """Each rank's MiB, or for many ranks the largest, mean and smallest (the balance of the plan)."""
    if len(values) <= _RANKS_LISTED:
        return ", ".join(f"rank {r}: {b / 2**20:.1f} MiB" for r, b in enumerate(values))
    largest = max(range(len(values)), key=values.__getitem__)
    smallest = min(range(len(values)), key=values.__getitem__)
    mean = sum(values) / len(values)
    return (
        f"largest {values[largest] / 2**20:.1f} MiB (rank {largest}), mean {mean / 2**20:.1f} "
        f"MiB, smallest {values[smallest] / 2**20:.1f} MiB (rank {smallest}) over {len(values)} ranks"
    )


class MemoryBudgetError(ValueError):
    """The plan needs more memory on some rank than its budget allows.

    ``summary`` is the plan that does not fit, when there is one (TorchRec's planner may find none).
    """

    def __init__(self, message: str, summary: Optional["PlanSummary"] = None) -> None:
        super().__init__(message)
        self.summary = summary
