"""The harness of the strategy comparisons: Lightning + `HybridParallelStrategy` against a baseline.

Each question is one script over this harness (`vs_torchrec_loop.py`, `vs_ddp.py`): it describes
its configurations and ratios as a `Comparison` and calls `main`. The harness trains every side on
the same DLRM-like model (``--tables`` tables of ``--rows`` x ``--dim`` and MLPs), the same per-rank
batches, the same sharding plan (`lightning_dembed.sharding.plan_sharding`), the same sharders
(``default_sharders()``) and the same optimizers (fused FBGEMM Adagrad for the tables, Adagrad for
the dense part), on ``--devices`` CPU processes over gloo.

How it measures: every configuration and repetition runs in fresh processes (the script
re-executes itself with ``--worker``), so peaks never mix; repetitions alternate between the
configurations of a part so drift hits them all. Each rank builds its own batches from a seed (the
same tensors for every side), runs the warm-up steps, meets the others at a barrier, starts the
clock, runs the timed steps, meets them again and stops the clock. Samples/s counts the global
batch. A configuration with several sides (``interleave`` > 0) runs them in the same processes
(Lightning's), taking turns of ``interleave`` steps, each turn timed between barriers: on a machine
whose speed drifts (a VM whose CPUs are shared) this is the comparison to trust, as every side sees
the same machine. Peak memory is ``getrusage(RUSAGE_SELF).ru_maxrss`` of each rank at the end of
training (also ``VmHWM``), and the largest child's ``ru_maxrss`` once ``fit`` has returned (that
includes what Lightning's launcher does after training). Lightning runs without logger,
checkpointing, progress bar, model summary, sanity check or validation, and its module logs
nothing. OMP_NUM_THREADS is set to cpus / ranks (Lightning's own rule) for every side unless set.

Adding a baseline loop (the extension point): write a class that, in a rank whose default process
group is initialised, builds its model with `build_model`, plans it with `plan_for` and its
batches with `make_batches`, and has ``plan_rows`` and ``run(steps, watch)`` (`BaselineLoop`;
`TorchRecLoop` is the reference), then list ``Baseline(name, YourLoop, target)`` in the script's
baselines. `baseline_parts` and `baseline_ratios` then time it in its own processes and in turns
with Lightning, and report ``strategy_over_<name>_samples_per_s`` in every form.

Results: ``benchmarks/results/<date>_<machine>/<comparison>.json`` (machine, command, every run of
every rank, per-step times), the tables as ``.md`` and the plot as ``.svg`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.datasets.utils import Batch as TorchRecBatch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    command_line,
    machine_info,
    markdown_table,
    peak_rss_mib,
    results_dir,
    rss_mib,
    vm_hwm_mib,
    write_json,
    write_results,
)

from lightning_dembed import HybridParallelStrategy, dense_parameters  # noqa: E402
from lightning_dembed.sharding import ShardingPolicy, default_sharders, plan_sharding  # noqa: E402
from lightning_dembed.sharding.planner import default_memory_budget  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DENSE_FEATURES = 13  # Criteo's integer features
STRATEGY = "lightning_hybrid"  # the side every comparison is about
LIGHTNING_SIDES = (STRATEGY, "lightning_ddp")


# -- configurations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """One configuration, run in its own processes: which sides, which tables, how many steps.

    ``sides``: one baseline alone (its own loop, no Lightning), or a Lightning side
    (``"lightning_hybrid"`` or ``"lightning_ddp"``) followed by the baselines that take turns with
    it every ``interleave`` steps in the same processes.
    """

    name: str  # "<part>/<what runs>"
    sides: tuple[str, ...]
    tables: int
    rows: int
    dim: int
    warmup: int
    steps: int
    interleave: int = 0

    @property
    def table_gib(self) -> float:
        return self.tables * self.rows * self.dim * 4 / 2**30


# -- model and data (identical for every side) ---------------------------------------------------


def table_configs(cfg: RunConfig) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            name=f"t{i}", num_embeddings=cfg.rows, embedding_dim=cfg.dim, feature_names=[f"f{i}"]
        )
        for i in range(cfg.tables)
    ]


def mlp(sizes: list[int], last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(n_in, n_out))
        if last_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class EmbeddingBagTables(nn.Module):
    """The tables as plain ``nn.EmbeddingBag`` (sum, dense gradients): what DDP replicates."""

    def __init__(self, tables: list[EmbeddingBagConfig]) -> None:
        super().__init__()
        self.features = [t.feature_names[0] for t in tables]
        self.bags = nn.ModuleList(
            # Offsets from a JaggedTensor end with the total length, hence include_last_offset.
            nn.EmbeddingBag(t.num_embeddings, t.embedding_dim, mode="sum", include_last_offset=True)
            for t in tables
        )

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        per_feature = features.to_dict()
        pooled = [
            bag(per_feature[f].values(), per_feature[f].offsets())
            for f, bag in zip(self.features, self.bags, strict=True)
        ]
        return KeyedTensor.from_tensor_list(self.features, pooled)


class DLRMLike(nn.Module):
    """Bottom MLP on dense features, pooled embeddings, concatenation, top MLP -> one logit."""

    def __init__(self, embeddings: nn.Module, tables: int, dim: int) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.bottom = mlp([DENSE_FEATURES, 128, dim], last_activation=True)
        self.top = mlp([dim * (tables + 1), 256, 128, 1], last_activation=False)

    def forward(self, dense: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        # Lookup first: a sharded module returns a lazy result whose all-to-all can overlap the bottom MLP.
        pooled = self.embeddings(features)
        bottom = self.bottom(dense)
        return self.top(torch.cat([bottom, pooled.values()], dim=1)).squeeze(1)


def build_model(cfg: RunConfig, replicated: bool = False) -> DLRMLike:
    """The model; ``replicated``: plain ``nn.EmbeddingBag`` tables for DDP, else TorchRec's on meta."""
    tables = table_configs(cfg)
    if replicated:
        embeddings: nn.Module = EmbeddingBagTables(tables)
    else:
        # Meta device: no process ever holds the full tables, each rank materialises its shards only.
        embeddings = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    return DLRMLike(embeddings, cfg.tables, cfg.dim)


