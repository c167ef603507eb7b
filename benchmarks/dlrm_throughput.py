"""DLRM training samples/s with HybridParallelStrategy, on Merlin's scaled synthetic models.

    python benchmarks/dlrm_throughput.py --model tiny --scale 0.001 --devices 2
    python benchmarks/dlrm_throughput.py --model small --scale 0.001 --devices 1 --accelerator gpu
    python benchmarks/dlrm_throughput.py --model tiny --scale 1.0 --devices 1 --accelerator gpu \
        --global-batch 65536 --device-resident 16

With ``--device-resident N`` each rank generates N batches before training, keeps them on its
device and cycles them (as Merlin's benchmark does), so a GPU's figure measures training, not the
host's data generator.

Runs the DLRM recipe's pieces (RecDataModule + DLRMModule + HybridParallelStrategy) for
``--steps`` steps and times the steady state (after ``--warmup`` steps, all ranks, global
samples). Appends one record to ``benchmarks/results/<date>_<machine>/dlrm_throughput.json``
(``--out``; ``<machine>`` is the GPU's name on GPU) and draws them all in the ``.svg`` beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import lightning
import torch
import torchrec
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from torch.utils.data import DataLoader, Dataset

from lightning_dembed import HybridParallelStrategy
from lightning_dembed.data import RecDataModule
from lightning_dembed.models import DLRMModule

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_name, results_dir, write_json  # noqa: E402


class SteadyStateTimer(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = 0.0
        self.samples = 0
        self.seconds = 0.0

    def _sync(self, trainer: Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        trainer.strategy.barrier()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.warmup:
            self._sync(trainer)
            self.start = time.perf_counter()
        elif batch_idx + 1 > self.warmup:
            self.samples += batch.labels.numel() * trainer.world_size

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(trainer)
        self.seconds = time.perf_counter() - self.start


class Cycle(Dataset):
    """``steps`` items, cycling through ``batches``."""

    def __init__(self, batches: list, steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int):
        return self.batches[index % len(self.batches)]


class DeviceResident(LightningDataModule):
    """The first ``count`` train batches of ``data`` on each rank's device, cycled for ``steps`` steps."""

    def __init__(self, data: RecDataModule, count: int, steps: int) -> None:
        super().__init__()
        self.data, self.count, self.steps = data, count, steps

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str) -> None:
        self.data.trainer = self.trainer
        self.data.setup(stage)
        batches = []
        for batch in self.data.train_dataloader():
            batches.append(move_data_to_device(batch, self.trainer.strategy.root_device))
            if len(batches) == self.count:
                break
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Cycle(self.batches, self.steps), batch_size=None, collate_fn=lambda batch: batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--scale", type=float, default=0.001)
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--global-batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers per rank")
    p.add_argument("--device-resident", type=int, default=None,
                   help="N: pre-generate N batches per rank on its device and cycle them")
    p.add_argument("--no-pipeline", action="store_true", help="HybridParallelStrategy(pipeline=False)")
    p.add_argument("--offload", choices=["uvm", "uvm_caching"], default=None, help="HybridParallelStrategy(offload=...)")
    p.add_argument("--memory-budget", default=None, help="memory_budget_per_rank, e.g. 2GiB")
    p.add_argument("--label", default="", help="free text stored with the record (e.g. the device name)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file the record is appended to; None: benchmarks/results/<date>_<machine>/"
                        "dlrm_throughput.json")
    args = p.parse_args()

    seed_everything(0)
    data = RecDataModule(
        synthetic_model=args.model, scale=args.scale, embedding_dim=args.embedding_dim,
        global_batch_size=args.global_batch, train_batches=args.steps, val_batches=1, test_batches=1,
        num_workers=args.num_workers,
    )
    model = DLRMModule(
        data.tables(), num_dense_features=data.num_dense_features,
        dense_arch_layer_sizes=(64, args.embedding_dim), over_arch_layer_sizes=(128, 64, 1),
    )
    timer = SteadyStateTimer(args.warmup)
    strategy = HybridParallelStrategy(
        pipeline=not args.no_pipeline, offload=args.offload, memory_budget_per_rank=args.memory_budget
    )
    trainer = Trainer(
        strategy=strategy, accelerator=args.accelerator, devices=args.devices, max_steps=args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[timer],
    )
    trainer.fit(model, datamodule=DeviceResident(data, args.device_resident, args.steps)
                if args.device_resident else data)
    if not trainer.is_global_zero:
        return
    gpu = torch.cuda.get_device_name(0) if args.accelerator == "gpu" else None
    record = {
        "benchmark": "dlrm_throughput",
        "date": date.today().isoformat(),
        "model": args.model, "scale": args.scale, "tables": len(data.tables()),
        "table_bytes": sum(t.num_embeddings * t.embedding_dim * 4 for t in data.tables()),
        "embedding_dim": args.embedding_dim, "global_batch": args.global_batch,
        "accelerator": args.accelerator, "devices": args.devices, "num_workers": args.num_workers,
        "device_resident_batches": args.device_resident, "pipeline": not args.no_pipeline,
        "offload": args.offload, "memory_budget": args.memory_budget,
        "device_name": gpu or platform.processor() or "cpu",
        "cpu_count": torch.get_num_threads(),
        "timed_steps": args.steps - args.warmup, "seconds": timer.seconds,
        "samples_per_sec": timer.samples / timer.seconds,
        "versions": {"torch": torch.__version__, "torchrec": torchrec.__version__, "lightning": lightning.__version__},
        "label": args.label,
        "command": "python benchmarks/dlrm_throughput.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
            if v not in ("", None, False)),
    }
    print(json.dumps(record))
    out = args.out or results_dir(machine_name(gpu)) / "dlrm_throughput.json"
    records = json.loads(out.read_text()) if out.exists() else []
    write_json(out, records + [record])
    from plot import write_plot  # after the JSON: a machine without matplotlib still keeps the figure

    print(f"appended to {out}; plot: {write_plot(records + [record], out)}")


if __name__ == "__main__":
    main()
