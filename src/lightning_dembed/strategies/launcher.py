"""The spawn/fork launcher of `HybridParallelStrategy`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_dembed._private import MultiProcessingLauncher, WorkerOutput
from lightning_dembed.checkpoint import gather_full_state_dict

__all__ = ["ShardedMultiProcessingLauncher"]


class ShardedMultiProcessingLauncher(MultiProcessingLauncher):
    """Spawn/fork launcher that hands full (gathered) tables back to the launching process.

    Lightning's launcher sends rank 0's ``state_dict()`` to the parent, which for sharded tables
    holds only rank 0's shards; here every rank joins a gather first, so the parent's un-sharded
    module ends up with the trained tables, as it would under DDP. With ``hand_back_weights=False``
    (models larger than one host) nothing is gathered, and the launching process's module is moved
    to the meta device so that its untrained weights cannot be used by mistake.
    """

    def __init__(self, strategy: Any, start_method: str, hand_back_weights: bool) -> None:
        super().__init__(strategy, start_method=start_method)
        self.hand_back_weights = hand_back_weights

    def _collect_rank_zero_results(self, trainer: "pl.Trainer", results: Any) -> Optional[WorkerOutput]:
        if self.hand_back_weights:
            # Marked to load by assignment: the launching process's tables may be on the meta device.
            state = trainer.lightning_module.state_dict()
            full = gather_full_state_dict(state, trainer.is_global_zero, self._strategy.table_state_keys(state))
        output = super()._collect_rank_zero_results(trainer, results)
        if output is None or output.weights_path is None:
            return output
        if not self.hand_back_weights:
            # Lightning wrote rank 0's shards there; the launching process gets no weights at all.
            Path(output.weights_path).unlink()
            return output._replace(weights_path=None)
        self._strategy.checkpoint_io.save_checkpoint(full, output.weights_path)
        return output

    def _recover_results_in_main_process(self, worker_output: WorkerOutput, trainer: "pl.Trainer") -> None:
        super()._recover_results_in_main_process(worker_output, trainer)
        if not self.hand_back_weights and trainer.state.fn == TrainerFn.FITTING:
            # Its weights are the untrained ones: make any use of them fail instead of silently mislead.
            trainer.lightning_module.to("meta")
            rank_zero_warn(
                "hand_back_weights=False: the trained weights stay in the checkpoints; the launching process's "
                "module was moved to the meta device. Load a checkpoint (consolidate_checkpoint) to use it."
            )