Batch = tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]


def make_batches(cfg: RunConfig, args: argparse.Namespace, rank: int) -> list[Batch]:
    """This rank's batches, from a seed: the same tensors whichever side consumes them."""
    gen = torch.Generator().manual_seed(args.seed * 1_000 + rank)
    batches: list[Batch] = []
    keys = [f"f{i}" for i in range(cfg.tables)]
    for _ in range(cfg.warmup + cfg.steps):
        ids = torch.randint(cfg.rows, (cfg.tables * args.batch_size * args.pooling,), generator=gen)
        lengths = torch.full((cfg.tables * args.batch_size,), args.pooling, dtype=torch.int64)
        dense = torch.rand(args.batch_size, DENSE_FEATURES, generator=gen)
        labels = (torch.rand(args.batch_size, generator=gen) < 0.25).float()
        batches.append((dense, KeyedJaggedTensor(keys=keys, values=ids, lengths=lengths), labels))
    return batches


def sharding_kwargs(cfg: RunConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The strategy's sharding knobs; a baseline turns the same ones into a plan with `plan_for`."""
    if args.sharding is None:
        return {}  # TorchRec's planner decides (deterministic: every side gets the same plan)
    return {"sharding_types": {t.name: args.sharding for t in table_configs(cfg)}}


def plan_for(
    model: nn.Module, cfg: RunConfig, args: argparse.Namespace, world: int
) -> tuple[ShardingPlan, list[list[Any]]]:
    """The strategy's planning function with the strategy's inputs: the plan Lightning's side gets.

    Returns the TorchRec plan and its rows for the report (table, rows, dim, sharding, kernel, ranks, MiB).
    """
    device = torch.device("cpu")
    plan, summary = plan_sharding(
        model,
        ShardingPolicy(**sharding_kwargs(cfg, args)),
        default_sharders(),
        world_size=world,
        local_world_size=world,
        device=device,
        memory_budget=default_memory_budget(device, world),
        optimizer_state_factor=1.0,
        process_group=dist.group.WORLD,
    )
    return plan, summary.as_rows()


# -- timing and per-rank records (shared by every side) ------------------------------------------


class Stopwatch:
    """Barrier-to-barrier timing of groups of steps (one group, or many when sides take turns).

    ``start`` and ``stop`` meet the other ranks at a barrier before reading the clock, so a group
    ends when the slowest rank is done; ``lap`` after each step keeps per-step times for the spread.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.step_seconds: list[float] = []
        self.group_seconds: list[float] = []
        self._start = self._last = 0.0

    def start(self) -> None:
        dist.barrier()
        self._start = self._last = time.perf_counter()

    def lap(self) -> None:
        now = time.perf_counter()
        self.step_seconds.append(now - self._last)
        self._last = now

    def stop(self) -> None:
        dist.barrier()
        self.group_seconds.append(time.perf_counter() - self._start)
        self.seconds += self.group_seconds[-1]

    def metrics(self, batch_size: int, world: int) -> dict[str, Any]:
        steps = len(self.step_seconds)
        return {
            "timed_steps": steps,
            "seconds": self.seconds,
            "global_samples_per_s": steps * batch_size * world / self.seconds,
            "median_step_ms": 1e3 * statistics.median(self.step_seconds),
            "step_ms": [round(1e3 * s, 3) for s in self.step_seconds],
            "group_ms": [round(1e3 * s, 3) for s in self.group_seconds],
        }


def rank_record(
    args: argparse.Namespace,
    watches: dict[str, Stopwatch],
    rank: int,
    world: int,
    rss_after_setup: Optional[float],
    plans: dict[str, Optional[list[list[Any]]]],
) -> dict[str, Any]:
    """One rank's figures; ``plans`` by side, the first side's as ``plan``, the others' as ``plan_<side>``."""
    first, *others = plans
    return {
        "rank": rank,
        "world_size": world,
        "threads": torch.get_num_threads(),
        "sides": {name: w.metrics(args.batch_size, world) for name, w in watches.items()},
        "rss_after_setup_mib": rss_after_setup,
        "peak_rss_mib": peak_rss_mib(),  # ru_maxrss at the end of training
        "vm_hwm_mib": vm_hwm_mib(),
        "plan": plans[first],
        **{f"plan_{side}": plans[side] for side in others},
    }


def write_rank_record(prefix: Path, record: dict[str, Any]) -> None:
    write_json(prefix.with_name(f"{prefix.name}-rank{record['rank']}.json"), record)


# -- baseline loops ------------------------------------------------------------------------------


class BaselineLoop(Protocol):
    """A training loop timed against Lightning: built in a rank whose process group is initialised.

    It builds its own model (`build_model`), plan (`plan_for`) and batches (`make_batches`: its own
    KeyedJaggedTensors, which cache offsets on first use, so sharing them would favour one side).
    """

    plan_rows: list[list[Any]]  # its sharding plan as `plan_for` returns it, to check every side has the same

    def run(self, steps: int, watch: Optional[Stopwatch] = None) -> None:
        """Train the next ``steps`` batches; ``watch.lap()`` after each step when given."""


@dataclass(frozen=True)
class Baseline:
    """A baseline of a comparison: its side's name, how a rank builds it, the strategy's target over it.

    ``build(cfg, args, rank, world)`` returns the `BaselineLoop`; it must be importable by name
    (a module-level class or function) so that spawned ranks can rebuild it.
    """

    name: str
    build: Callable[[RunConfig, argparse.Namespace, int, int], BaselineLoop]
    target: str  # of strategy samples/s over this baseline's, e.g. ">= 0.95"


class TorchRecLoop:
    """DistributedModelParallel + fused Adagrad in backward + Adagrad on the dense rest; no Lightning.

    The loop a TorchRec user writes by hand: `DistributedModelParallel`,
    `apply_optimizer_in_backward`, `KeyedOptimizerWrapper`.
    """

    def __init__(self, cfg: RunConfig, args: argparse.Namespace, rank: int, world: int) -> None:
        model = build_model(cfg)
        # Fused Adagrad on the tables, attached before sharding so the planner picks the fused kernel.
        # lr, eps, weight_decay: torch.optim.Adagrad's, which the strategy takes from configure_optimizers.
        apply_optimizer_in_backward(
            torch.optim.Adagrad,
            list(model.embeddings.parameters()),
            {"lr": args.lr, "eps": 1e-10, "weight_decay": 0.0},
        )
        plan, self.plan_rows = plan_for(model, cfg, args, world)
        self.dmp = DistributedModelParallel(
            model,
            env=ShardingEnv.from_process_group(dist.group.WORLD),
            device=torch.device("cpu"),
            plan=plan,
            sharders=default_sharders(),
        )
        self.optimizer = KeyedOptimizerWrapper(
            dict(in_backward_optimizer_filter(self.dmp.named_parameters())),
            lambda params: torch.optim.Adagrad(params, lr=args.lr),
        )
        self.batches = make_batches(cfg, args, rank)
        self.next_batch = 0

    def run(self, steps: int, watch: Optional[Stopwatch] = None) -> None:
        for _ in range(steps):
            dense, features, labels = self.batches[self.next_batch]
            self.next_batch += 1
            loss = F.binary_cross_entropy_with_logits(self.dmp(dense, features), labels)
            self.optimizer.zero_grad()
            loss.backward()  # the tables are updated in here, by FBGEMM
            self.optimizer.step()
            if watch is not None:
                watch.lap()


class _LossModel(nn.Module):
    """``DLRMLike`` with the loss inside: the ``model(batch) -> (loss, output)`` TorchRec's pipelines train."""

    def __init__(self, model: DLRMLike) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: TorchRecBatch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(batch.dense_features, batch.sparse_features)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, logits.detach()


class TorchRecPipelineLoop:
    """TorchRec's own `TrainPipelineSparseDist` over the same sharded model, optimizers and batches.

    What a TorchRec user runs in production: the next batch's input all-to-alls overlap the current
    batch's forward and backward (the pipeline finds the embedding modules' inputs by tracing).
    """

    def __init__(self, cfg: RunConfig, args: argparse.Namespace, rank: int, world: int) -> None:
        model = _LossModel(build_model(cfg))
        apply_optimizer_in_backward(
            torch.optim.Adagrad,
            list(model.model.embeddings.parameters()),
            {"lr": args.lr, "eps": 1e-10, "weight_decay": 0.0},
        )
        plan, self.plan_rows = plan_for(model, cfg, args, world)
        dmp = DistributedModelParallel(
            model,
            env=ShardingEnv.from_process_group(dist.group.WORLD),
            device=torch.device("cpu"),
            plan=plan,
            sharders=default_sharders(),
        )
        optimizer = KeyedOptimizerWrapper(
            dict(in_backward_optimizer_filter(dmp.named_parameters())),
            lambda params: torch.optim.Adagrad(params, lr=args.lr),
        )
        self.pipeline = TrainPipelineSparseDist(dmp, optimizer, torch.device("cpu"))
        self.batches = iter([TorchRecBatch(dense, features, labels) for dense, features, labels
                             in make_batches(cfg, args, rank)])  # fmt: skip

    def run(self, steps: int, watch: Optional[Stopwatch] = None) -> None:
        for _ in range(steps):
            self.pipeline.progress(self.batches)
            if watch is not None:
                watch.lap()


def baseline_rank(
    rank: int, cfg: RunConfig, baseline: Baseline, args: argparse.Namespace, prefix: Path, port: int
) -> None:
    world = args.devices
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loop = baseline.build(cfg, args, rank, world)
    rss_after_setup = rss_mib()
    watch = Stopwatch()
    loop.run(cfg.warmup)
    watch.start()
    loop.run(cfg.steps, watch)
    watch.stop()
    record = rank_record(
        args, {baseline.name: watch}, rank, world, rss_after_setup, {baseline.name: loop.plan_rows}
    )
    write_rank_record(prefix, record)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_baseline(cfg: RunConfig, baseline: Baseline, args: argparse.Namespace, prefix: Path) -> None:
    # Same process model as the Lightning side: forked (or spawned) children of this process.
    start_method = "fork" if args.start_method == "fork" else "spawn"
    torch.multiprocessing.start_processes(
        baseline_rank,
        args=(cfg, baseline, args, prefix, free_port()),
        nprocs=args.devices,
        start_method=start_method,
    )


# -- Lightning -----------------------------------------------------------------------------------


class LitDLRM(LightningModule):
    def __init__(self, model: DLRMLike, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        dense, features, labels = batch
        # No self.log: the baseline loops do not sync or store metrics either.
        return F.binary_cross_entropy_with_logits(self.model(dense, features), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # As examples/quickstart.py writes it: HybridParallelStrategy turns this into FBGEMM's fused
        # Adagrad for the tables; this one gets only the dense rest.
        return torch.optim.Adagrad(dense_parameters(self), lr=self.lr)


class RankBatches(LightningDataModule):
    """Each rank's batches are built in that rank, after launch (the rank is known only then)."""

    def __init__(self, cfg: RunConfig, args: argparse.Namespace) -> None:
        super().__init__()
        self.cfg, self.args = cfg, args

    def train_dataloader(self) -> DataLoader:
        batches = make_batches(self.cfg, self.args, self.trainer.global_rank)
        return DataLoader(batches, batch_size=None)  # type: ignore[arg-type]


class Recorder(Callback):
    """Times Lightning's steps after the warm-up; with baselines, runs them in turns in between.

    With baselines: after every ``cfg.interleave`` timed Lightning steps the Lightning clock stops,
    each baseline (its own sharded model and batches, in the same processes) runs as many timed
    steps on its own clock, and the Lightning clock starts again. Every side then sees the same
    machine at the same moments.
    """

    def __init__(
        self, cfg: RunConfig, args: argparse.Namespace, prefix: Path, baselines: list[Baseline]
    ) -> None:
        self.cfg, self.args, self.prefix, self.baselines = cfg, args, prefix, baselines
        self.watch = Stopwatch()
        self.loops: dict[str, BaselineLoop] = {}
        self.loop_watches = {b.name: Stopwatch() for b in baselines}
        self.rss_after_setup: Optional[float] = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.loops = {b.name: b.build(self.cfg, self.args, trainer.global_rank, trainer.world_size)
                      for b in self.baselines}  # fmt: skip
        self.rss_after_setup = rss_mib()

    def _baselines_turn(self, steps: int, timed: bool) -> None:
        with torch.enable_grad():
            for name, loop in self.loops.items():
                if timed:
                    self.loop_watches[name].start()
                loop.run(steps, self.loop_watches[name] if timed else None)
                if timed:
                    self.loop_watches[name].stop()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        completed, warmup = batch_idx + 1, self.cfg.warmup
        if completed == warmup:
            self._baselines_turn(warmup, timed=False)
            self.watch.start()
            return
        if completed < warmup:
            return
        self.watch.lap()
        last = completed == warmup + self.cfg.steps
        if self.loops and (completed - warmup) % self.cfg.interleave == 0:
            self.watch.stop()
            self._baselines_turn(self.cfg.interleave, timed=True)
            if not last:
                self.watch.start()
        elif last:
            self.watch.stop()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        summary = getattr(trainer.strategy, "plan_summary", None)
        side = self.cfg.sides[0]
        plans = {side: summary.as_rows() if summary is not None else None}
        plans |= {name: loop.plan_rows for name, loop in self.loops.items()}
        record = rank_record(
            self.args,
            {side: self.watch} | self.loop_watches,
            trainer.global_rank,
            trainer.world_size,
            self.rss_after_setup,
            plans,
        )
        write_rank_record(self.prefix, record)


def run_lightning(cfg: RunConfig, args: argparse.Namespace, prefix: Path, baselines: list[Baseline]) -> None:
    ddp = cfg.sides[0] == "lightning_ddp"
    module = LitDLRM(build_model(cfg, replicated=ddp), lr=args.lr)
    if ddp:
        strategy: DDPStrategy = DDPStrategy(start_method=args.start_method)
    else:
        strategy = HybridParallelStrategy(start_method=args.start_method, **sharding_kwargs(cfg, args))
    trainer = Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.devices,
        max_steps=cfg.warmup + cfg.steps,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,  # each rank already has its own batches
        callbacks=[Recorder(cfg, args, prefix, baselines)],
    )
    trainer.fit(module, datamodule=RankBatches(cfg, args))


# -- a question: its configurations and ratios ---------------------------------------------------


class Ratio(NamedTuple):
    """numerator / denominator of one metric, as a JSON key of the summary's ratios.

    ``metric``: ``"global_samples_per_s"`` (rank 0's record of each side), ``"peak_rss_mib"`` (the
    largest rank's, of the processes: sides are ignored) or ``"paired_turns"`` (in a configuration
    whose sides take turns: the median over turns of den turn time / num turn time).
    """

    name: str
    num_config: str
    num_side: str
    den_config: str
    den_side: str
    metric: str
    target: str


@dataclass(frozen=True)
class Comparison:
    """One question: the configurations that answer it, per part, and the ratios reported.

    ``parts(args)``: per part, the configurations run once per repetition in that order.
    ``add_arguments(parser)``: the question's own options, and its defaults for the shared ones
    (``--tables``, ``--rows``, ``--dim``, ``--warmup``, ``--steps``).
    """

    name: str  # the results file's name and its "benchmark" field
    title: str
    parts: Callable[[argparse.Namespace], dict[str, tuple[RunConfig, ...]]]
    ratios: tuple[Ratio, ...]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    baselines: tuple[Baseline, ...] = ()


def baseline_parts(
    args: argparse.Namespace, baselines: tuple[Baseline, ...]
) -> dict[str, tuple[RunConfig, ...]]:
    """Lightning + strategy against each baseline: each in separate processes, and all taking turns."""
    sizes = dict(tables=args.tables, rows=args.rows, dim=args.dim, warmup=args.warmup, steps=args.steps)
    names = tuple(b.name for b in baselines)
    return {
        "separate": (
            RunConfig(f"separate/{STRATEGY}", (STRATEGY,), **sizes),
            *(RunConfig(f"separate/{name}", (name,), **sizes) for name in names),
        ),
        "interleaved": (
            RunConfig("interleaved/all", (STRATEGY, *names), **sizes, interleave=args.interleave),
        ),
    }


def baseline_ratios(baselines: tuple[Baseline, ...]) -> tuple[Ratio, ...]:
    """``strategy_over_<baseline>_samples_per_s`` of `baseline_parts`, in its three forms, per baseline."""
    ratios = []
    for b in baselines:
        key = f"strategy_over_{b.name}_samples_per_s"
        ratios += [
            Ratio(f"{key} (separate processes)", f"separate/{STRATEGY}", STRATEGY,
                  f"separate/{b.name}", b.name, "global_samples_per_s", b.target),
            Ratio(f"{key} (interleaved, same processes)", "interleaved/all", STRATEGY,
                  "interleaved/all", b.name, "global_samples_per_s", b.target),
            Ratio(f"{key} (interleaved, median of paired turns)", "interleaved/all", STRATEGY,
                  "interleaved/all", b.name, "paired_turns", b.target),
        ]  # fmt: skip
    return tuple(ratios)


def all_configs(comparison: Comparison, args: argparse.Namespace) -> dict[str, RunConfig]:
    return {c.name: c for configs in comparison.parts(args).values() for c in configs}


# -- worker: one configuration in fresh processes ------------------------------------------------


def worker(comparison: Comparison, args: argparse.Namespace) -> None:
    cfg = all_configs(comparison, args)[args.worker]
    prefix = Path(args.scratch) / args.run_id
    baselines = {b.name: b for b in comparison.baselines}
    if cfg.sides[0] in LIGHTNING_SIDES:
        if len(cfg.sides) > 1 and (cfg.interleave <= 0 or cfg.steps % cfg.interleave):
            raise ValueError(f"{cfg.name}: --interleave ({cfg.interleave}) must divide --steps ({cfg.steps})")
        run_lightning(cfg, args, prefix, [baselines[name] for name in cfg.sides[1:]])
    else:
        (side,) = cfg.sides
        run_baseline(cfg, baselines[side], args, prefix)
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return  # popen: rank 1+ run this script too; only the launching process writes the summary
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    write_json(
        prefix.with_name(f"{prefix.name}-launcher.json"),
        {
            # The launching process itself (rank 0 under popen) and the largest finished child (a forked
            # rank), both after fit returned: includes whatever the launcher does after training.
            "self_peak_rss_mib_after_fit": peak_rss_mib(),
            "children_max_peak_rss_mib_after_fit": children,
        },
    )


# -- orchestrator --------------------------------------------------------------------------------


def launch(name: str, rep: int, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Run one configuration once, in fresh processes (this script again); collect what every rank wrote."""
    run_id = f"{name.replace('/', '-')}-{rep}"
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.devices)))
    # The orchestrator imports torch too, but stays below any rank's RSS, so the children's ru_maxrss
    # (which Linux carries over exec from the parent) is theirs; VmHWM is recorded as a cross-check.
    worker_args = ["--worker", name, "--run-id", run_id, "--scratch", str(scratch)]
    cmd = [sys.executable, str(Path(sys.argv[0]).resolve()), *sys.argv[1:], *worker_args]
    log = scratch / f"{run_id}.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        try:
            proc = subprocess.run(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=args.timeout, cwd=REPO
            )
            rc: Optional[int] = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.perf_counter() - started
    ranks = [json.loads(p.read_text()) for p in sorted(scratch.glob(f"{run_id}-rank*.json"))]
    launcher_file = scratch / f"{run_id}-launcher.json"
    result: dict[str, Any] = {
        "config": name,
        "repeat": rep,
        "returncode": rc,
        "wall_s": round(wall, 1),
        "omp_num_threads": env["OMP_NUM_THREADS"],
        "ranks": sorted(ranks, key=lambda r: r["rank"]),
        "launcher": json.loads(launcher_file.read_text()) if launcher_file.exists() else None,
    }
    if rc != 0 or len(ranks) != args.devices:
        result["log_tail"] = log.read_text()[-4000:]
    return result


def side_metric(runs: list[dict[str, Any]], config: str, side: str, key: str) -> list[float]:
    """``key`` of one side, rank 0's record, one value per repetition of ``config``."""
    return [
        run["ranks"][0]["sides"][side][key]
        for run in runs
        if run["config"] == config and run["ranks"] and side in run["ranks"][0]["sides"]
    ]


def largest_rank_peaks(runs: list[dict[str, Any]], config: str) -> list[float]:
    """Per repetition of ``config``, the largest of the ranks' peak RSS at the end of training (MiB)."""
    return [
        max(r["peak_rss_mib"] for r in run["ranks"])
        for run in runs
        if run["config"] == config and run["ranks"]
    ]


def paired_turn_ratios(runs: list[dict[str, Any]], config: str, num_side: str, den_side: str) -> list[float]:
    """Per repetition of ``config``, the median over turns of (den turn time / num turn time).

    The i-th turns of the two sides ran in the same round (same number of steps), so their ratio
    sees one state of the machine; the median discards turns that a change of machine speed split
    unevenly.
    """
    ratios = []
    for run in runs:
        if run["config"] == config and run["ranks"]:
            sides = run["ranks"][0]["sides"]
            num_ms, den_ms = sides[num_side]["group_ms"], sides[den_side]["group_ms"]
            ratios.append(statistics.median(d / n for n, d in zip(num_ms, den_ms, strict=True)))
    return ratios


def ratio_values(runs: list[dict[str, Any]], r: Ratio) -> dict[str, Any]:
    """Ratios per repetition (i-th with i-th) and overall: ratio of the means (paired turns: their mean)."""
    if r.metric == "paired_turns":
        turns = paired_turn_ratios(runs, r.num_config, r.num_side, r.den_side)
        return {"per_repeat": turns, "of_means": statistics.fmean(turns) if turns else None}
    if r.metric == "peak_rss_mib":
        num, den = largest_rank_peaks(runs, r.num_config), largest_rank_peaks(runs, r.den_config)
    else:
        num = side_metric(runs, r.num_config, r.num_side, r.metric)
        den = side_metric(runs, r.den_config, r.den_side, r.metric)
    per_repeat = [x / y for x, y in zip(num, den, strict=False)]
    of_means = statistics.fmean(num) / statistics.fmean(den) if num and den else None
    return {"per_repeat": per_repeat, "of_means": of_means}


def summarize(runs: list[dict[str, Any]], ratios: tuple[Ratio, ...]) -> dict[str, Any]:
    sides: list[dict[str, Any]] = []
    for config in dict.fromkeys(run["config"] for run in runs):
        names = dict.fromkeys(s for run in runs if run["config"] == config and run["ranks"]
                              for s in run["ranks"][0]["sides"])  # fmt: skip
        for side in names:
            sps = side_metric(runs, config, side, "global_samples_per_s")
            sides.append({
                "config": config,
                "side": side,
                "samples_per_s": sps,
                "mean_samples_per_s": statistics.fmean(sps) if sps else None,
                "median_step_ms": side_metric(runs, config, side, "median_step_ms"),
                "largest_rank_peak_rss_mib": largest_rank_peaks(runs, config),
            })  # fmt: skip
    values = {r.name: ratio_values(runs, r) | {"target": r.target} for r in ratios}
    return {"sides": sides, "ratios": {name: v for name, v in values.items() if v["per_repeat"]}}


def run_rows(run: dict[str, Any]) -> list[list[Any]]:
    """Markdown rows of one run: one per side; memory figures only on the first (they are the processes')."""
    if not run["ranks"]:
        return [[run["config"], "FAILED", run["repeat"], None, None, None, None, None, None, run["wall_s"]]]
    ranks = run["ranks"]
    processes = [
        " / ".join(f"{r['peak_rss_mib']:,.0f}" for r in ranks),
        " / ".join(f"{r['rss_after_setup_mib']:,.0f}" for r in ranks),
        (run["launcher"] or {}).get("children_max_peak_rss_mib_after_fit"),
        run["wall_s"],
    ]
    rows = []
    for i, (side, m) in enumerate(ranks[0]["sides"].items()):
        figures = [m["timed_steps"], m["global_samples_per_s"], m["median_step_ms"]]
        rows.append([run["config"], side, run["repeat"], *figures, *(processes if i == 0 else [None] * 4)])
    return rows


RUN_COLUMNS = [
    "configuration", "side", "rep", "timed steps", "samples/s", "median step ms", "peak RSS MiB (per rank)",
    "RSS after setup MiB", "largest rank peak after fit MiB", "wall s",
]  # fmt: skip


def markdown(record: dict[str, Any]) -> str:
    summary, runs, args, machine = record["summary"], record["runs"], record["args"], record["machine"]
    versions = machine["versions"]
    threads = runs[0]["omp_num_threads"] if runs else "?"
    turns = [
        n for n, c in record["configs"].items() if c["interleave"] and any(r["config"] == n for r in runs)
    ]
    lines = [
        f"# {record['title']}",
        "",
        f"Command: `{record['command']}`",
        "",
        (
            f"Machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), {machine['ram_gib']} GiB RAM; "
            f"{args['devices']} gloo ranks, OMP_NUM_THREADS={threads}; torch {versions.get('torch')}, "
            f"torchrec {versions.get('torchrec')}, fbgemm-gpu-cpu {versions.get('fbgemm-gpu-cpu')}, "
            f"lightning {versions.get('lightning')}; {machine['date']}."
        ),
        "",
        (
            f"Batch {args['batch_size']} per rank, {args['pooling']} id per feature, "
            f"Adagrad (lr {args['lr']}); samples/s are global (all ranks), steady state (rank 0's clock "
            "between barriers, after the warm-up). Peak RSS: `ru_maxrss` of each rank at the end of "
            "training; the column after it is the largest rank's `ru_maxrss` once `fit` returned, which "
            f"includes what the launcher does after training (start method `{args['start_method']}`)."
            + "".join(
                f" `{n}` runs its sides in the same processes, taking turns every "
                f"{record['configs'][n]['interleave']} steps, so they all see the same machine."
                for n in turns
            )
        ),
        "",
        markdown_table(RUN_COLUMNS, [row for run in runs for row in run_rows(run)]),
        "",
        (
            "Ratios (overall: ratio of the means over repetitions; for paired turns, the mean of the "
            "per-repetition medians):"
        ),
        "",
        markdown_table(
            ["ratio", "per repetition", "overall", "target"],
            [
                [name, ", ".join(f"{v:.3f}" for v in r["per_repeat"]), f"{r['of_means']:.3f}", r["target"]]
                for name, r in summary["ratios"].items()
            ],
        ),
        "",
        "Tables:",
        "",
        markdown_table(
            ["configuration", "tables", "rows", "dim", "GiB fp32", "warm-up steps", "timed steps"],
            [
                [n, c["tables"], c["rows"], c["dim"], c["table_gib"], c["warmup"], c["steps"]]
                for n, c in record["configs"].items()
                if any(run["config"] == n for run in runs)
            ],
        ),
    ]
    plans: dict[str, Any] = {}
    for run in runs:
        if run["ranks"] and run["ranks"][0]["plan"]:
            plans.setdefault(run["config"].split("/")[0], run["ranks"][0]["plan"])
    for part, plan in plans.items():
        same = record["same_plan_per_part"].get(part)
        lines += [
            "",
            f"Sharding plan ({part}; the same in every run, on every rank and side: {same}):",
            "",
            markdown_table(["table", "rows", "dim", "sharding", "kernel", "ranks", "MiB"], plan),
        ]
    return "\n".join(lines) + "\n"


def same_plan_per_part(runs: list[dict[str, Any]]) -> dict[str, bool]:
    """Whether every rank of every run of a part (every side) trained with the same sharding plan."""
    plans: dict[str, set[str]] = {}
    for run in runs:
        for r in run["ranks"]:
            for key, plan in r.items():
                if key.startswith("plan") and plan:
                    plans.setdefault(run["config"].split("/")[0], set()).add(json.dumps(plan))
    return {part: len(p) == 1 for part, p in plans.items()}


def orchestrate(comparison: Comparison, args: argparse.Namespace) -> None:
    parts = comparison.parts(args)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix=f"{comparison.name}-") as tmp:
        scratch = Path(tmp)
        for part in args.parts or list(parts):
            for rep in range(args.repeats):
                for cfg in parts[part]:
                    run = launch(cfg.name, rep, args, scratch)
                    r0 = run["ranks"][0] if run["ranks"] else {"sides": {}}
                    figures = ", ".join(
                        f"{side} {m['global_samples_per_s']:,.0f} samples/s"
                        for side, m in r0["sides"].items()
                    )
                    print(
                        f"{cfg.name} rep {rep}: rc={run['returncode']} {figures}; peak RSS "
                        f"{[round(r['peak_rss_mib']) for r in run['ranks']]} MiB; wall {run['wall_s']} s",
                        flush=True,
                    )
                    if "log_tail" in run:
                        print(run["log_tail"], file=sys.stderr)
                    runs.append(run)
    record = {
        "benchmark": comparison.name,
        "title": comparison.title,
        "command": command_line(),
        "machine": machine_info(REPO),
        "args": vars(args),
        "configs": {c.name: asdict(c) | {"table_gib": c.table_gib} for cs in parts.values() for c in cs},
        "same_plan_per_part": same_plan_per_part(runs),
        "orchestrator_peak_rss_mib": peak_rss_mib(),
        "runs": runs,
        "summary": summarize(runs, comparison.ratios),
    }
    write_results(Path(args.out) if args.out else results_dir() / f"{comparison.name}.json", record, markdown)


def parse_args(comparison: Comparison, argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=comparison.title, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--parts", nargs="+", default=None, help="parts to run; None: every part")
    p.add_argument("--devices", type=int, default=2, help="gloo ranks")
    p.add_argument("--batch-size", type=int, default=2048, help="samples per rank per step")
    p.add_argument("--pooling", type=int, default=1, help="ids per feature per sample")
    p.add_argument("--lr", type=float, default=0.01, help="Adagrad learning rate (tables and dense)")
    p.add_argument("--seed", type=int, default=0, help="data seed (each rank adds its rank)")
    p.add_argument("--repeats", type=int, default=2, help="runs of every configuration (fresh processes)")
    p.add_argument(
        "--start-method",
        choices=["fork", "spawn", "popen"],
        default="fork",
        help="Lightning's launcher (a baseline forks, or spawns for spawn/popen)",
    )
    p.add_argument(
        "--sharding", default=None, help="one sharding type for every table; None: TorchRec's planner decides"
    )
    p.add_argument("--tables", type=int, help="tables")
    p.add_argument("--rows", type=int, help="rows per table")
    p.add_argument("--dim", type=int, help="embedding dim")
    p.add_argument("--warmup", type=int, help="untimed steps")
    p.add_argument("--steps", type=int, help="timed steps")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run before it is killed")
    p.add_argument(
        "--out",
        default=None,
        help="JSON path, the .md and .svg next to it; None: "
        f"benchmarks/results/<date>_<machine>/{comparison.name}.json",
    )
    # Internal: set by the orchestrator when it re-executes this script for one configuration.
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    comparison.add_arguments(p)
    args = p.parse_args(argv)
    unknown = set(args.parts or ()) - set(comparison.parts(args))
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; this comparison has {list(comparison.parts(args))}")
    return args


def main(comparison: Comparison) -> None:
    """Run ``comparison`` from the command line: every part and repetition, then write the results."""
    args = parse_args(comparison)
    if args.worker:
        worker(comparison, args)
    else:
        orchestrate(comparison, args)
