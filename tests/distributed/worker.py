"""Trains `TinyRecModule` with HybridParallelStrategy on N gloo processes; run by the distributed tests.

    python tests/distributed/worker.py --out DIR --devices 2 --steps 4 --sharding row_wise

Writes ``DIR/rank{r}.pt`` (that rank's losses) and, with ``--save``, a sharded checkpoint at
``DIR/<save>``; rank 0 also consolidates it to ``DIR/<save>.full.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.callbacks import (
    GradientAccumulationScheduler,
    ModelCheckpoint,
    ModelPruning,
    OnExceptionCheckpoint,
    StochasticWeightAveraging,
)
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.tuner import Tuner

sys.path.insert(0, str(Path(__file__).parent))

from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor  # noqa: E402
from tiny import TABLES, GlobalBatches, SizedGlobalBatches, TinyRecModule  # noqa: E402

from lightning_dembed import HybridParallelStrategy, consolidate_checkpoint, dense_parameters  # noqa: E402


class Data(LightningDataModule):
    def __init__(self, steps: int, global_size: int, seed: int, split: list[int] | None = None) -> None:
        super().__init__()
        self.steps, self.global_size, self.seed, self.split = steps, global_size, seed, split

    bad_id = False
    extra_feature = False
    rank_steps: list[int] | None = None
    sized = False
    weighted = False

    def train_dataloader(self):
        t = self.trainer
        steps = self.rank_steps[t.global_rank] if self.rank_steps else self.steps
        kind = SizedGlobalBatches if self.sized else GlobalBatches
        batches = kind(steps, self.global_size, t.global_rank, t.world_size, self.seed, self.split, self.weighted)
        if self.bad_id:
            batches = [_with_bad_id(b) for b in batches]
        # Applied as each batch is loaded: a list of batches would get a DistributedSampler.
        collate = WithExtraFeature() if self.extra_feature else None
        return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=collate)

    val_dataloader = train_dataloader
    predict_dataloader = train_dataloader


def _with_bad_id(batch):
    kjt = batch.sparse_features
    offset = sum(kjt.length_per_key()[:2])  # first id of f_t2
    kjt.values()[offset] = 10_000
    return batch


class WithExtraFeature:
    """Adds a feature no table consumes, first (as one KJT for several modules); every other batch also
    lists the tables' features in reverse (a sharded module must not keep the first batch's order)."""

    def __init__(self) -> None:
        self.batches = 0

    def __call__(self, batch):
        per_key = batch.sparse_features.to_dict()
        keys = list(per_key)[::-1] if self.batches % 2 else list(per_key)
        self.batches += 1
        rows = batch.sparse_features.stride()
        extra = JaggedTensor(values=torch.arange(rows) + 1000, lengths=torch.ones(rows, dtype=torch.int64))
        batch.sparse_features = KeyedJaggedTensor.from_jt_dict({"f_extra": extra, **{k: per_key[k] for k in keys}})
        return batch


class Dump(Callback):
    """Runs in every rank (under fork the parent never sees the shards): losses, checkpoint, consolidation."""

    def __init__(self, out: Path, save: str | None) -> None:
        self.out, self.save = out, save

    def on_fit_end(self, trainer: Trainer, module: TinyRecModule) -> None:
        plan = [t.__dict__ for t in trainer.strategy.plan_summary.tables]
        used_ahead = {path: lookup.used_ahead for path, lookup in trainer.strategy._pipeline.lookups.items()}
        torch.save({"losses": module.losses, "plan": plan, "used_ahead": used_ahead},
                   self.out / f"rank{trainer.global_rank}.pt")
        if self.save:
            trainer.save_checkpoint(self.out / self.save)
            if trainer.is_global_zero:
                consolidate_checkpoint(self.out / self.save, self.out / f"{self.save}.full.pt")


class BatchNormStatistics(Callback):
    """Each rank's BatchNorm running mean as every training forward starts, and after fit."""

    def __init__(self, out: Path, norm: torch.nn.BatchNorm1d) -> None:
        self.out, self.norm, self.seen = out, norm, []
        norm.register_forward_pre_hook(lambda m, args: self.seen.append(m.running_mean.clone()) if m.training else None)

    def on_fit_end(self, trainer: Trainer, module: TinyRecModule) -> None:
        torch.save({"seen": self.seen, "final": self.norm.running_mean.clone()},
                   self.out / f"batch_norm{trainer.global_rank}.pt")


