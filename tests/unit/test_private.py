"""Fails loudly when a Lightning upgrade changes the private pieces lightning-dembed builds on."""

from __future__ import annotations

import inspect

from lightning.pytorch.strategies.ddp import _DDPForwardRedirection
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from torch.distributed import Reducer

import lightning_dembed._private as private
from lightning_dembed.strategies.launcher import ShardedMultiProcessingLauncher


def test_launcher_hook_exists_with_expected_signature() -> None:
    params = list(inspect.signature(_MultiProcessingLauncher._collect_rank_zero_results).parameters)
    assert params == ["self", "trainer", "results"]
    assert "weights_path" in _WorkerOutput._fields
    assert issubclass(ShardedMultiProcessingLauncher, _MultiProcessingLauncher)


def test_manual_optimization_pieces_exist() -> None:
    for hook in ("on_after_inner_forward", "on_after_outer_forward"):
        assert list(inspect.signature(getattr(_DDPForwardRedirection, hook)).parameters) == [
            "self", "wrapper_module", "original_module"
        ]
    assert issubclass(private.DenseDDPForwardRedirection, _DDPForwardRedirection)
    assert list(inspect.signature(private.prepare_for_backward).parameters) == ["model", "output"]
    # Called by flush_first_static_graph_iteration, as Lightning's DDPStrategy.post_backward does.
    assert callable(getattr(Reducer, "_delay_all_reduce", None))


def test_optimizer_and_comm_hook_helpers_exist() -> None:
    params = list(inspect.signature(private.init_optimizers_and_lr_schedulers).parameters)
    assert params == ["model"]
    params = list(inspect.signature(private.register_ddp_comm_hook).parameters)
    assert params == ["model", "ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper"]


def test_dcp_load_everything_pieces_exist() -> None:
    assert "keys" in inspect.signature(private.EmptyStateDictLoadPlanner).parameters
    params = inspect.signature(private.load_state_dict_no_dist).parameters
    assert {"state_dict", "storage_reader", "planner", "no_dist"} <= params.keys()
    assert list(inspect.signature(private.compute_local_shape_and_global_offset).parameters)[:3] == [
        "global_shape", "mesh", "placements"
    ]
