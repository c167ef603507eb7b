"""Merlin-style sharding rules and plan checks, without a process group."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
from torchrec.distributed.planner.types import ParameterConstraints

from lightning_dembed.modules.discovery import find_embedding_modules
from lightning_dembed.sharding.planner import check_memory_budget, plan_sharding, table_specs
from lightning_dembed.sharding.policy import ShardingPolicy, decide_tables
from lightning_dembed.sharding.sharders import default_sharders
from lightning_dembed.sharding.types import MemoryBudgetError, PlanSummary, TableShardingInfo, TableSpec


def spec(name: str, rows: int, dim: int) -> TableSpec:
    return TableSpec(name, rows, dim, "ebc")


def test_thresholds_pick_data_parallel_row_wise_and_column_slices() -> None:
    tables = [spec("small", 10, 4), spec("huge", 10_000, 16), spec("wide", 1000, 64), spec("mid", 100, 8)]
    policy = ShardingPolicy(data_parallel_threshold=40, row_slice_threshold=100_000, column_slice_threshold=20_000)
    decisions = decide_tables(tables, world_size=4, policy=policy)
    assert decisions["small"].sharding_type == "data_parallel"
    assert decisions["huge"].sharding_type == "row_wise"
    # 64_000 elements over a 20_000 threshold: 4 slices (the smallest power of two under it).
    assert decisions["wide"].sharding_type == "column_wise"
    assert len(decisions["wide"].ranks) == 4
    assert decisions["mid"].sharding_type == "table_wise"


def test_without_column_threshold_largest_tables_split_until_every_rank_has_one() -> None:
    tables = [spec("a", 1000, 16), spec("b", 10, 8)]
    decisions = decide_tables(tables, world_size=4, policy=ShardingPolicy(placement="basic"))
    held = {r for d in decisions.values() for r in d.ranks}
    assert held == {0, 1, 2, 3}
    assert decisions["a"].sharding_type == "column_wise"


@pytest.mark.parametrize(
    ("placement", "expected"),
    [
        ("basic", {"t0": (0,), "t1": (1,), "t2": (0,), "t3": (1,)}),
        # sizes 400, 300, 200, 100: zig-zag deal 0, 1, 1, 0
        ("memory_balanced", {"t0": (0,), "t1": (1,), "t2": (1,), "t3": (0,)}),
        # each next-largest to the least loaded: 0, 1, 1 (300 < 400), then 0 (400 < 500)
        ("memory_optimized", {"t0": (0,), "t1": (1,), "t2": (1,), "t3": (0,)}),
    ],
)
def test_placements(placement: str, expected: dict) -> None:
    tables = [spec("t0", 100, 4), spec("t1", 75, 4), spec("t2", 50, 4), spec("t3", 25, 4)]
    decisions = decide_tables(tables, world_size=2, policy=ShardingPolicy(placement=placement))
    assert {name: d.ranks for name, d in decisions.items()} == expected


def test_memory_optimized_differs_from_balanced_when_it_should() -> None:
    tables = [spec("t0", 100, 4), spec("t1", 90, 4), spec("t2", 20, 4), spec("t3", 10, 4), spec("t4", 10, 4)]
    balanced = decide_tables(tables, 2, ShardingPolicy(placement="memory_balanced"))
    optimized = decide_tables(tables, 2, ShardingPolicy(placement="memory_optimized"))
    load = lambda d: [sum(t.num_elements for t in tables if d[t.name].ranks == (r,)) for r in (0, 1)]  # noqa: E731
    assert max(load(optimized)) <= max(load(balanced))


def test_override_wins_over_thresholds() -> None:
    tables = [spec("t0", 10, 4)]
    policy = ShardingPolicy(data_parallel_threshold=1000, sharding_types={"t0": "row_wise"})
    assert decide_tables(tables, 2, policy)["t0"].sharding_type == "row_wise"


def test_unknown_sharding_type_names_table() -> None:
    with pytest.raises(ValueError, match=r"table 't_user': unknown sharding type 'roww_wise'"):
        ShardingPolicy(sharding_types={"t_user": "roww_wise"})


@pytest.mark.parametrize("knob", ["column_slice_threshold", "row_slice_threshold", "data_parallel_threshold"])
def test_threshold_of_wrong_type_names_knob(knob: str) -> None:
    with pytest.raises(TypeError, match=knob):
        ShardingPolicy(**{knob: "1e6"})
    with pytest.raises(TypeError, match=knob):
        ShardingPolicy(**{knob: 1.5})


def test_unknown_placement_and_constraint_type() -> None:
    with pytest.raises(ValueError, match="placement"):
        ShardingPolicy(placement="random")
    with pytest.raises(TypeError, match=r"constraints\['t0'\]"):
        ShardingPolicy(constraints={"t0": {"sharding_types": ["row_wise"]}})


def test_override_for_missing_table_names_it() -> None:
    policy = ShardingPolicy(sharding_types={"nope": "row_wise"})
    with pytest.raises(ValueError, match=r"sharding_types names table 'nope'"):
        decide_tables([spec("t0", 10, 4)], 2, policy)


def test_table_of_bad_width_and_duplicate_names_are_named() -> None:
    # (A table no feature feeds is caught at the first batch: see test_modules_and_hooks.)
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name="odd", num_embeddings=10, embedding_dim=6, feature_names=["f"])],
        device=torch.device("meta"),
    )
    with pytest.raises(ValueError, match=r"table 'odd': embedding_dim 6 is not divisible by 4"):
        table_specs({"ebc": ebc})
    twin = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name="odd", num_embeddings=10, embedding_dim=8, feature_names=["g"])],
        device=torch.device("meta"),
    )
    with pytest.raises(ValueError, match=r"table 'odd' appears in both 'a' and 'b'"):
        table_specs({"a": twin, "b": twin})


@pytest.mark.parametrize(
    "policy",
    [ShardingPolicy(sharding_types={"seq": "data_parallel"}), ShardingPolicy(placement="basic", data_parallel_threshold=10**6)],
    ids=["asked-by-name", "merlin-threshold"],
)
def test_data_parallel_sequence_table_on_cpu_is_refused_naming_the_alternatives(policy: ShardingPolicy) -> None:
    # FBGEMM's dense CPU kernel pools what an EmbeddingCollection returns row by row.
    ec = EmbeddingCollection(
        tables=[EmbeddingConfig(name="seq", num_embeddings=10, embedding_dim=4, feature_names=["f"])],
        device=torch.device("meta"),
    )
    model = torch.nn.ModuleDict({"ec": ec})
    with pytest.raises(ValueError, match=r"table 'seq' of EmbeddingCollection 'ec': sharding type 'data_parallel' is "
                                         r"not available for it on cpu; choose one of \['table_wise'"):
        plan_sharding(model, policy, default_sharders(), world_size=2, local_world_size=2,
                      device=torch.device("cpu"), memory_budget=2**30, optimizer_state_factor=1.0)


def test_find_embedding_modules_by_path() -> None:
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=4, feature_names=["f"])],
        device=torch.device("meta"),
    )
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ModuleDict({"sparse": ebc}))
    assert find_embedding_modules(model) == {"1.sparse": ebc}


def test_memory_budget_error_says_what_to_change() -> None:
    info = TableShardingInfo("t_big", "ebc", 10**9, 128, "table_wise", "fused", (1,), 512 * 2**30)
    summary = PlanSummary(tables=[info], rank_bytes=[0, 2 * 512 * 2**30], memory_budget=64 * 2**30)
    with pytest.raises(MemoryBudgetError, match=r"rank 1.*t_big \(table_wise.*row_wise.*more processes"):
        check_memory_budget(summary)


def test_constraints_accepted() -> None:
    ShardingPolicy(constraints={"t0": ParameterConstraints(sharding_types=["row_wise"])})


def test_ddp_arguments_torchrec_fixes_are_refused_by_name() -> None:
    from lightning_dembed import HybridParallelStrategy

    with pytest.raises(ValueError, match=r"\['broadcast_buffers'\]"):
        HybridParallelStrategy(broadcast_buffers=True)
    strategy = HybridParallelStrategy(find_unused_parameters=True, static_graph=False)
    assert strategy._data_parallel_wrapper._find_unused_parameters is True


def trainer_holding(module):
    """A one-process Trainer on HybridParallelStrategy with ``module`` attached, not set up (nothing sharded)."""
    from lightning.pytorch import Trainer

    from lightning_dembed import HybridParallelStrategy

    trainer = Trainer(strategy=HybridParallelStrategy(), accelerator="cpu", devices=1, logger=False)
    module.trainer = trainer
    trainer.strategy.connect(module)
    return trainer


def test_a_module_the_strategy_has_not_sharded_is_saved_as_ddp_saves_it_or_refused(tmp_path) -> None:
    # The launching process of a spawn/fork run holds the tables handed back: one plain file, as DDP
    # writes. Tables still on meta (a setup that failed) cannot be saved: refused, or only warned
    # of under OnExceptionCheckpoint, where the error that stopped the run is the one to see.
    from lightning.pytorch import LightningModule
    from lightning.pytorch.trainer.states import TrainerStatus

    from lightning_dembed.checkpoint import CheckpointError

    module = LightningModule()
    module.layer = torch.nn.Linear(2, 1)
    trainer = trainer_holding(module)
    trainer.strategy.save_checkpoint({"state_dict": module.state_dict()}, tmp_path / "plain.ckpt")
    assert torch.load(tmp_path / "plain.ckpt")["state_dict"].keys() == {"layer.weight", "layer.bias"}
    module.layer.to_empty(device="meta")
    with pytest.raises(CheckpointError, match=r"\['layer.weight', 'layer.bias'\] are not in this process's memory"):
        trainer.strategy.save_checkpoint({"state_dict": module.state_dict()}, tmp_path / "meta.ckpt")
    trainer.state.status = TrainerStatus.INTERRUPTED
    with pytest.warns(UserWarning, match="the run failed before sharding it"):
        trainer.strategy.save_checkpoint({"state_dict": module.state_dict()}, tmp_path / "on_exception.ckpt")
    assert not (tmp_path / "meta.ckpt").exists() and not (tmp_path / "on_exception.ckpt").exists()


def test_loading_hands_modules_their_extra_state_as_load_state_dict_does() -> None:
    from lightning.pytorch import LightningModule

    class Vocabulary(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.words = ["a"]

        def get_extra_state(self) -> dict:
            return {"words": self.words}

        def set_extra_state(self, state: dict) -> None:
            self.words = state["words"]

    module = LightningModule()
    module.vocabulary, module.layer = Vocabulary(), torch.nn.Linear(2, 1)
    trainer = trainer_holding(module)
    state = {**module.state_dict(), "vocabulary._extra_state": {"words": ["a", "b"]}}
    trainer.strategy.load_model_state_dict({"state_dict": state})
    assert module.vocabulary.words == ["a", "b"]


def test_identical_tables_are_placed_in_table_order() -> None:
    from lightning_dembed.sharding.planner import plan_sharding
    from lightning_dembed.sharding.sharders import default_sharders

    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=f"t{i}", num_embeddings=1000, embedding_dim=64, feature_names=[f"f{i}"])
                for i in range(8)],
        device=torch.device("meta"),
    )
    model = torch.nn.ModuleDict({"ebc": ebc})
    plan, summary = plan_sharding(
        model, ShardingPolicy(), default_sharders(), world_size=2, local_world_size=2,
        device=torch.device("cpu"), memory_budget=2**30, optimizer_state_factor=1.0,
    )
    ranks = [t.ranks for t in summary.tables if t.sharding_type == "table_wise"]
    assert len(ranks) == 8 and ranks == sorted(ranks), ranks
    # Trading placements between identical tables kept the planner's balance.
    assert summary.rank_bytes[0] == summary.rank_bytes[1]
