from __future__ import annotations

import pytest
import torch
from torchrec import optim as trec_optim

from lightning_dembed.sharding.optimizer import (
    EmbeddingOptimizer,
    ParamGroupRef,
    refuse_hand_picked_parameters_without_tables,
    split_saved_optimizer_state,
    table_param_groups,
)

PARAMS = [torch.nn.Parameter(torch.zeros(2))]


def from_first_group(optimizer: torch.optim.Optimizer) -> EmbeddingOptimizer:
    return EmbeddingOptimizer.from_param_group(optimizer, optimizer.param_groups[0])


@pytest.mark.parametrize(
    ("optimizer", "kwargs"),
    [
        (torch.optim.SGD(PARAMS, lr=0.5), {"lr": 0.5, "weight_decay": 0, "maximize": False, "momentum": 0,
                                           "nesterov": False}),
        (torch.optim.Adagrad(PARAMS, lr=0.1, eps=1e-8), {"lr": 0.1, "eps": 1e-8, "weight_decay": 0,
                                                         "maximize": False, "lr_decay": 0,
                                                         "initial_accumulator_value": 0}),
    ],
)
def test_from_configured_optimizer(optimizer: torch.optim.Optimizer, kwargs: dict) -> None:
    fused = EmbeddingOptimizer.from_param_group(optimizer, optimizer.param_groups[0])
    assert fused.optimizer_class is type(optimizer)
    assert fused.kwargs == kwargs


def test_no_fused_equivalent_lists_alternatives() -> None:
    with pytest.raises(ValueError, match=r"RMSprop has no fused FBGEMM equivalent.*Adagrad.*embedding_optimizer"):
        from_first_group(torch.optim.RMSprop(PARAMS))


