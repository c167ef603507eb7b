"""From a model and a `ShardingPolicy` to a TorchRec `ShardingPlan`, checked against memory.

`plan_sharding` finds every TorchRec embedding module, turns the policy into either TorchRec
planner constraints or Merlin's explicit placement, and refuses a plan that would not fit a rank's
memory budget before anything is allocated.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import ModuleSharder, ParameterSharding, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import data_type_to_dtype

from lightning_dembed._private import planner_best_options
from lightning_dembed.modules.discovery import embedding_configs, find_embedding_modules
from lightning_dembed.sharding.notices import torchrec_notices_silenced
from lightning_dembed.sharding.policy import ShardingPolicy, decide_tables
from lightning_dembed.sharding.types import OFFLOAD_KERNELS, MemoryBudgetError, PlanSummary, TableShardingInfo, TableSpec

__all__ = [
    "default_memory_budget",
    "offload_largest_tables",
    "plan_sharding",
    "summarize_plan",
    "table_specs",
]

def table_specs(modules: dict[str, nn.Module]) -> list[TableSpec]:
    """The tables of the given modules; refuses what TorchRec would fail on later, naming the table."""
    specs: list[TableSpec] = []
    seen: dict[str, str] = {}
    for path, module in modules.items():
        for config in embedding_configs(module):
            if config.name in seen:
                raise ValueError(
                    f"table {config.name!r} appears in both {seen[config.name]!r} and {path!r}: "
                    "table names must be unique across the model's embedding modules"
                )
            seen[config.name] = path
            if config.embedding_dim % 4 != 0:
                raise ValueError(
                    f"table {config.name!r}: embedding_dim {config.embedding_dim} is not divisible by 4, "
                    "which FBGEMM's kernels require"
                )
            specs.append(TableSpec(config.name, config.num_embeddings, config.embedding_dim, path))
    return specs


def default_memory_budget(device: torch.device, local_world_size: int) -> int:
    """Bytes one rank may use: the GPU's memory, or this host's RAM shared by its local ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(local_world_size, 1)


# Share of an offloaded table's rows a "uvm_caching" kernel caches in GPU memory (TorchRec's default).
CACHE_LOAD_FACTOR = 0.2


def _device_share(compute_kernel: str) -> float:
    """Share of a table shard's bytes in the rank's device memory (the rest, if any, in host memory)."""
    if compute_kernel == OFFLOAD_KERNELS["uvm_caching"]:
        return CACHE_LOAD_FACTOR
    return 0.0 if compute_kernel == OFFLOAD_KERNELS["uvm"] else 1.0


def _shard_ranks_and_sizes(ps: ParameterSharding, shape: tuple[int, int], world_size: int) -> list[tuple[int, int]]:
    if ps.sharding_type == ShardingType.DATA_PARALLEL.value or ps.sharding_spec is None:
        return [(rank, shape[0] * shape[1]) for rank in range(world_size)]
    return [
        (shard.placement.rank(), shard.shard_sizes[0] * shard.shard_sizes[1])
        for shard in ps.sharding_spec.shards  # type: ignore[attr-defined]
    ]


def summarize_plan(
    plan: ShardingPlan,
    modules: dict[str, nn.Module],
    world_size: int,
    memory_budget: int,
    optimizer_state_factor: float,
) -> PlanSummary:
    """Per-table placement and per-rank bytes of ``plan`` (tables plus fused optimizer state)."""
    tables: list[TableShardingInfo] = []
    rank_bytes, rank_host_bytes = [0] * world_size, [0] * world_size
    for path, module in modules.items():
        module_plan = plan.get_plan_for_module(path) or {}
        for config in embedding_configs(module):
            ps = module_plan[config.name]
            elem = torch.empty((), dtype=data_type_to_dtype(config.data_type)).element_size()
            per_rank = _shard_ranks_and_sizes(ps, (config.num_embeddings, config.embedding_dim), world_size)
            # A replicated table also holds a full dense gradient.
            factor = 1 + optimizer_state_factor + (ps.sharding_type == ShardingType.DATA_PARALLEL.value)
            on_device = _device_share(ps.compute_kernel)
            for rank, numel in per_rank:
                if on_device < 1.0:  # rows (and their optimizer state) in host memory, a cache on the device
                    rank_host_bytes[rank] += int(numel * elem * factor)
                    rank_bytes[rank] += int(numel * elem * on_device)
                else:
                    rank_bytes[rank] += int(numel * elem * factor)
            tables.append(
                TableShardingInfo(
                    name=config.name,
                    module_path=path,
                    num_embeddings=config.num_embeddings,
                    embedding_dim=config.embedding_dim,
                    sharding_type=ps.sharding_type,
                    compute_kernel=ps.compute_kernel,
                    ranks=tuple(sorted({r for r, _ in per_rank})),
                    size_bytes=config.num_embeddings * config.embedding_dim * elem,
                )
            )
    return PlanSummary(tables, rank_bytes, memory_budget, optimizer_state_factor, rank_host_bytes)


