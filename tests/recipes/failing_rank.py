"""One rank raises mid-training, for the tests of how a failing rank is reported (test_recipes.py).

As a script, the README's quickstart model on 2 processes with Lightning's script launcher
(``start_method="popen"``, rank 0 being this process) and `FirstFailureScriptLauncher`, rank 0
taking longer to fail than the 5 seconds after which Lightning's child-process observer kills it:

    python failing_rank.py
"""

import os
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_dembed import HybridParallelStrategy
from lightning_dembed.strategies.launcher import ERROR_DIR_VARIABLE, FirstFailureScriptLauncher


class RaiseOnRank(Callback):
    """Raises on ``rank`` at training step ``step``, while the other ranks wait in a collective."""

    def __init__(self, rank: int = 1, step: int = 2) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"rank {self.rank} fails here on purpose, at step {self.step}")


class SlowToFail(Callback):
    """Rank 0's ``on_exception`` takes ``seconds``, as a logger uploading its last records would."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.global_rank == 0:
            time.sleep(self.seconds)


class ScriptLaunched(HybridParallelStrategy):
    """``hybrid_parallel`` with the script launcher that reports the rank that failed first.

    In rank 0, which starts the others, and in the ranks it started (they inherit the variable);
    under torchrun or SLURM, none, as Lightning's own.
    """

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if not self.cluster_environment.creates_processes_externally or ERROR_DIR_VARIABLE in os.environ:
            self._launcher = FirstFailureScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
    from quickstart import ClickModel, batches

    trainer = Trainer(strategy=ScriptLaunched(), accelerator="cpu", devices=2, max_epochs=1, logger=False,
                      enable_checkpointing=False, callbacks=[RaiseOnRank(rank=1, step=2), SlowToFail(seconds=6)])
    trainer.fit(ClickModel(), torch.utils.data.DataLoader(list(batches()), batch_size=None))