class SendSignal(Callback):
    """Sends this rank a signal after a batch, as SLURM warns (SIGUSR1) or stops (SIGTERM) each task of a job."""

    def __init__(self, signum: int, after_batch_by_rank: dict[int, int]) -> None:
        self.signum, self.after_batch_by_rank = signum, after_batch_by_rank

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.after_batch_by_rank.get(trainer.global_rank) == batch_idx:
            os.kill(os.getpid(), self.signum)


class SavePredictions(Callback):
    """Rank 0's predictions (Lightning returns none from spawned or forked workers)."""

    def __init__(self, path: Path) -> None:
        self.path, self.outputs = path, []

    def on_predict_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.outputs.append(outputs)

    def on_predict_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            torch.save(torch.cat(self.outputs), self.path)


class DenseWeightsAtValidation(Callback):
    """Each rank's dense weights as validation starts (they must be rank 0's everywhere, as under DDP)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def setup(self, trainer: Trainer, module: TinyRecModule, stage: str) -> None:
        # Before the strategy's setup: ranks start from different dense weights.
        with torch.no_grad():
            for p in module.mlp.parameters():
                p.add_(trainer.global_rank)

    def on_validation_start(self, trainer: Trainer, module: TinyRecModule) -> None:
        weights = {k: v.clone() for k, v in module.mlp.state_dict().items()}
        torch.save(weights, self.out / f"dense{trainer.global_rank}.pt")


class FailBeforeStep(Callback):
    """Raises after a step's backward, before its optimizer step (an error in a hook there)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: Trainer, module: TinyRecModule, optimizer) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"failing before the optimizer step of step {self.step}")


class ManualTinyRecModule(TinyRecModule):
    """The same model stepped by hand (``automatic_optimization = False``)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.backwards_per_step = 1

    def training_step(self, batch, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = self.loss(batch)
        self.losses.append(float(loss))
        if self.backwards_per_step == 2:  # accumulating by hand: refused
            self.manual_backward(loss / 2, retain_graph=True)
            loss = loss / 2
        self.manual_backward(loss)
        optimizer.step()


class DenseClippingTinyRecModule(TinyRecModule):
    """Clips its dense parameters by value in the hook, with no Trainer(gradient_clip_val=...)."""

    dense_clip = 0.0  # set from --dense-clip

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        torch.nn.utils.clip_grad_value_(dense_parameters(self), self.dense_clip)


class OptimizerClippingTinyRecModule(DenseClippingTinyRecModule):
    """Clips all its optimizer holds, tables included (refused)."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        self.clip_gradients(optimizer, gradient_clip_val=self.dense_clip, gradient_clip_algorithm="norm")


class TwoOptimizerTinyRecModule(TinyRecModule):
    """Manual optimization with one optimizer for the MLP and one, with a StepLR, for the tables."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.schedule_before_backward = False
        self.alternate_steps = False  # dense optimizer on even batches, the tables' on odd ones: refused

    def configure_optimizers(self):
        dense = torch.optim.SGD(self.mlp.parameters(), lr=self.hparams.lr)
        tables = torch.optim.SGD(self.ebc.parameters(), lr=4 * self.hparams.lr)
        return [dense, tables], [torch.optim.lr_scheduler.StepLR(tables, step_size=1, gamma=0.5)]

    def training_step(self, batch, batch_idx: int) -> None:
        dense, tables = self.optimizers()
        dense.zero_grad()
        tables.zero_grad()
        loss = self.loss(batch)
        self.losses.append(float(loss))
        if self.schedule_before_backward:  # the tables' lr changes between their forward and backward: refused
            self.lr_schedulers().step()
        self.manual_backward(loss)
        if not self.alternate_steps or batch_idx % 2 == 0:
            dense.step()
        if not self.alternate_steps or batch_idx % 2 == 1:
            tables.step()
        if not self.schedule_before_backward:
            self.lr_schedulers().step()


def install_kill(rank: str, step: str, where: str) -> None:
    """SIGKILL one rank at a step: as it starts the step, or after its shards of that step's save."""
    import os
    import signal

    import torch.distributed as dist

    import lightning_dembed.checkpoint as checkpoint

    def is_victim(global_step: int) -> bool:
        return dist.get_rank() == int(rank) and global_step == int(step)

    if where == "train":
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if is_victim(trainer.global_step):
                os.kill(os.getpid(), signal.SIGKILL)

        Dump.on_train_batch_start = on_train_batch_start
        return
    original, saves = checkpoint.dcp.save, [0]

    def save_then_die(*args, **kwargs):
        result = original(*args, **kwargs)
        saves[0] += 1
        if is_victim(saves[0]):  # the step-th save of this rank
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    checkpoint.dcp.save = save_then_die


