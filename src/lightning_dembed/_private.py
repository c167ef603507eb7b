"""Every private Lightning or torch class or function lightning-dembed touches, in one place.

Lightning keeps its loops and launchers private, and torch.distributed.checkpoint its
load-everything planner. What we subclass or call from them is imported here only, and
``tests/unit/test_private.py`` fails loudly when an upgrade changes it.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver as ChildProcessObserver
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers as init_optimizers_and_lr_schedulers
from lightning.pytorch.loops.optimization.automatic import _AutomaticOptimization as AutomaticOptimization
from lightning.pytorch.overrides.distributed import _register_ddp_comm_hook as register_ddp_comm_hook
from lightning.pytorch.overrides.distributed import prepare_for_backward
from lightning.pytorch.strategies.ddp import _DDPForwardRedirection
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher as MultiProcessingLauncher
from lightning.pytorch.strategies.launchers.multiprocessing import _WorkerOutput as WorkerOutput
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher as SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import _TunerExitException as TunerExitException
from torch import nn
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner as EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict as load_state_dict_no_dist
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "AutomaticOptimization",  # fit's optimization loop; MetaLearningLoop's subclass runs the meta-step in it
    "swap_automatic_optimization",  # puts such a loop in the fit loop's place for one run, and back
    "batches_done_in_epoch",  # the fit loop's position in the epoch, for exact resume of data
    "DenseDDPForwardRedirection",
    "EmptyStateDictLoadPlanner",  # DCP's planner that loads every (or the named) tensor of a checkpoint
    "MultiProcessingLauncher",
    "SubprocessScriptLauncher",  # start_method="popen": rank 0 is the launching process, the others re-run the script
    "stand_down_child_process_observers",  # stops the thread of that launcher that SIGKILLs all once a rank fails
    "TunerExitException",  # how the LR finder leaves fit on every rank: Lightning's control flow, not a failure
    "WorkerOutput",
    "compute_local_shape_and_global_offset",  # a DTensor shard's place in the full tensor
    "load_state_dict_no_dist",  # DCP's load that returns what the planner above created
    "flush_first_static_graph_iteration",
    "init_optimizers_and_lr_schedulers",  # configure_optimizers' output in every form it may take
    "pruned_modules",  # the modules a ModelPruning callback prunes, resolved in its setup
    "prepare_for_backward",  # what Lightning's DDPStrategy.pre_backward calls under manual optimization
    "register_ddp_comm_hook",  # what DDPStrategy._register_ddp_hooks calls, aimed at the dense DDP here
    "planner_best_options",  # the sharding options TorchRec's planner chose, with their perf estimates
    "sharded_output_keys",  # the order a sharded EmbeddingBagCollection's pooled output comes in
    "undivided_by_mean_pooling",  # the features a sharded EmbeddingBagCollection's mean-pooling divisor skips
    "tensor_version",  # a tensor's in-place modification counter
    "skip_sigterm_broadcast",  # the fit loop's per-step broadcast of rank 0's SIGTERM flag, off for one run
]


class DenseDDPForwardRedirection(_DDPForwardRedirection):
    """Lightning's DDP forward redirection, aimed at the DDP inside `DistributedModelParallel`.

    Under manual optimization Lightning stops DDP's reducer during the forward and prepares it in
    ``manual_backward`` instead; it only recognises a DDP at the top of the model, and here the top
    is TorchRec's wrapper, so ``dense_ddp`` finds the DDP that holds the dense parameters.
    """

    def __init__(self, dense_ddp: Callable[[], Optional[DistributedDataParallel]]) -> None:
        self._dense_ddp = dense_ddp

    def on_after_inner_forward(self, wrapper_module: nn.Module, original_module: "pl.LightningModule") -> None:
        super().on_after_inner_forward(self._dense_ddp() or wrapper_module, original_module)

    def on_after_outer_forward(self, wrapper_module: nn.Module, original_module: "pl.LightningModule") -> None:
        super().on_after_outer_forward(self._dense_ddp() or wrapper_module, original_module)


def batches_done_in_epoch(trainer: "pl.Trainer") -> int:
    """Batches of the current epoch the fit loop has trained on (as a checkpoint saved now records)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def flush_first_static_graph_iteration(ddp: DistributedDataParallel) -> None:
    """Launch the all-reduce DDP delays in a static graph's first iteration.

    DDP enqueues it from its output hook, which a manual-optimization ``training_step`` (returning
    no tensor) never reaches; Lightning's DDPStrategy calls the same reducer method for its own DDP.
    """
    ddp.reducer._delay_all_reduce()


