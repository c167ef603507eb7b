"""Callbacks the recipes use to report what a sharded run is doing."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["ShardingPlanLogger", "ThroughputAndMemory"]


def _batch_size(batch: Any) -> int:
    labels = getattr(batch, "labels", None)
    if labels is None:
        raise TypeError(f"cannot count the samples of a {type(batch).__name__}: it has no labels")
    return labels.numel()


def _peak_rss_bytes() -> int:
    """This process's peak resident set.

    ``VmHWM`` where Linux has it: ``ru_maxrss`` carries a parent's peak over ``exec``, so every
    rank Lightning starts as a subprocess would report at least the launcher's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class ThroughputAndMemory(Callback):
    """Logs global samples/s (also on the progress bar) and every rank's peak memory.

    Samples are counted on every rank and summed, so the figure is the whole job's. Peak memory is
    the process's peak RSS on CPU, or the peak allocated GPU memory, gathered from all ranks.

    Args:
        window: training steps per measurement.
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._start: float = 0.0
        self._samples = 0
        self._steps = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._steps == 0:
            self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._samples += _batch_size(batch)
        self._steps += 1
        if self._steps < self.window:
            return
        elapsed = time.perf_counter() - self._start
        total = trainer.strategy.reduce(
            torch.tensor(float(self._samples), device=pl_module.device), reduce_op="sum"
        )
        pl_module.log("throughput/samples_per_sec", float(total) / elapsed, prog_bar=True, rank_zero_only=True)
        self._log_memory(trainer, pl_module)
        self._samples = self._steps = 0

    def _log_memory(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device)
        else:
            peak = _peak_rss_bytes()
        peaks = trainer.strategy.all_gather(torch.tensor(float(peak), device=pl_module.device)).reshape(-1)
        for rank, value in enumerate(peaks.tolist()):
            pl_module.log(f"memory/rank{rank}_peak_mib", value / 2**20, rank_zero_only=True)


class ShardingPlanLogger(Callback):
    """Sends the strategy's sharding plan to the loggers: a table in W&B, text elsewhere."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        summary = getattr(trainer.strategy, "plan_summary", None)
        if summary is None or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                logger.log_table(key="sharding_plan", columns=summary.COLUMNS, data=summary.as_rows())
            else:
                logger.log_hyperparams({"sharding_plan": str(summary)})
