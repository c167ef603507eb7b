"""Plan a recipe's tables for a cluster that is not there: no table allocated, no process group.

``lightning-dembed plan CONFIG --world-size 128`` reads the data section of a recipe config (the
data decides the tables, as in training), the strategy's sharding knobs and the optimizer (its
state per table element), builds the tables on the meta device and plans them exactly as
`HybridParallelStrategy` would on that many ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule
from torch import nn
from torchrec import EmbeddingBagCollection

from lightning_dembed.sharding.optimizer import EmbeddingOptimizer, apply_embedding_optimizers
from lightning_dembed.sharding.planner import plan_sharding
from lightning_dembed.sharding.policy import ShardingPolicy
from lightning_dembed.sharding.sharders import default_sharders
from lightning_dembed.sharding.types import MemoryBudgetError, PlanSummary

__all__ = ["DryRun", "dry_run"]

_POLICY_KEYS = ("placement", "column_slice_threshold", "row_slice_threshold", "data_parallel_threshold",
                "sharding_types", "offload")


@dataclass
class DryRun:
    """A plan made without the cluster: its summary, and why it does not fit, if it does not."""

    summary: PlanSummary
    error: Optional[str]


def _set_dotted(config: dict[str, Any], key: str, value: str) -> None:
    *parents, leaf = key.lstrip("-").split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(value)


def _section(config: Mapping[str, Any], name: str) -> tuple[Optional[str], dict[str, Any]]:
    section = config.get(name)
    if isinstance(section, str):
        return section, {}
    if not isinstance(section, Mapping):
        return None, {}
    return section.get("class_path"), dict(section.get("init_args") or {})


def read_config(path: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """The YAML at ``path`` with LightningCLI-style overrides (``--data.init_args.scale=1.0``) applied."""
    config = yaml.safe_load(path.read_text()) or {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.startswith("--"):
            raise ValueError(f"override {override!r} is not --section.key=value")
        _set_dotted(config, key, value)
    return config


def _data(config: Mapping[str, Any]) -> LightningDataModule:
    class_path, init_args = _section(config, "data")
    if class_path is None:
        raise ValueError("the config has no data section with a class_path; plan needs the data to know the tables")
    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    parsed = parser.parse_object({"data": {"class_path": class_path, "init_args": init_args}})
    return parser.instantiate(parsed).data


def _optimizer(config: Mapping[str, Any]) -> EmbeddingOptimizer:
    model = config.get("model") or {}
    model_args = model.get("init_args", model) if isinstance(model, Mapping) else {}
    class_path, init_args = _section(model_args, "optimizer")
    if class_path is None:
        return EmbeddingOptimizer(torch.optim.Adagrad)  # DLRMModule's default
    module_name, _, class_name = class_path.rpartition(".")
    optimizer_class = getattr(__import__(module_name, fromlist=[class_name]), class_name)
    probe = optimizer_class([nn.Parameter(torch.empty(0))], **init_args)
    return EmbeddingOptimizer.from_param_group(probe, probe.param_groups[0])


def _policy(config: Mapping[str, Any], knobs: Mapping[str, Any]) -> ShardingPolicy:
    trainer = config.get("trainer") or {}
    _, strategy_args = _section(trainer, "strategy")
    chosen = {k: v for k, v in strategy_args.items() if k in _POLICY_KEYS}
    chosen.update({k: v for k, v in knobs.items() if v is not None})
    return ShardingPolicy(**chosen)


def dry_run(
    config_path: Path,
    world_size: int,
    local_world_size: int,
    device: str,
    memory_per_rank: int,
    overrides: Sequence[str] = (),
    **knobs: Any,
) -> DryRun:
    """Plan the config's tables on ``world_size`` ranks; ``knobs`` override the strategy's Merlin knobs."""
    config = read_config(config_path, overrides)
    tables = _data(config).tables()
    optimizer = _optimizer(config)
    root = nn.Module()
    root.embeddings = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    params = {f"embeddings.{n}": p for n, p in root.embeddings.named_parameters()}
    apply_embedding_optimizers(params, {name: optimizer for name in params})
    try:
        policy = _policy(config, knobs)
        _, summary = plan_sharding(
            root, policy, default_sharders(offload=policy.offload), world_size=world_size,
            local_world_size=local_world_size, device=torch.device(device), memory_budget=memory_per_rank,
            optimizer_state_factor=optimizer.state_factor,
        )
        return DryRun(summary, None)
    except MemoryBudgetError as err:
        # TorchRec's planner, when it finds no plan at all, has no placement to show.
        return DryRun(err.summary or PlanSummary([], [0] * world_size, memory_per_rank), str(err))