def test_unsupported_hyper_parameter_value() -> None:
    with pytest.raises(ValueError, match=r"SGD\(momentum=0.9\) cannot be fused.*cycle_momentum=False"):
        from_first_group(torch.optim.SGD(PARAMS, lr=0.1, momentum=0.9))


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        (torch.optim.SGD(PARAMS, lr=0.1, weight_decay=1e-4),
         r"SGD\(weight_decay=0.0001\).*param group with weight_decay=0"),
        (torch.optim.Adagrad(PARAMS, lr=0.1, weight_decay=1e-4), r"Adagrad\(weight_decay=0.0001\)"),
        (torch.optim.SGD(PARAMS, lr=0.1, maximize=True), r"SGD\(maximize=True\) cannot be fused"),
        (trec_optim.RowWiseAdagrad([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1, weight_decay=1e-4),
         r"RowWiseAdagrad\(weight_decay=0.0001\)"),
        (trec_optim.RowWiseAdagrad([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1, lr_decay=0.5),
         r"RowWiseAdagrad\(lr_decay=0.5\)"),
        (trec_optim.RowWiseAdagrad([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1, initial_accumulator_value=1.0),
         r"RowWiseAdagrad\(initial_accumulator_value=1.0\)"),
        (trec_optim.RowWiseAdagrad([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1, maximize=True),
         r"RowWiseAdagrad\(maximize=True\)"),
    ],
    ids=["sgd-decay", "adagrad-decay", "maximize", "rowwise-decay", "rowwise-lr-decay", "rowwise-initial-sum",
         "rowwise-maximize"],
)
def test_what_the_fused_update_cannot_do_is_refused(optimizer: torch.optim.Optimizer, message: str) -> None:
    # The fused kernels would silently skip it: decay of every row at every step, ascent.
    with pytest.raises(ValueError, match=message):
        from_first_group(optimizer)


def test_adam_from_configure_optimizers_is_refused_as_lazy() -> None:
    lazy = r"only the rows each batch looks up.*EmbeddingOptimizer\(torch.optim.Adam"
    with pytest.raises(ValueError, match=lazy):
        from_first_group(torch.optim.Adam(PARAMS, lr=1e-3))
    EmbeddingOptimizer(torch.optim.Adam, {"lr": 1e-3, "betas": (0.9, 0.99)})  # given explicitly: taken


def test_adam_is_gpu_only() -> None:
    with pytest.raises(ValueError, match="no fused Adam on cpu"):
        EmbeddingOptimizer(torch.optim.Adam, {"lr": 1e-3}).check_device(torch.device("cpu"))


def test_rowwise_adagrad_state_is_per_row() -> None:
    assert EmbeddingOptimizer(trec_optim.RowWiseAdagrad, {"lr": 0.1}).state_factor == 0.0
    assert EmbeddingOptimizer(torch.optim.Adagrad, {"lr": 0.1}).state_factor == 1.0


def test_tables_take_the_values_of_the_group_that_holds_them() -> None:
    tables = {"t0": torch.nn.Parameter(torch.zeros(2)), "t1": torch.nn.Parameter(torch.zeros(2))}
    dense = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([{"params": [dense]}, {"params": [tables["t1"]], "lr": 1.0}], lr=1e-9)
    groups = table_param_groups([optimizer], tables)
    assert groups == {"t1": ParamGroupRef(0, 1)}  # t0 is in no group
    assert from_first_group(optimizer).kwargs["lr"] == 1e-9
    assert EmbeddingOptimizer.from_param_group(optimizer, optimizer.param_groups[1]).kwargs["lr"] == 1.0


def test_saved_optimizer_state_is_split_between_kept_parameters_and_tables() -> None:
    # As strategy="ddp" saves it: parameters numbered across groups, tables among them.
    saved = {
        "state": {0: {"sum": torch.ones(2)}, 1: {"sum": torch.full((3, 4), 2.0)}, 2: {"sum": torch.zeros(1)}},
        "param_groups": [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.4, "params": [2, 3]}],
    }
    configured = [["mlp.weight", "ebc.embedding_bags.t0.weight"], ["mlp.bias", "ebc.embedding_bags.t1.weight"]]
    kept = [["mlp.weight"], ["mlp.bias"]]
    dense, tables = split_saved_optimizer_state(saved, configured, kept)
    assert dense["param_groups"] == [{"lr": 0.1, "params": [0]}, {"lr": 0.4, "params": [1]}]
    assert torch.equal(dense["state"][0]["sum"], torch.ones(2))
    assert torch.equal(dense["state"][1]["sum"], torch.zeros(1))
    assert list(tables) == ["ebc.embedding_bags.t0.weight"]  # t1 has no state yet


def test_saved_optimizer_state_follows_its_parameters_by_name() -> None:
    # Consolidated under a plan that replicated t0 (its state among the dense ones), loaded under one
    # that replicates t2 instead: positions agree, parameters do not.
    saved = {"state": {0: {"sum": torch.ones(64, 8)}, 1: {"sum": torch.full((2,), 3.0)}},
             "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    saved_names = [["ebc.embedding_bags.t0.weight", "mlp.weight"]]
    kept = [["ebc.embedding_bags.t2.weight", "mlp.weight"]]
    dense, tables = split_saved_optimizer_state(saved, saved_names, kept)
    assert dense["param_groups"] == [{"lr": 0.1, "params": [0, 1]}]
    assert list(dense["state"]) == [1] and torch.equal(dense["state"][1]["sum"], torch.full((2,), 3.0))
    assert list(tables) == ["ebc.embedding_bags.t0.weight"]  # for t0's fused kernel; t2 has no saved state


def test_saved_optimizer_state_follows_a_parameter_into_another_group() -> None:
    saved = {"state": {0: {"sum": torch.ones(2)}, 1: {"sum": torch.zeros(3)}},
             "param_groups": [{"lr": 0.1, "params": [0]}, {"lr": 0.4, "params": [1]}]}
    dense, given_up = split_saved_optimizer_state(saved, [["a"], ["b"]], [[], ["b", "a"]])
    assert dense["param_groups"] == [{"lr": 0.1, "params": []}, {"lr": 0.4, "params": [0, 1]}]
    assert torch.equal(dense["state"][1]["sum"], torch.ones(2)) and not given_up


def test_table_state_saved_by_torch_maps_onto_the_fused_kernel_or_is_refused() -> None:
    adagrad = EmbeddingOptimizer(torch.optim.Adagrad, {"lr": 0.1})
    sums = torch.ones(3, 4)
    assert adagrad.fused_state_from("t0", {"step": torch.tensor(2.0), "sum": sums}) == {"t0.momentum1": sums}
    assert adagrad.takes_state_from({"step": torch.tensor(2.0), "sum": sums})
    assert not adagrad.takes_state_from({"exp_avg": sums})
    row_wise = EmbeddingOptimizer(trec_optim.RowWiseAdagrad, {"lr": 0.1})
    assert not row_wise.takes_state_from({"sum": sums})
    with pytest.raises(ValueError, match=r"table 't0': the checkpoint holds optimizer state \['sum'\].*fused RowWiseAdagrad"):
        row_wise.fused_state_from("t0", {"sum": sums})


def test_tables_left_out_with_hand_picked_parameters_are_refused() -> None:
    # dense_parameters(self) (all but the tables): the tables train with the first group. Parameters
    # picked by hand (the MLP only): under DDP the tables would not train, so neither guess is made.
    module = torch.nn.ModuleDict({"mlp": torch.nn.Linear(2, 1), "head": torch.nn.Linear(1, 1),
                                  "ebc": torch.nn.Embedding(4, 2)})
    tables = ["ebc.weight"]
    every_dense = ["mlp.weight", "mlp.bias", "head.weight", "head.bias"]
    refuse_hand_picked_parameters_without_tables(module.named_parameters(), every_dense, tables, tables)
    mlp_only = ["mlp.weight", "mlp.bias"]
    with pytest.raises(ValueError, match=r"tables \['ebc.weight'\] and parameters \['head.weight', 'head.bias'\]"):
        refuse_hand_picked_parameters_without_tables(module.named_parameters(), mlp_only, tables, tables)
    refuse_hand_picked_parameters_without_tables(module.named_parameters(), mlp_only, tables, [])  # table frozen
    module["head"].requires_grad_(False)  # frozen by the user: nothing is left out
    refuse_hand_picked_parameters_without_tables(module.named_parameters(), mlp_only, tables, tables)
    refuse_hand_picked_parameters_without_tables(module.named_parameters(), [*mlp_only, "ebc.weight"], tables, tables)
