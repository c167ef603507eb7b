"""How tables are sharded: the knobs users set, validated once, and the Merlin-style decisions.

`ShardingPolicy` carries the knobs NVIDIA Merlin Distributed Embeddings users know (placement and
size thresholds in elements, ``rows * dim``) plus a per-table override. Everything here is pure:
it maps table sizes to sharding types and ranks without touching a process group, so it is tested
on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional

from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType

from lightning_dembed.sharding.types import OFFLOAD_KERNELS, PLACEMENTS, SHARDING_TYPES, Offload, Placement, TableSpec
from lightning_dembed.sharding.types import TableDecision

__all__ = ["ShardingPolicy", "decide_tables"]

def _check_threshold(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be an int number of elements (rows * dim) or None, got {type(value).__name__} {value!r}"
        )
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class ShardingPolicy:
    """The sharding knobs of `HybridParallelStrategy`.

    With no Merlin knob set, TorchRec's planner chooses sharding types and places shards (under the
    ``sharding_types`` overrides and ``constraints``). Setting ``placement`` or any threshold switches
    to Merlin Distributed Embeddings' rules: per table, by size ``rows * dim``,
    ``<= data_parallel_threshold`` is replicated, ``>= row_slice_threshold`` is split by rows over all
    ranks, anything else is table-parallel, column-sliced into the smallest power of two of slices
    that brings each slice under ``column_slice_threshold``; slices are dealt to ranks by
    ``placement``.

    Args:
        placement: ``"basic"`` (round robin in table order), ``"memory_balanced"`` (largest first,
            dealt zig-zag) or ``"memory_optimized"`` (each next-largest slice to the least-loaded rank).
        column_slice_threshold: largest slice, in elements, of a table-parallel table.
        row_slice_threshold: tables of at least this many elements are sharded row-wise.
        data_parallel_threshold: tables of at most this many elements are replicated.
        sharding_types: force a sharding type per table name, e.g. ``{"t_user": "row_wise"}``.
        constraints: TorchRec ``ParameterConstraints`` per table name, for anything finer.
        offload: on GPUs, tables that do not fit the memory budget go to host memory, largest
            first (Merlin's ``gpu_embedding_size``): ``"uvm_caching"`` keeps a cache of hot rows on
            the GPU (20% of the table's rows, TorchRec's default), ``"uvm"`` reads every row from
            host memory. ``None`` (default): a plan that does not fit is refused.

    Example::

        policy = ShardingPolicy(placement="memory_balanced", data_parallel_threshold=10_000)
        decide_tables(tables, world_size=2, policy=policy)  # {"t0": TableDecision("data_parallel"), ...}
    """

    placement: Optional[Placement] = None
    column_slice_threshold: Optional[int] = None
    row_slice_threshold: Optional[int] = None
    data_parallel_threshold: Optional[int] = None
    sharding_types: Mapping[str, str] = field(default_factory=dict)
    constraints: Mapping[str, ParameterConstraints] = field(default_factory=dict)
    offload: Optional[Offload] = None

    def __post_init__(self) -> None:
        if self.offload is not None and self.offload not in OFFLOAD_KERNELS:
            raise ValueError(f"offload must be one of {tuple(OFFLOAD_KERNELS)} or None, got {self.offload!r}")
        if self.placement is not None and self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS} or None, got {self.placement!r}")
        for name in ("column_slice_threshold", "row_slice_threshold", "data_parallel_threshold"):
            _check_threshold(name, getattr(self, name))
        if not isinstance(self.sharding_types, Mapping):
            raise TypeError(f"sharding_types must map table names to sharding types, got {self.sharding_types!r}")
        for table, sharding_type in self.sharding_types.items():
            if sharding_type not in SHARDING_TYPES:
                raise ValueError(
                    f"table {table!r}: unknown sharding type {sharding_type!r}; choose one of {SHARDING_TYPES}"
                )
        for table, constraint in self.constraints.items():
            if not isinstance(constraint, ParameterConstraints):
                raise TypeError(
                    f"constraints[{table!r}] must be a torchrec ParameterConstraints, got {type(constraint).__name__}"
                )

    @property
    def uses_merlin_rules(self) -> bool:
        """Whether Merlin's thresholds and placement decide, rather than TorchRec's planner."""
        return self.placement is not None or any(
            t is not None
            for t in (self.column_slice_threshold, self.row_slice_threshold, self.data_parallel_threshold)
        )

    def check_tables(self, tables: list[TableSpec]) -> None:
        """Fail early, naming the table, when an override or constraint names no table of the model."""
        known = {t.name for t in tables}
        for source, names in (("sharding_types", self.sharding_types), ("constraints", self.constraints)):
            for name in names:
                if name not in known:
                    raise ValueError(
                        f"{source} names table {name!r}, which no embedding module of the model has; "
                        f"tables are: {sorted(known)}"
                    )


def _column_slices(table: TableSpec, world_size: int, threshold: Optional[int]) -> int:
    """Smallest power of two of column slices that gets each slice under the threshold."""
    if threshold is None or table.num_elements <= threshold:
        return 1
    slices = 2 ** math.ceil(math.log2(table.num_elements / max(threshold, 1)))
    return _fit_slices(slices, table, world_size)


def _fit_slices(slices: int, table: TableSpec, world_size: int) -> int:
    # FBGEMM needs every slice's width divisible by 4, and more slices than ranks buys nothing.
    slices = max(1, min(slices, world_size))
    while slices > 1 and table.embedding_dim % (4 * slices) != 0:
        slices //= 2
    return slices


def _place(slices: list[tuple[str, int]], world_size: int, placement: Placement) -> dict[str, list[int]]:
    """Deal (table, slice size) pairs to ranks; returns each table's ranks, slice by slice."""
    ranks: dict[str, list[int]] = {name: [] for name, _ in slices}
    load = [0] * world_size
    if placement == "basic":
        order = slices
    else:
        order = sorted(slices, key=lambda s: -s[1])
    for i, (name, size) in enumerate(order):
        if placement == "basic":
            rank = i % world_size
        elif placement == "memory_balanced":
            lap, pos = divmod(i, world_size)
            rank = pos if lap % 2 == 0 else world_size - 1 - pos
        else:
            rank = min(range(world_size), key=lambda r: (load[r], r))
        load[rank] += size
        ranks[name].append(rank)
    return ranks


def decide_tables(tables: list[TableSpec], world_size: int, policy: ShardingPolicy) -> dict[str, TableDecision]:
    """Merlin Distributed Embeddings' rules: a sharding type (and ranks) for every table.

    Per-table overrides in ``policy.sharding_types`` win. Without a column threshold, the largest
    table-parallel tables are column-split until every rank holds something, as Merlin does.
    """
    policy.check_tables(tables)
    placement: Placement = policy.placement or "basic"
    kinds: dict[str, str] = {}
    num_slices: dict[str, int] = {}
    for table in tables:
        forced = policy.sharding_types.get(table.name)
        if forced is not None:
            kinds[table.name] = forced
        elif policy.data_parallel_threshold is not None and table.num_elements <= policy.data_parallel_threshold:
            kinds[table.name] = ShardingType.DATA_PARALLEL.value
        elif policy.row_slice_threshold is not None and table.num_elements >= policy.row_slice_threshold:
            kinds[table.name] = ShardingType.ROW_WISE.value
        else:
            slices = _column_slices(table, world_size, policy.column_slice_threshold)
            kinds[table.name] = ShardingType.COLUMN_WISE.value if slices > 1 else ShardingType.TABLE_WISE.value
            num_slices[table.name] = slices
        if forced == ShardingType.COLUMN_WISE.value:
            num_slices[table.name] = max(
                _fit_slices(2, table, world_size), _column_slices(table, world_size, policy.column_slice_threshold)
            )

    placed = [t for t in tables if t.name in num_slices]
    if policy.column_slice_threshold is None and placed:
        # Merlin: split the largest table-parallel tables until every rank has a slice.
        while sum(num_slices[t.name] for t in placed) < world_size:
            splittable = [
                t for t in placed if _fit_slices(num_slices[t.name] * 2, t, world_size) > num_slices[t.name]
            ]
            if not splittable:
                break
            widest = max(splittable, key=lambda t: t.num_elements / num_slices[t.name])
            num_slices[widest.name] *= 2
            kinds[widest.name] = ShardingType.COLUMN_WISE.value

    slices = [
        (t.name, t.num_elements // num_slices[t.name]) for t in placed for _ in range(num_slices[t.name])
    ]
    ranks = _place(slices, world_size, placement)
    return {
        t.name: TableDecision(kinds[t.name], tuple(ranks[t.name]) if t.name in ranks else None) for t in tables
    }