def check_memory_budget(summary: PlanSummary) -> None:
    """Refuse a plan that does not fit, saying which rank, which tables, and what to change."""
    over = [r for r, b in enumerate(summary.rank_bytes) if b > summary.memory_budget]
    if not over:
        return
    worst = max(over, key=lambda r: summary.rank_bytes[r])
    on_worst = sorted((t for t in summary.tables if worst in t.ranks), key=lambda t: -t.size_bytes)[:3]
    total = sum(summary.rank_bytes)
    least_ranks = -(-total // summary.memory_budget)
    shown = over if len(over) <= 16 else f"{len(over)} of {len(summary.rank_bytes)}"
    raise MemoryBudgetError(
        f"the sharding plan needs {summary.rank_bytes[worst] / 2**30:.2f} GiB on rank {worst}, over its budget of "
        f"{summary.memory_budget / 2**30:.2f} GiB (ranks over budget: {shown}). Largest tables there: "
        + ", ".join(f"{t.name} ({t.sharding_type}, {t.size_bytes / 2**30:.2f} GiB)" for t in on_worst)
        + ". Shard them row-wise (sharding_types={'<table>': 'row_wise'} or a lower row_slice_threshold), "
        "offload the largest tables to host memory (offload='uvm_caching', on GPUs), "
        f"use more processes (all tables and optimizer state take {total / 2**30:.1f} GiB: about "
        f"{least_ranks} ranks of this budget), shrink the tables, or raise memory_budget_per_rank if the budget "
        "is too low.",
        summary,
    )


def _merlin_plan(
    modules: dict[str, nn.Module],
    specs: list[TableSpec],
    policy: ShardingPolicy,
    sharders: dict[type, ModuleSharder[nn.Module]],
    world_size: int,
    local_world_size: int,
    device_type: str,
) -> ShardingPlan:
    decisions = decide_tables(specs, world_size, policy)
    num_hosts = max(world_size // local_world_size, 1)
    row_wise_tables = 0
    plan = ShardingPlan(plan={})
    for path, module in modules.items():
        generators = {}
        for config in embedding_configs(module):
            decision = decisions[config.name]
            kind = decision.sharding_type
            # Merlin's thresholds decide without looking at the module (data_parallel below one).
            _check_offered(config.name, kind, module, path, sharders[type(module)], device_type)
            if kind == ShardingType.TABLE_WISE.value:
                generators[config.name] = table_wise(rank=decision.ranks[0])  # type: ignore[index]
            elif kind == ShardingType.COLUMN_WISE.value:
                generators[config.name] = column_wise(ranks=list(decision.ranks or ()))
            elif kind == ShardingType.ROW_WISE.value:
                generators[config.name] = row_wise()
            elif kind == ShardingType.DATA_PARALLEL.value:
                generators[config.name] = data_parallel()
            elif kind == ShardingType.TABLE_ROW_WISE.value:
                generators[config.name] = table_row_wise(host_index=row_wise_tables % num_hosts)
                row_wise_tables += 1
            else:
                raise ValueError(
                    f"table {config.name!r}: {kind!r} is placed by TorchRec's planner only; "
                    "leave placement and the thresholds unset to use it"
                )
        plan.plan[path] = construct_module_sharding_plan(
            module,
            generators,
            sharder=sharders[type(module)],
            local_size=local_world_size,
            world_size=world_size,
            device_type=device_type,
        )
    return plan


def _torchrec_plan(
    root: nn.Module,
    policy: ShardingPolicy,
    sharders: list[ModuleSharder[nn.Module]],
    world_size: int,
    local_world_size: int,
    device_type: str,
    memory_budget: int,
    process_group: Optional[dist.ProcessGroup],
) -> tuple[ShardingPlan, list[float]]:
    """TorchRec's plan, and its estimate of each rank's embedding time per step in ms (empty where the
    planner did not plan in this process: ranks other than 0 of a collective plan)."""
    constraints: dict[str, ParameterConstraints] = dict(policy.constraints)
    for table, sharding_type in policy.sharding_types.items():
        constraints[table] = replace(constraints.get(table, ParameterConstraints()), sharding_types=[sharding_type])
    cap = {"hbm_cap_bytes": memory_budget} if device_type == "cuda" else {"ddr_cap_bytes": memory_budget}
    # Built the way TorchRec asks (its factory validates and resolves the hardware defaults).
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=local_world_size, **cap),
        kernel_config=KernelConfig(compute_device=device_type),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=constraints,
        # TorchRec's recommendation over its default heuristic (which also over-estimates dense sizes
        # of meta-built models); the strategy checks each rank's tables against the budget itself.
        storage_reservation=FixedPercentageStorageReservation(percentage=0.15),
    )
    try:
        with torchrec_notices_silenced():
            if process_group is not None:
                plan = planner.collective_plan(root, sharders, process_group)
            else:
                plan = planner.plan(root, sharders)
    except PlannerError as err:
        raise MemoryBudgetError(
            f"TorchRec's planner found no plan within {memory_budget / 2**30:.2f} GiB per rank. Use more "
            "processes, allow row_wise for the largest tables (sharding_types={'<table>': 'row_wise'}), offload "
            "the largest tables to host memory (offload='uvm_caching', on GPUs), shrink the tables, or raise "
            f"memory_budget_per_rank. Planner said: {err}"
        ) from err
    return plan, _estimated_ms_per_rank(planner_best_options(planner), world_size)