def planner_best_options(planner: Any) -> Optional[list]:
    """The `ShardingOption`s of the plan TorchRec's planner last found (None where it found none here)."""
    return planner._best_plan


def sharded_output_keys(module: Any) -> list[str]:
    """The keys, in order, of the `KeyedTensor` a sharded `EmbeddingBagCollection` returns (fixed by its plan)."""
    return list(module._embedding_names)


def undivided_by_mean_pooling(module: Any) -> Optional[list[str]]:
    """The features a sharded `EmbeddingBagCollection`'s mean-pooling callback leaves undivided, as
    the list the callback reads (adding to it takes effect); None where the module has no callback.

    TorchRec installs the callback when a mean-pooled table is sharded row-wise (its kernel sums
    partial bags, so the module divides by the bag sizes afterwards); the list holds the features
    of row-wise sum-pooled tables.
    """
    if not module._has_mean_pooling_callback:
        return None
    return module._pooling_type_to_rs_features["SUM"]


def pruned_modules(callback: "pl.callbacks.ModelPruning") -> list[nn.Module]:
    """The modules ``callback`` prunes; its ``setup`` (which runs before the strategy's) resolves them."""
    return [module for module, _ in callback._parameters_to_prune]


def stand_down_child_process_observers() -> None:
    """Stop the threads Lightning's script launcher starts in the launching process, without them killing anything.

    Every 5 seconds such a thread checks the ranks the process started, and once one has exited
    with an error it SIGKILLs them and the launching process, so that none hangs in a collective.
    The launching process calls this when it is failing itself and ends those ranks on its own:
    killed, it could not print its error. With no rank left to watch, a thread's next check ends it.
    """
    for thread in threading.enumerate():
        if isinstance(thread, ChildProcessObserver):
            thread._child_processes = []


def tensor_version(tensor: torch.Tensor) -> int:
    """The count of in-place modifications of ``tensor`` (autograd's version counter)."""
    return tensor._version


def skip_sigterm_broadcast(trainer: "pl.Trainer") -> Callable[[], None]:
    """Stop the fit loop broadcasting rank 0's SIGTERM flag before every training step; returns what undoes it.

    The epoch loop's ``advance`` calls ``_broadcast_sigterm_tensor`` first thing, a blocking
    broadcast on the default group, so that ranks the signal missed learn of it from rank 0.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    epoch_loop._broadcast_sigterm_tensor = lambda: None  # an instance attribute hides the method
    return lambda: vars(epoch_loop).pop("_broadcast_sigterm_tensor", None)


# -- the fit loop's optimization loop (MetaLearningLoop) -------------------------------------------


def swap_automatic_optimization(trainer: "pl.Trainer", loop: AutomaticOptimization) -> AutomaticOptimization:
    """Make ``loop`` the fit loop's automatic optimization, in the state of the one it replaces.

    Returns the replaced loop; swapping it back the same way hands it the state ``loop`` reached
    (progress, which ``global_step`` counts, and restart flags: checkpoints and resume see one loop).
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    replaced = epoch_loop.automatic_optimization
    for name in vars(replaced).keys() & vars(loop).keys():
        setattr(loop, name, getattr(replaced, name))
    epoch_loop.automatic_optimization = loop
    return replaced
