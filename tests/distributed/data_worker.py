"""Trains a small DLRM on the project's data modules with HybridParallelStrategy; run by the resume tests.

    python tests/distributed/data_worker.py --out DIR --data criteo --data-dir D --max-steps 6 --save-at 3

Writes ``DIR/final.full.pt`` (the consolidated final state) and, with ``--save-at K``, a checkpoint
``DIR/step.ckpt`` after step K (mid-epoch when K is).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_dembed import HybridParallelStrategy, consolidate_checkpoint
from lightning_dembed.data import RecDataModule, TaskDataModule
from lightning_dembed.models import DLRMModule


class SaveAt(Callback):
    def __init__(self, out: Path, step: int | None) -> None:
        self.out, self.step = out, step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.out / "step.ckpt")

    def on_fit_end(self, trainer, module) -> None:
        trainer.save_checkpoint(self.out / "final.ckpt")
        if trainer.is_global_zero:
            consolidate_checkpoint(self.out / "final.ckpt", self.out / "final.full.pt")


def data_module(kind: str, data_dir: Path):
    if kind == "synthetic":
        return RecDataModule(source="synthetic", scale=0.0005, global_batch_size=32, train_batches=5,
                             embedding_dim=8, seed=3)
    if kind == "criteo":
        return RecDataModule(source="criteo", criteo_dir=str(data_dir), criteo_num_embeddings=64, embedding_dim=8,
                             global_batch_size=16, train_batches=None, val_batches=1, test_batches=1, seed=3)
    return TaskDataModule(store_dir=str(data_dir / "store"), num_users=300, num_embeddings=256, embedding_dim=8,
                          as_tasks=False, batch_size=32, seed=3)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--data", choices=["synthetic", "criteo", "tasks"], required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--save-at", type=int, default=None)
    p.add_argument("--resume", default=None)
    args = p.parse_args()

    out = Path(args.out)
    seed_everything(0, workers=True)
    data = data_module(args.data, Path(args.data_dir))
    data.prepare_data()
    module = DLRMModule(data.tables(), num_dense_features=data.num_dense_features,
                       dense_arch_layer_sizes=(8,), over_arch_layer_sizes=(8, 1))
    trainer = Trainer(
        strategy=HybridParallelStrategy(start_method="fork"), accelerator="cpu", devices=args.devices,
        max_steps=args.max_steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[SaveAt(out, args.save_at)],
    )
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)


if __name__ == "__main__":
    main()