def _estimated_ms_per_rank(options: Optional[list], world_size: int) -> list[float]:
    """Per rank, the sum of TorchRec's perf estimates (forward and backward, compute and comms) of its shards."""
    if not options:
        return []
    per_rank = [0.0] * world_size
    for option in options:
        for shard in option.shards:
            if shard.perf is not None and shard.rank is not None:
                per_rank[shard.rank] += shard.perf.total
    return per_rank


def offload_largest_tables(plan: ShardingPlan, summarize: Any, kernel: str) -> PlanSummary:
    """Move the largest tables of the ranks over budget to host memory with ``kernel``, until all fit.

    Merlin's ``gpu_embedding_size`` rule on a finished plan: sharding types and ranks stay; only
    the compute kernel of the moved tables changes. Replicated tables stay (they train as dense
    parameters). Returns the final summary (``summarize()`` of the plan as it is).
    """
    summary = summarize()
    offloadable = sorted(
        (t for t in summary.tables if t.sharding_type != ShardingType.DATA_PARALLEL.value), key=lambda t: -t.size_bytes
    )
    while offloadable:
        over = {r for r, b in enumerate(summary.rank_bytes) if b > summary.memory_budget}
        if not over:
            break
        table = next((t for t in offloadable if over & set(t.ranks)), None)
        if table is None:
            break
        offloadable.remove(table)
        plan.plan[table.module_path][table.name].compute_kernel = kernel  # type: ignore[index]
        summary = summarize()
    return summary


