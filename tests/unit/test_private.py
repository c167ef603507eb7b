"""Fails loudly when a Lightning upgrade changes the private pieces lightning-dembed builds on."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

from lightning.pytorch.strategies.ddp import _DDPForwardRedirection
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from torch.distributed import Reducer

import lightning_dembed._private as private
from lightning_dembed.strategies.launcher import FirstFailureScriptLauncher, ShardedMultiProcessingLauncher


def test_launcher_hook_exists_with_expected_signature() -> None:
    params = list(inspect.signature(_MultiProcessingLauncher._collect_rank_zero_results).parameters)
    assert params == ["self", "trainer", "results"]
    assert "weights_path" in _WorkerOutput._fields
    assert issubclass(ShardedMultiProcessingLauncher, _MultiProcessingLauncher)


def test_script_launcher_pieces_exist() -> None:
    from lightning.pytorch.plugins.environments import LightningEnvironment

    assert issubclass(FirstFailureScriptLauncher, _SubprocessScriptLauncher)
    params = list(inspect.signature(_SubprocessScriptLauncher.launch).parameters)
    assert params == ["self", "function", "args", "trainer", "kwargs"]
    assert "procs" in vars(_SubprocessScriptLauncher(LightningEnvironment(), 1, 1))  # the other ranks' Popen


def test_child_process_observer_stands_down_quietly() -> None:
    # The script launcher starts this thread (its call is what `stand_down_child_process_observers` relies on).
    assert "_launch_process_observer(self.procs)" in inspect.getsource(_SubprocessScriptLauncher.launch)
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    failed.wait()
    observer = private.ChildProcessObserver(main_pid=os.getpid(), child_processes=[failed])
    assert observer._child_processes == [failed]
    observer._child_processes = []  # what stand_down_child_process_observers does
    assert observer._run() is True  # done, without killing this process


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


def test_tensor_version_counts_in_place_changes() -> None:
    import torch

    t = torch.zeros(3)
    before = private.tensor_version(t)
    t.add_(1)
    assert private.tensor_version(t) == before + 1


def test_sharded_output_keys_attribute_exists() -> None:
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

    # Set in the constructor (output dist built eagerly), from the plan's shardings.
    assert "self._embedding_names" in inspect.getsource(ShardedEmbeddingBagCollection.__init__)
    assert "self._embedding_names.extend" in inspect.getsource(ShardedEmbeddingBagCollection._create_output_dist)


def test_tuner_exit_exception_is_how_fit_ends_for_the_lr_finder() -> None:
    from lightning.pytorch.callbacks import lr_finder
    from lightning.pytorch.trainer import call

    assert issubclass(private.TunerExitException, Exception)
    assert "raise _TunerExitException()" in inspect.getsource(lr_finder.LearningRateFinder.lr_find)
    assert "except _TunerExitException:" in inspect.getsource(call._call_and_handle_interrupt)


def test_undivided_by_mean_pooling_is_the_list_the_divisor_reads() -> None:
    from torchrec.distributed import embeddingbag

    init = inspect.getsource(embeddingbag.ShardedEmbeddingBagCollection.__init__)
    assert "self._pooling_type_to_rs_features: Dict[str, List[str]] = defaultdict(list)" in init
    assert "self._has_mean_pooling_callback" in init
    input_dist = inspect.getsource(embeddingbag.ShardedEmbeddingBagCollection.input_dist)
    assert "pooling_type_to_rs_features=self._pooling_type_to_rs_features" in input_dist
    divisor = inspect.getsource(embeddingbag._create_mean_pooling_divisor)
    # Those features' bag sizes are set to 1: their pooled embeddings are left as they are.
    assert "for feature in pooling_type_to_rs_features[PoolingType.SUM.value]:" in divisor
    assert "lengths[feature_index : feature_index + batch_size] = 1" in divisor


# -- the fit loop's optimization loop (MetaLearningLoop) -------------------------------------------


def test_automatic_optimization_is_where_and_what_the_meta_loop_expects() -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.loops.optimization.automatic import _AutomaticOptimization

    assert private.AutomaticOptimization is _AutomaticOptimization
    # MetaLearningLoop's subclass overrides this one method, and builds itself as Lightning does.
    assert list(inspect.signature(_AutomaticOptimization._training_step).parameters) == ["self", "kwargs"]
    source = inspect.getsource(_AutomaticOptimization._training_step)
    assert '_call_strategy_hook(trainer, "training_step"' in source
    assert list(inspect.signature(_AutomaticOptimization.__init__).parameters) == ["self", "trainer"]

    trainer = Trainer(accelerator="cpu", logger=False)
    lightnings = trainer.fit_loop.epoch_loop.automatic_optimization
    assert type(lightnings) is _AutomaticOptimization
    ours = _AutomaticOptimization(trainer)
    assert private.swap_automatic_optimization(trainer, ours) is lightnings
    assert trainer.fit_loop.epoch_loop.automatic_optimization is ours
    # global_step and checkpoints count the same steps.
    assert ours.optim_progress is lightnings.optim_progress
    assert private.swap_automatic_optimization(trainer, lightnings) is ours
    assert trainer.fit_loop.epoch_loop.automatic_optimization is lightnings


def test_planner_keeps_its_best_options() -> None:
    from torchrec.distributed.planner import EmbeddingShardingPlanner

    assert "self._best_plan" in inspect.getsource(EmbeddingShardingPlanner.__init__)
    assert "self._best_plan = best_plan" in inspect.getsource(EmbeddingShardingPlanner.plan)


def test_model_pruning_resolves_the_modules_it_prunes_in_setup() -> None:
    from lightning.pytorch import LightningModule
    from lightning.pytorch.callbacks import ModelPruning
    from torch import nn

    module = LightningModule()
    module.dense, module.table = nn.Linear(2, 2), nn.EmbeddingBag(4, 2)
    chosen = ModelPruning("l1_unstructured", parameters_to_prune=[(module.dense, "weight")])
    chosen.setup(None, module, "fit")
    assert private.pruned_modules(chosen) == [module.dense]
    every = ModelPruning("l1_unstructured")  # every module with a weight or bias
    every.setup(None, module, "fit")
    assert {id(m) for m in private.pruned_modules(every)} == {id(module.dense), id(module.table)}


def test_sigterm_broadcast_is_skipped_for_one_run_and_given_back() -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    assert "self._broadcast_sigterm_tensor()" in inspect.getsource(_TrainingEpochLoop.advance)
    epoch_loop = Trainer(accelerator="cpu", logger=False).fit_loop.epoch_loop
    restore = private.skip_sigterm_broadcast(epoch_loop.trainer)
    assert epoch_loop._broadcast_sigterm_tensor() is None
    restore()
    assert epoch_loop._broadcast_sigterm_tensor.__func__ is _TrainingEpochLoop._broadcast_sigterm_tensor
