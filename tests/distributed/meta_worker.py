"""Meta-trains `TinyMetaModule` with MetaLearningLoop + HybridParallelStrategy on N gloo processes.

    python tests/distributed/meta_worker.py --out DIR --algorithm maml --tasks 8 --inner-steps 1

Writes ``DIR/rank{r}.pt`` (losses, collective calls per step), ``DIR/rank{r}.module.json`` (what the
run left on the module and the trainer) and the consolidated final weights ``DIR/final.full.pt`` (rank 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, str(Path(__file__).parent))

from tiny import MetaBatches, TinyMetaModule  # noqa: E402

from lightning_dembed import HybridParallelStrategy, consolidate_checkpoint  # noqa: E402
from lightning_dembed.meta import MetaLearningLoop  # noqa: E402

COLLECTIVES = ("all_to_all_single", "all_to_all", "all_reduce", "all_gather", "all_gather_into_tensor",
               "reduce_scatter_tensor", "reduce_scatter", "broadcast", "gather", "scatter")


class CountCollectives(Callback):
    """Counts torch.distributed calls and DDP bucket all-reduces in each training step."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.per_step: list[dict] = []

    def on_train_start(self, trainer, pl_module) -> None:
        control_group = trainer.strategy._control_group
        for name in COLLECTIVES:
            original = getattr(dist, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                # The strategy's host-side bookkeeping (do all ranks have this batch?) has a group of
                # its own and is not part of the meta-step.
                if kwargs.get("group") is not control_group or control_group is None:
                    self.calls[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        ddp = trainer.strategy.model._dmp_wrapped_module

        def allreduce(state, bucket):
            self.calls["ddp_bucket_all_reduce"] += 1
            return default_hooks.allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, allreduce)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.calls.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.per_step.append(dict(self.calls))


class Dump(Callback):
    def __init__(self, out: Path, counter: CountCollectives) -> None:
        self.out, self.counter = out, counter
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_fit_end(self, trainer, pl_module) -> None:
        used_ahead = {path: lookup.used_ahead for path, lookup in trainer.strategy._pipeline.lookups.items()}
        torch.save({"losses": self.losses, "collectives": self.counter.per_step, "used_ahead": used_ahead},
                   self.out / f"rank{trainer.global_rank}.pt")
        trainer.save_checkpoint(self.out / "final.ckpt")
        if trainer.is_global_zero:
            consolidate_checkpoint(self.out / "final.ckpt", self.out / "final.full.pt")


class LeftBehind(Callback):
    """After MetaLearningLoop's teardown (it comes first): the module's attributes and the fit loop."""

    def __init__(self, out: Path, attributes: set[str]) -> None:
        self.out, self.attributes = out, attributes

    def teardown(self, trainer, pl_module, stage) -> None:
        loop = trainer.fit_loop.epoch_loop.automatic_optimization
        record = {
            "added": sorted(set(vars(pl_module)) - self.attributes),
            "removed": sorted(self.attributes - set(vars(pl_module))),
            "own_steps": all(getattr(pl_module, n).__func__ is getattr(type(pl_module), n)
                             for n in ("training_step", "validation_step", "test_step")),
            "loop": f"{type(loop).__module__}.{type(loop).__qualname__}",
        }
        (self.out / f"rank{trainer.global_rank}.module.json").write_text(json.dumps(record))


class Data(LightningDataModule):
    def __init__(self, steps: int, tasks: int) -> None:
        super().__init__()
        self.steps, self.tasks = steps, tasks

    def train_dataloader(self):
        t = self.trainer
        return torch.utils.data.DataLoader(MetaBatches(self.steps, self.tasks, t.global_rank, t.world_size),
                                           batch_size=None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tasks", type=int, default=8, help="tasks per global meta-batch")
    p.add_argument("--algorithm", default="maml")
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--inner-lr", type=float, default=0.3)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--policy", default='{"sharding_types": {"t_user": "row_wise", "t_item": "table_wise", '
                                       '"t_category": "column_wise"}}')
    args = p.parse_args()
    out = Path(args.out)
    seed_everything(0)
    module = TinyMetaModule(lr=args.lr)
    counter = CountCollectives()
    loop = MetaLearningLoop(algorithm=args.algorithm, inner_steps=args.inner_steps, inner_lr=args.inner_lr,
                            adapt=("over_arch",), adapt_embeddings=("user",))
    attributes = set(vars(module))
    trainer = Trainer(
        strategy=HybridParallelStrategy(start_method="fork", **json.loads(args.policy)),
        accelerator="cpu", devices=args.devices, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[loop, LeftBehind(out, attributes), counter, Dump(out, counter)],
    )
    trainer.fit(module, datamodule=Data(args.steps, args.tasks))


if __name__ == "__main__":
    main()