def keep_table_order(plan: ShardingPlan, modules: dict[str, nn.Module], policy: ShardingPolicy) -> None:
    """Among interchangeable tables, give the lower ranks to the earlier tables, in place.

    A sharded `EmbeddingBagCollection` returns its features grouped by rank; when that order is
    not its tables' order, the output hook has to copy every batch back into it. Tables of the same
    shape, type, kernel and constraints cost the planner the same wherever they go, so trading
    their placements keeps every rank's load and makes rank order follow table order (the planner's
    greedy balancing deals identical tables out round-robin, the worst case for the copy).
    """
    for path, module in modules.items():
        module_plan = plan.plan.get(path)
        if not module_plan:
            continue
        groups: dict[tuple, list[str]] = {}
        for config in embedding_configs(module):
            ps = module_plan[config.name]
            key = (
                config.num_embeddings,
                config.embedding_dim,
                config.data_type,
                getattr(config, "pooling", None),
                len(config.feature_names),
                ps.sharding_type,
                ps.compute_kernel,
                repr(policy.constraints.get(config.name)),
            )
            groups.setdefault(key, []).append(config.name)
        for names in groups.values():
            placements = sorted((module_plan[n] for n in names), key=lambda ps: list(ps.ranks or []))
            for name, ps in zip(names, placements):
                module_plan[name] = ps


def _check_offered(
    table: str, kind: str, module: nn.Module, path: str, sharder: ModuleSharder[nn.Module], device_type: str
) -> None:
    """Fail, naming the table and what its module can do, on a sharding type its sharder does not offer."""
    offered = sharder.sharding_types(device_type)
    if kind not in offered:
        raise ValueError(
            f"table {table!r} of {type(module).__name__} {path!r}: sharding type {kind!r} is not available for it "
            f"on {device_type}; choose one of {offered} (sharding_types={{{table!r}: ...}})"
        )


def _check_sharding_types_offered(
    specs: list[TableSpec],
    modules: dict[str, nn.Module],
    policy: ShardingPolicy,
    sharders: list[ModuleSharder[nn.Module]],
    device_type: str,
) -> None:
    """`_check_offered` for every sharding type the policy asks for by table name."""
    # TorchRec matches sharders to modules by exact type (a module none matches is not sharded).
    sharder_of = {s.module_type: s for s in sharders}
    for spec in specs:
        module = modules[spec.module_path]
        sharder = sharder_of.get(type(module))
        if spec.name in policy.sharding_types and sharder is not None:
            _check_offered(spec.name, policy.sharding_types[spec.name], module, spec.module_path, sharder, device_type)


def plan_sharding(
    root: nn.Module,
    policy: ShardingPolicy,
    sharders: list[ModuleSharder[nn.Module]],
    world_size: int,
    local_world_size: int,
    device: torch.device,
    memory_budget: int,
    optimizer_state_factor: float,
    process_group: Optional[dist.ProcessGroup] = None,
) -> tuple[ShardingPlan, PlanSummary]:
    """Plan every embedding module of ``root`` and check the plan against ``memory_budget``.

    Returns the TorchRec plan and its summary. Raises `MemoryBudgetError` before any table is
    allocated when a rank would hold more than its budget.
    """
    modules = find_embedding_modules(root)
    specs = table_specs(modules)
    policy.check_tables(specs)
    _check_sharding_types_offered(specs, modules, policy, sharders, device.type)
    if policy.offload is not None and device.type != "cuda":
        raise ValueError(
            f"offload={policy.offload!r} keeps tables in host memory for GPUs; on {device.type} every table is "
            "there already. Leave offload unset (plan for a GPU cluster with `lightning-dembed plan --device cuda`)"
        )
    estimated_ms: list[float] = []  # Merlin's rules estimate no time
    if policy.uses_merlin_rules:
        sharder_map = {s.module_type: s for s in sharders}
        plan = _merlin_plan(modules, specs, policy, sharder_map, world_size, local_world_size, device.type)
    else:
        # With offload, the sharders also offer its kernel: the planner offloads what does not fit.
        plan, estimated_ms = _torchrec_plan(
            root, policy, sharders, world_size, local_world_size, device.type, memory_budget, process_group
        )
    keep_table_order(plan, modules, policy)
    summary = summarize_plan(plan, modules, world_size, memory_budget, optimizer_state_factor)
    if policy.offload is not None and policy.uses_merlin_rules:
        summary = offload_largest_tables(
            plan,
            lambda: summarize_plan(plan, modules, world_size, memory_budget, optimizer_state_factor),
            OFFLOAD_KERNELS[policy.offload],
        )
    summary.rank_estimated_ms = estimated_ms
    check_memory_budget(summary)
    return plan, summary

