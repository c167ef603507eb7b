"""The launchers of `HybridParallelStrategy`: spawn/fork, and the script launcher (``popen``)."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_dembed._private import (
    MultiProcessingLauncher,
    SubprocessScriptLauncher,
    TunerExitException,
    WorkerOutput,
    stand_down_child_process_observers,
)
from lightning_dembed.checkpoint import gather_full_state_dict

__all__ = ["ERROR_DIR_VARIABLE", "FirstFailureScriptLauncher", "RankFailedFirst", "ShardedMultiProcessingLauncher"]

# Rank 0 names the folder the ranks write their errors to; the ranks it starts inherit the variable.
ERROR_DIR_VARIABLE = "LIGHTNING_DEMBED_RANK_ERRORS"
# How long rank 0, failing, waits for the ranks it started to exit before it reads their errors.
_EXIT_WAIT_S = 2.0


class RankFailedFirst(RuntimeError):
    """Another rank failed before this one; the message is its traceback (this rank's error is the cause)."""


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


class FirstFailureScriptLauncher(SubprocessScriptLauncher):
    """Lightning's script launcher (``start_method="popen"``) whose last words are the rank that failed first.

    Rank 0 is the launching process and the other ranks re-run its script. When rank 1 raises, rank
    0 fails next, in a collective ("Connection closed by peer"), and as the launching process its
    error is the last thing on screen. Here every rank that raises writes its traceback to a file
    in a folder rank 0 creates (``LIGHTNING_DEMBED_RANK_ERRORS``, inherited by the ranks it starts,
    and removed when rank 0 exits: its later fits run on the same ranks and use the same folder),
    as torch elastic's ``@record`` does under ``torchrun``; rank 0, failing, waits a moment for the
    other ranks to exit, ends those that have not, and, if another rank's file was written before
    its own, raises `RankFailedFirst` with that rank's traceback, chained to its own error.
    """

    def launch(self, function: Callable, *args: Any, trainer: Optional["pl.Trainer"] = None, **kwargs: Any) -> Any:
        if not self.cluster_environment.creates_processes_externally and ERROR_DIR_VARIABLE not in os.environ:
            os.environ[ERROR_DIR_VARIABLE] = tempfile.mkdtemp(prefix="lightning-dembed-rank-errors-")
            atexit.register(shutil.rmtree, os.environ[ERROR_DIR_VARIABLE], ignore_errors=True)
        error_dir = os.environ.get(ERROR_DIR_VARIABLE)
        started_ns = time.time_ns()
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        except TunerExitException:  # the LR finder is done; Lightning's caller expects this on every rank
            raise
        except Exception as error:
            if error_dir is None:  # started by another launcher (torchrun, SLURM): it reports failures
                raise
            rank = self.cluster_environment.global_rank()
            with contextlib.suppress(FileNotFoundError):  # the folder is gone once rank 0 exited; no one reads it then
                Path(error_dir, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "traceback": traceback.format_exc()}))
            if self.procs:  # this process started the others
                # Lightning's observer would SIGKILL this process, maybe before its error is printed,
                # once the failure reached a started rank; this process ends those ranks itself.
                stand_down_child_process_observers()
                first = self._first_failure(Path(error_dir), started_ns)
                for proc in self.procs:
                    proc.kill()  # those still there hang in a collective with this process (a no-op on the exited)
                if first is not None and first["rank"] != rank:
                    raise RankFailedFirst(f"rank {first['rank']} failed first; its error:\n{first['traceback']}") from error
            raise

    def _first_failure(self, error_dir: Path, since_ns: int) -> Optional[dict[str, Any]]:
        """The error of the rank whose error file was written first (since ``since_ns``), once the ranks exited."""
        deadline = time.monotonic() + _EXIT_WAIT_S
        while any(proc.poll() is None for proc in self.procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        files = [path for path in error_dir.glob("rank*.json") if path.stat().st_mtime_ns >= since_ns]
        return json.loads(min(files, key=lambda path: path.stat().st_mtime_ns).read_text()) if files else None
