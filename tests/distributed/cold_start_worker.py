"""Cold-start validation of `TinyMetaModule` on sharded tables, its held-out tasks split unevenly over ranks.

    python tests/distributed/cold_start_worker.py --out DIR --tasks 5 --rank0-tasks 4

Rank 0 scores the first ``--rank0-tasks`` of ``meta_tasks(0, --tasks)`` and rank 1 the rest, in one
meta-batch each, on tables split table-wise and row-wise. Writes what `trainer.validate` returned
(the scores every rank logged, synchronised) to ``DIR/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).parent))

from tiny import ColdStartTinyModule, meta_tasks, task_batch  # noqa: E402

from lightning_dembed import HybridParallelStrategy  # noqa: E402
from lightning_dembed.meta import ColdStartEvaluation  # noqa: E402


class UnevenTasks(LightningDataModule):
    def __init__(self, tasks: int, rank0_tasks: int) -> None:
        super().__init__()
        self.tasks, self.rank0_tasks = tasks, rank0_tasks

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        tasks = meta_tasks(0, self.tasks)
        mine = tasks[: self.rank0_tasks] if self.trainer.global_rank == 0 else tasks[self.rank0_tasks:]
        return torch.utils.data.DataLoader([task_batch(mine)], batch_size=None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--rank0-tasks", type=int, default=4)
    args = p.parse_args()
    seed_everything(0)
    module = ColdStartTinyModule()
    trainer = Trainer(
        strategy=HybridParallelStrategy(
            start_method="fork", sharding_types={"t_user": "row_wise", "t_item": "table_wise"}
        ),
        accelerator="cpu", devices=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[ColdStartEvaluation(**ColdStartTinyModule.EVALUATION)],
    )
    metrics = trainer.validate(module, datamodule=UnevenTasks(args.tasks, args.rank0_tasks), verbose=False)[0]
    (Path(args.out) / "metrics.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
