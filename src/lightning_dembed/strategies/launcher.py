"""The spawn/fork launcher of `HybridParallelStrategy`."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl

from lightning_dembed._private import MultiProcessingLauncher, WorkerOutput
from lightning_dembed.checkpoint import gather_full_state_dict

__all__ = ["ShardedMultiProcessingLauncher"]


class ShardedMultiProcessingLauncher(MultiProcessingLauncher):
    """Spawn/fork launcher that hands full (gathered) tables back to the launching process.

    Lightning's launcher sends rank 0's ``state_dict()`` to the parent, which for sharded tables
    holds only rank 0's shards; here every rank joins a gather first, so the parent's un-sharded
    module ends up with the trained tables, as it would under DDP.
    """

    def _collect_rank_zero_results(self, trainer: "pl.Trainer", results: Any) -> Optional[WorkerOutput]:
        # Marked to load by assignment: the launching process's tables may be on the meta device.
        full = gather_full_state_dict(
            trainer.lightning_module.state_dict(), trainer.is_global_zero, self._strategy.table_state_keys()
        )
        output = super()._collect_rank_zero_results(trainer, results)
        if output is not None and output.weights_path is not None:
            self._strategy.checkpoint_io.save_checkpoint(full, output.weights_path)
        return output