def wrap_training_step(module, edit_batch=None, penalty=None) -> None:
    """``module.training_step`` with ``edit_batch(batch)`` run before it and ``penalty()`` added to its loss."""
    step = module.training_step

    def training_step(batch, batch_idx):
        if edit_batch is not None:
            edit_batch(batch)
        loss = step(batch, batch_idx)
        return loss if penalty is None else loss + penalty()

    module.training_step = training_step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="batches per epoch")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--sharding", default=None, help="one sharding type for every table")
    p.add_argument("--policy", default="{}", help="JSON kwargs for HybridParallelStrategy")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--save", default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--start-method", default="fork")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--predict", action="store_true", help="after fit, predict in the launching process")
    p.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    p.add_argument("--manual", action="store_true", help="manual optimization")
    p.add_argument("--two-backwards", action="store_true", help="manual optimization, 2 backwards per step")
    p.add_argument("--two-optimizers", action="store_true", help="manual optimization, tables in a 2nd optimizer")
    p.add_argument("--schedule-before-backward", action="store_true", help="--two-optimizers, LR step before backward")
    p.add_argument("--bad-id", action="store_true", help="feed an id past the end of table t2")
    p.add_argument("--scheduler", default="none", help="an LR schedule of tiny.SCHEDULERS")
    p.add_argument("--groups", action="store_true", help="tables in their own param group, 4x the lr")
    p.add_argument("--clip", type=float, default=None, help="gradient_clip_val")
    p.add_argument("--clip-algorithm", default="value")
    p.add_argument("--split", default=None, help="rows per rank of each global batch, e.g. 3,5")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--skip-nonfinite", action="store_true", help="HybridParallelStrategy(skip_nonfinite_loss=True)")
    p.add_argument("--nan-at", type=int, default=None, help="make the loss NaN at this step")
    p.add_argument("--meta-tables", action="store_true", help="build the tables on the meta device")
    p.add_argument("--checkpoint-dir", default=None, help="ModelCheckpoint every step, top 2 by train_loss, last")
    p.add_argument("--model-summary", action="store_true", help="Lightning's ModelSummary on")
    p.add_argument("--signal-after", default=None,
                   help="RANK:BATCH,...: that rank sends itself --signal after that batch")
    p.add_argument("--signal", default="SIGUSR1", help="SIGUSR1 (SLURM's requeue warning) or SIGTERM (a stop)")
    p.add_argument("--agree-on-signals-every-step", action="store_true",
                   help="the ranks agree on signals at every step (not about once a second): a known stop step")
    p.add_argument("--checkpoint-on-exception", action="store_true", help="OnExceptionCheckpoint into --out")
    p.add_argument("--checkpoint-every-epoch", action="store_true", help="ModelCheckpoint at each epoch end instead")
    p.add_argument("--validate-only", action="store_true", help="trainer.validate, each rank seeded differently")
    p.add_argument("--swa", action="store_true", help="add StochasticWeightAveraging")
    p.add_argument("--accumulate-from-epoch-1", action="store_true", help="GradientAccumulationScheduler({1: 2})")
    p.add_argument("--prune", action="store_true", help="ModelPruning of every weight (tables included)")
    p.add_argument("--dense-clip", type=float, default=None,
                   help="clip the dense parameters by value in configure_gradient_clipping")
    p.add_argument("--clip-optimizer", action="store_true",
                   help="with --dense-clip: clip_gradients on the optimizer, which holds the tables too")
    p.add_argument("--frozen-table", default=None, help="a table with requires_grad=False")
    p.add_argument("--mean-pooling", action="store_true", help="every table mean-pooled")
    p.add_argument("--sequence", action="store_true", help="the tables in an EmbeddingCollection")
    p.add_argument("--lookups", type=int, default=1, help="forwards of the tables per step")
    p.add_argument("--weighted", action="store_true", help="weighted ids (is_weighted tables)")
    p.add_argument("--lr-find", action="store_true", help="Tuner.lr_find (weights restored after) before fit")
    p.add_argument("--fail-before-step", type=int, default=None,
                   help="raise in on_before_optimizer_step at this step, with OnExceptionCheckpoint")
    p.add_argument("--rank-steps", default=None, help="batches per epoch of each rank, e.g. 3,4")
    p.add_argument("--sized", action="store_true", help="the train data has a length (pipelined)")
    p.add_argument("--touch-ids", action="store_true", help="training_step edits the batch's ids in place (+0)")
    p.add_argument("--touch-ids-on-rank", type=int, default=None, help="as --touch-ids, on this rank only")
    p.add_argument("--val-every", type=int, default=None, help="validate 2 batches every N train batches")
    p.add_argument("--trainable-weights", action="store_true", help="--weighted, ids' weights times a parameter")
    p.add_argument("--checkpoint-hooks", action="store_true",
                   help="on_save_checkpoint records the state keys it sees; on_load_checkpoint zeroes mlp.2.bias "
                        "(and with --extra-layer sets the buffer to 3)")
    p.add_argument("--extra-layer", action="store_true", help="a buffer the checkpoints being loaded lack")
    p.add_argument("--alternate-steps", action="store_true", help="--two-optimizers, stepped on alternate batches")
    p.add_argument("--skip-odd-steps", action="store_true", help="optimizer_step runs odd batches' closure, no step")
    p.add_argument("--lr-after-backward", action="store_true", help="on_before_optimizer_step halves the lr")
    p.add_argument("--table-penalty", action="store_true", help="an L2 penalty over self.parameters(), tables too")
    p.add_argument("--second-trainer", action="store_true", help="after fit, validate with a new Trainer")
    p.add_argument("--fit-twice", action="store_true", help="a second fit on the same Trainer, to 2x max steps")
    p.add_argument("--batch-norm", action="store_true", help="a BatchNorm1d after the MLP's first layer")
    p.add_argument("--extra-feature", action="store_true", help="the batches' KJT has a key no table consumes; every other batch's keys reversed")
    p.add_argument("--async-checkpoint-io", action="store_true", help="Trainer(plugins=[AsyncCheckpointIO()])")
    p.add_argument("--kill", default=None, help="RANK:STEP:train|save: SIGKILL that rank at that step")
    args = p.parse_args()
    if args.kill:
        install_kill(*args.kill.split(":"))

    out = Path(args.out)
    policy = json.loads(args.policy)
    if args.sharding:
        policy["sharding_types"] = {name: args.sharding for name, _, _ in TABLES}
    seed_everything(0, workers=True)
    module_class = ManualTinyRecModule if args.manual or args.two_backwards else TinyRecModule
    if args.two_optimizers or args.schedule_before_backward or args.alternate_steps:
        module_class = TwoOptimizerTinyRecModule
    if args.dense_clip is not None:
        module_class = OptimizerClippingTinyRecModule if args.clip_optimizer else DenseClippingTinyRecModule
    module = module_class(optimizer=args.optimizer, lr=args.lr, scheduler=args.scheduler, groups=args.groups,
                          device="meta" if args.meta_tables else "cpu", frozen_table=args.frozen_table,
                          mean_pooling=args.mean_pooling, sequence=args.sequence, lookups=args.lookups,
                          weighted=args.weighted)
    module.nan_at = args.nan_at
    if args.dense_clip is not None:
        module.dense_clip = args.dense_clip
    if args.two_backwards:
        module.backwards_per_step = 2
    if args.schedule_before_backward:
        module.schedule_before_backward = True
    if args.alternate_steps:
        module.alternate_steps = True
    if args.lr_after_backward:
        def on_before_optimizer_step(optimizer):
            for group in optimizer.param_groups:
                group["lr"] /= 2

        module.on_before_optimizer_step = on_before_optimizer_step
    if args.skip_odd_steps:
        def optimizer_step(epoch, batch_idx, optimizer, optimizer_closure):
            if batch_idx % 2:
                optimizer_closure()  # the forward and backward, no step (Lightning's docs' alternating example)
            else:
                optimizer.step(closure=optimizer_closure)

        module.optimizer_step = optimizer_step
    if args.touch_ids or args.touch_ids_on_rank is not None:  # same ids, but edited: the pipeline must not trust them
        def touch_ids(batch):
            if args.touch_ids or module.global_rank == args.touch_ids_on_rank:
                batch.sparse_features.values().add_(0)

        wrap_training_step(module, edit_batch=touch_ids)
    if args.checkpoint_hooks:
        def on_save_checkpoint(checkpoint):
            torch.save(sorted(checkpoint["state_dict"]), out / f"saved_keys{module.global_rank}.pt")

        def on_load_checkpoint(checkpoint):
            checkpoint["state_dict"]["mlp.2.bias"] = torch.zeros(1)
            if args.extra_layer:  # a key the checkpoint lacks, restored by the hook
                checkpoint["state_dict"]["extra"] = torch.full((2,), 3.0)

        module.on_save_checkpoint, module.on_load_checkpoint = on_save_checkpoint, on_load_checkpoint
    if args.extra_layer:
        module.register_buffer("extra", torch.ones(2))
    if args.table_penalty:
        wrap_training_step(module, penalty=lambda: 1e-3 * sum(p.pow(2).sum() for p in module.parameters()))
    if args.trainable_weights:
        module.weight_scale = torch.nn.Parameter(torch.ones(()))

        def scale_weights(batch):
            kjt = batch.sparse_features
            batch.sparse_features = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                                                      weights=kjt.weights() * module.weight_scale)

        wrap_training_step(module, edit_batch=scale_weights)
    if args.skip_nonfinite:
        policy["skip_nonfinite_loss"] = True
    strategy = HybridParallelStrategy(start_method=args.start_method, **policy)
    callbacks = [Dump(out, args.save)]
    if args.batch_norm:
        module.mlp.insert(1, torch.nn.BatchNorm1d(8))
        callbacks.append(BatchNormStatistics(out, module.mlp[1]))
    if args.checkpoint_dir and args.checkpoint_every_epoch:
        callbacks.append(ModelCheckpoint(dirpath=args.checkpoint_dir, save_last=True, save_on_train_epoch_end=True))
    elif args.checkpoint_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.checkpoint_dir, monitor="train_loss", save_top_k=2,
                                         every_n_train_steps=1, save_last=True))
    if args.validate_only:
        callbacks.append(DenseWeightsAtValidation(out))
    if args.swa:
        callbacks.append(StochasticWeightAveraging(swa_lrs=0.01))
    if args.accumulate_from_epoch_1:
        callbacks.append(GradientAccumulationScheduler({1: 2}))
    if args.prune:
        callbacks.append(ModelPruning("l1_unstructured", amount=0.5))
    if args.agree_on_signals_every_step:
        from lightning_dembed.strategies.hybrid_parallel import _SignalsAtStepStart

        _SignalsAtStepStart.seconds_between_agreements = 0.0
    if args.signal_after:
        after_batch_by_rank = dict(map(int, pair.split(":")) for pair in args.signal_after.split(","))
        callbacks.append(SendSignal(getattr(signal, args.signal), after_batch_by_rank))
    if args.fail_before_step is not None:
        callbacks.append(FailBeforeStep(args.fail_before_step))
    if args.fail_before_step is not None or args.checkpoint_on_exception:
        callbacks.append(OnExceptionCheckpoint(str(out), filename="on_exception"))
    trainer = Trainer(
        strategy=strategy,
        accelerator=args.accelerator,
        devices=args.devices,
        max_steps=args.max_steps or args.steps,
        logger=False,
        enable_checkpointing=bool(args.checkpoint_dir) or args.fail_before_step is not None or args.checkpoint_on_exception,
        enable_progress_bar=False,
        enable_model_summary=args.model_summary,
        num_sanity_val_steps=0,
        limit_val_batches=None if args.validate_only else (2 if args.val_every else 0),
        val_check_interval=args.val_every,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip,
        gradient_clip_algorithm=args.clip_algorithm if args.clip else None,
        precision=args.precision,
        callbacks=callbacks,
        plugins=[AsyncCheckpointIO()] if args.async_checkpoint_io else None,
    )
    split = [int(n) for n in args.split.split(",")] if args.split else None
    data = Data(args.steps, args.global_batch, args.data_seed, split)
    data.bad_id = args.bad_id
    data.extra_feature = args.extra_feature
    data.rank_steps = [int(n) for n in args.rank_steps.split(",")] if args.rank_steps else None
    data.sized = args.sized
    data.weighted = args.weighted
    if args.validate_only:
        trainer.validate(module, datamodule=data)
        return
    if args.lr_find:
        Tuner(trainer).lr_find(module, datamodule=data, num_training=args.steps, early_stop_threshold=None,
                               update_attr=False)
        module.losses.clear()
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)
    if args.second_trainer:
        Trainer(strategy=HybridParallelStrategy(start_method=args.start_method), accelerator=args.accelerator,
                devices=args.devices, logger=False).validate(module, datamodule=data)
    if args.fit_twice:
        trainer.fit_loop.epoch_loop.max_steps = 2 * trainer.max_steps
        trainer.fit(module, datamodule=data)
    torch.save({name: p.is_meta for name, p in module.named_parameters()}, out / "launcher_params_meta.pt")
    if args.predict:
        # Under fork the launching process got the trained full tables back; predict shards them again.
        trainer.callbacks.append(SavePredictions(out / "predictions.pt"))
        trainer.predict(module, datamodule=data, return_predictions=False)


if __name__ == "__main__":
    main()
