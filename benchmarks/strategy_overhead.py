"""What `HybridParallelStrategy` costs and saves, on N CPU processes over gloo.

    python benchmarks/strategy_overhead.py                 # all parts, the defaults below (~13 min, 2 CPUs)
    python benchmarks/strategy_overhead.py --parts interleaved --overhead-steps 50 --repeats 1   # quick look

Part "overhead": the same DLRM-like model (``--overhead-tables`` tables of ``--overhead-rows`` x
``--overhead-dim`` on the meta device + MLPs), the same per-rank batches, the same sharding plan
(`lightning_dembed.sharding.plan_sharding`), the same sharders (``default_sharders()``) and the
same optimizers (fused FBGEMM Adagrad for the tables, Adagrad for the dense part) trained
  a) by Lightning with ``HybridParallelStrategy``, and
  b) by a hand-written TorchRec loop: `DistributedModelParallel`, `apply_optimizer_in_backward`,
     `KeyedOptimizerWrapper`, no Lightning,
each in its own fresh processes. Reported: global samples/s of both and their ratio (target >= 0.95).

Part "interleaved": the same two sides in the same processes (Lightning's), taking turns of
``--interleave`` steps, each side timed between barriers. On a machine whose speed drifts (a VM
whose CPUs are shared) this is the comparison to trust: both sides see the same machine.

Part "memory": ``--memory-tables`` tables of ``--memory-rows`` x ``--memory-dim`` (default 1 GiB of
fp32) trained by Lightning
  a) with ``HybridParallelStrategy`` (tables built on the meta device, sharded, fused Adagrad), and
  b) with Lightning's ``DDPStrategy``: the same tables as plain ``nn.EmbeddingBag`` (dense
     gradients) replicated on every rank, Adagrad.
Reported: global samples/s and every rank's peak RSS, and the ratios (targets: >= 5x samples/s,
<= 0.6x peak memory).

How it measures: every configuration and repetition runs in fresh processes (this script
re-executes itself with ``--worker``), so peaks never mix; repetitions alternate between the two
sides of a comparison so drift hits both. Each rank builds its own batches from a seed (the same
tensors for both sides), runs the warm-up steps, meets the others at a barrier, starts the clock,
runs the timed steps, meets them again and stops the clock. Samples/s counts the global batch.
Peak memory is ``getrusage(RUSAGE_SELF).ru_maxrss`` of each rank at the end of training (also
``VmHWM``), and the largest child's ``ru_maxrss`` once ``fit`` has returned (that includes what
Lightning's launcher does after training). Lightning runs without logger, checkpointing, progress
bar, model summary, sanity check or validation, and its module logs nothing. OMP_NUM_THREADS is
set to cpus / ranks (Lightning's own rule) for both sides unless already set.

Writes ``benchmarks/results/strategy_overhead.json`` (machine, command, every run of every rank,
per-step times) and ``benchmarks/results/strategy_overhead.md`` (the tables).
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
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    command_line,
    machine_info,
    markdown_table,
    peak_rss_mib,
    rss_mib,
    vm_hwm_mib,
    write_json,
)

from lightning_dembed import HybridParallelStrategy, dense_parameters  # noqa: E402
from lightning_dembed.sharding import ShardingPolicy, default_sharders, plan_sharding  # noqa: E402
from lightning_dembed.sharding.planner import default_memory_budget  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DENSE_FEATURES = 13  # Criteo's integer features


# -- configurations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """One configuration, run in its own processes: which trainer(s), which tables, how many steps."""

    name: str
    trainer: str  # "lightning_hybrid", "torchrec_loop", "interleaved" (both, alternating) or "lightning_ddp"
    tables: int
    rows: int
    dim: int
    warmup: int
    steps: int

    @property
    def table_gib(self) -> float:
        return self.tables * self.rows * self.dim * 4 / 2**30


def run_configs(args: argparse.Namespace) -> dict[str, RunConfig]:
    small = dict(
        tables=args.overhead_tables,
        rows=args.overhead_rows,
        dim=args.overhead_dim,
        warmup=args.overhead_warmup,
        steps=args.overhead_steps,
    )
    big = dict(
        tables=args.memory_tables, rows=args.memory_rows, dim=args.memory_dim, warmup=args.memory_warmup
    )
    return {
        c.name: c
        for c in (
            RunConfig("overhead/lightning_hybrid", "lightning_hybrid", **small),
            RunConfig("overhead/torchrec_loop", "torchrec_loop", **small),
            RunConfig("interleaved/both", "interleaved", **small),
            RunConfig("memory/lightning_hybrid", "lightning_hybrid", **big, steps=args.memory_hybrid_steps),
            RunConfig("memory/lightning_ddp", "lightning_ddp", **big, steps=args.memory_ddp_steps),
        )
    }


# Per part, the configurations run once per repetition, alternating so that drift hits every one.
PARTS = {
    "overhead": ("overhead/lightning_hybrid", "overhead/torchrec_loop"),
    "interleaved": ("interleaved/both",),
    "memory": ("memory/lightning_hybrid", "memory/lightning_ddp"),
}


# -- model and data (identical for every trainer) ------------------------------------------------


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


def build_model(cfg: RunConfig) -> DLRMLike:
    tables = table_configs(cfg)
    if cfg.trainer == "lightning_ddp":
        embeddings: nn.Module = EmbeddingBagTables(tables)
    else:
        # Meta device: no process ever holds the full tables, each rank materialises its shards only.
        embeddings = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    return DLRMLike(embeddings, cfg.tables, cfg.dim)


Batch = tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]


def make_batches(cfg: RunConfig, args: argparse.Namespace, rank: int) -> list[Batch]:
    """This rank's batches, from a seed: the same tensors whichever trainer consumes them."""
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


# -- timing and per-rank records (shared by every trainer) ---------------------------------------


class Stopwatch:
    """Barrier-to-barrier timing of groups of steps (one group, or many when sides alternate).

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
    plan: Optional[list[list[Any]]],
) -> dict[str, Any]:
    return {
        "rank": rank,
        "world_size": world,
        "threads": torch.get_num_threads(),
        "sides": {name: w.metrics(args.batch_size, world) for name, w in watches.items()},
        "rss_after_setup_mib": rss_after_setup,
        "peak_rss_mib": peak_rss_mib(),  # ru_maxrss at the end of training
        "vm_hwm_mib": vm_hwm_mib(),
        "plan": plan,
    }


def write_rank_record(prefix: Path, record: dict[str, Any]) -> None:
    write_json(prefix.with_name(f"{prefix.name}-rank{record['rank']}.json"), record)


# -- the hand-written TorchRec loop --------------------------------------------------------------


class HandLoop:
    """DistributedModelParallel + fused Adagrad in backward + Adagrad on the dense rest; no Lightning.

    Needs an initialised default process group. Builds its own batches (its own KeyedJaggedTensors:
    they cache offsets on first use, so sharing them with the Lightning side would favour one side).
    """

    def __init__(self, cfg: RunConfig, args: argparse.Namespace, rank: int, world: int) -> None:
        device = torch.device("cpu")
        model = build_model(cfg)
        # Fused Adagrad on the tables, attached before sharding so the planner picks the fused kernel.
        # lr, eps, weight_decay: torch.optim.Adagrad's, which the strategy takes from configure_optimizers.
        apply_optimizer_in_backward(
            torch.optim.Adagrad,
            list(model.embeddings.parameters()),
            {"lr": args.lr, "eps": 1e-10, "weight_decay": 0.0},
        )
        sharders = default_sharders()
        # The strategy's planning function, with the strategy's inputs: the same plan on both sides.
        plan, summary = plan_sharding(
            model,
            ShardingPolicy(**sharding_kwargs(cfg, args)),
            sharders,
            world_size=world,
            local_world_size=world,
            device=device,
            memory_budget=default_memory_budget(device, world),
            optimizer_state_factor=1.0,
            process_group=dist.group.WORLD,
        )
        self.plan_rows = summary.as_rows()
        self.dmp = DistributedModelParallel(
            model,
            env=ShardingEnv.from_process_group(dist.group.WORLD),
            device=device,
            plan=plan,
            sharders=sharders,
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


def torchrec_rank(rank: int, cfg: RunConfig, args: argparse.Namespace, prefix: Path, port: int) -> None:
    world = args.devices
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loop = HandLoop(cfg, args, rank, world)
    rss_after_setup = rss_mib()
    watch = Stopwatch()
    loop.run(cfg.warmup)
    watch.start()
    loop.run(cfg.steps, watch)
    watch.stop()
    write_rank_record(
        prefix, rank_record(args, {"torchrec_loop": watch}, rank, world, rss_after_setup, loop.plan_rows)
    )
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrec_loop(cfg: RunConfig, args: argparse.Namespace, prefix: Path) -> None:
    # Same process model as the Lightning side: forked (or spawned) children of this process.
    start_method = "fork" if args.start_method == "fork" else "spawn"
    torch.multiprocessing.start_processes(
        torchrec_rank, args=(cfg, args, prefix, free_port()), nprocs=args.devices, start_method=start_method
    )


# -- Lightning -----------------------------------------------------------------------------------


class LitDLRM(LightningModule):
    def __init__(self, model: DLRMLike, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        dense, features, labels = batch
        # No self.log: the hand loop does not sync or store metrics either.
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
    """Times Lightning's steps after the warm-up; with ``interleave``, runs the hand loop in between.

    Interleaved: after every ``interleave`` timed Lightning steps the Lightning clock stops, the hand
    loop (its own sharded model and batches, in the same processes) runs as many timed steps, and the
    Lightning clock starts again. Both sides then see the same machine at the same moments.
    """

    def __init__(self, cfg: RunConfig, args: argparse.Namespace, prefix: Path, interleave: int = 0) -> None:
        self.cfg, self.args, self.prefix, self.interleave = cfg, args, prefix, interleave
        self.watch = Stopwatch()
        self.hand: Optional[HandLoop] = None
        self.hand_watch = Stopwatch()
        self.rss_after_setup: Optional[float] = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.interleave:
            self.hand = HandLoop(self.cfg, self.args, trainer.global_rank, trainer.world_size)
        self.rss_after_setup = rss_mib()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        completed, warmup = batch_idx + 1, self.cfg.warmup
        if completed == warmup:
            if self.hand is not None:
                with torch.enable_grad():
                    self.hand.run(warmup)
            self.watch.start()
            return
        if completed < warmup:
            return
        self.watch.lap()
        last = completed == warmup + self.cfg.steps
        if self.hand is not None and (completed - warmup) % self.interleave == 0:
            self.watch.stop()
            self.hand_watch.start()
            with torch.enable_grad():
                self.hand.run(self.interleave, self.hand_watch)
            self.hand_watch.stop()
            if not last:
                self.watch.start()
        elif last:
            self.watch.stop()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        summary = getattr(trainer.strategy, "plan_summary", None)
        plan = summary.as_rows() if summary is not None else None
        name = "lightning_ddp" if self.cfg.trainer == "lightning_ddp" else "lightning_hybrid"
        watches = {name: self.watch} | ({"torchrec_loop": self.hand_watch} if self.hand is not None else {})
        record = rank_record(
            self.args, watches, trainer.global_rank, trainer.world_size, self.rss_after_setup, plan
        )
        if self.hand is not None:
            record["plan_torchrec_loop"] = self.hand.plan_rows
        write_rank_record(self.prefix, record)


def sharding_kwargs(cfg: RunConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The strategy's sharding knobs; the hand loop turns the same ones into a plan."""
    if args.sharding is None:
        return {}  # TorchRec's planner decides (deterministic: both sides get the same plan)
    return {"sharding_types": {t.name: args.sharding for t in table_configs(cfg)}}


def run_lightning(cfg: RunConfig, args: argparse.Namespace, prefix: Path) -> None:
    module = LitDLRM(build_model(cfg), lr=args.lr)
    if cfg.trainer == "lightning_ddp":
        strategy: DDPStrategy = DDPStrategy(start_method=args.start_method)
    else:
        strategy = HybridParallelStrategy(start_method=args.start_method, **sharding_kwargs(cfg, args))
    interleave = args.interleave if cfg.trainer == "interleaved" else 0
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
        callbacks=[Recorder(cfg, args, prefix, interleave)],
    )
    trainer.fit(module, datamodule=RankBatches(cfg, args))


# -- worker: one configuration in fresh processes ------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    cfg = run_configs(args)[args.worker]
    prefix = Path(args.scratch) / args.run_id
    if cfg.trainer == "interleaved" and cfg.steps % args.interleave:
        raise ValueError("--interleave must divide --overhead-steps")
    runner: Callable[[RunConfig, argparse.Namespace, Path], None] = (
        run_torchrec_loop if cfg.trainer == "torchrec_loop" else run_lightning
    )
    runner(cfg, args, prefix)
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
    """Run one configuration once, in fresh processes; collect what every rank wrote."""
    run_id = f"{name.replace('/', '-')}-{rep}"
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.devices)))
    # The orchestrator imports torch too, but stays below any rank's RSS, so the children's ru_maxrss
    # (which Linux carries over exec from the parent) is theirs; VmHWM is recorded as a cross-check.
    worker_args = ["--worker", name, "--run-id", run_id, "--scratch", str(scratch)]
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], *worker_args]
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


def compare(num: list[float], den: list[float]) -> dict[str, Any]:
    """Ratios per repetition (i-th with i-th) and the ratio of the means."""
    per_repeat = [x / y for x, y in zip(num, den, strict=False)]
    of_means = statistics.fmean(num) / statistics.fmean(den) if num and den else None
    return {"per_repeat": per_repeat, "of_means": of_means}


class Ratio(NamedTuple):
    """numerator / denominator of one metric; a side of "" means the processes (memory)."""

    name: str
    num_config: str
    num_side: str
    den_config: str
    den_side: str
    metric: str
    target: str


RATIOS = (
    Ratio("lightning_over_torchrec_samples_per_s (separate processes)",
          "overhead/lightning_hybrid", "lightning_hybrid", "overhead/torchrec_loop", "torchrec_loop",
          "global_samples_per_s", ">= 0.95"),
    Ratio("lightning_over_torchrec_samples_per_s (interleaved, same processes)",
          "interleaved/both", "lightning_hybrid", "interleaved/both", "torchrec_loop",
          "global_samples_per_s", ">= 0.95"),
    Ratio("hybrid_over_ddp_samples_per_s",
          "memory/lightning_hybrid", "lightning_hybrid", "memory/lightning_ddp", "lightning_ddp",
          "global_samples_per_s", ">= 5"),
    Ratio("hybrid_over_ddp_peak_rss (largest rank)",
          "memory/lightning_hybrid", "", "memory/lightning_ddp", "", "peak_rss_mib", "<= 0.6"),
)  # fmt: skip


def paired_turn_ratios(runs: list[dict[str, Any]]) -> list[float]:
    """Per interleaved repetition, the median over turns of (hand-loop turn time / Lightning turn time).

    The i-th Lightning turn and the i-th hand-loop turn ran back to back (same number of steps), so
    their ratio sees one state of the machine; the median discards turns that a change of machine
    speed split unevenly.
    """
    ratios = []
    for run in runs:
        if run["config"] == "interleaved/both" and run["ranks"]:
            sides = run["ranks"][0]["sides"]
            lit_ms, hand_ms = sides["lightning_hybrid"]["group_ms"], sides["torchrec_loop"]["group_ms"]
            ratios.append(statistics.median(h / lt for lt, h in zip(lit_ms, hand_ms, strict=True)))
    return ratios


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
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
    ratios: dict[str, Any] = {}
    for r in RATIOS:
        if r.metric == "peak_rss_mib":
            num, den = largest_rank_peaks(runs, r.num_config), largest_rank_peaks(runs, r.den_config)
        else:
            num = side_metric(runs, r.num_config, r.num_side, r.metric)
            den = side_metric(runs, r.den_config, r.den_side, r.metric)
        if num and den:
            ratios[r.name] = compare(num, den) | {"target": r.target}
    turns = paired_turn_ratios(runs)
    if turns:
        ratios["lightning_over_torchrec_samples_per_s (interleaved, median of paired turns)"] = {
            "per_repeat": turns,
            "of_means": statistics.fmean(turns),
            "target": ">= 0.95",
        }
    return {"sides": sides, "ratios": ratios}


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
    "configuration", "side", "rep", "timed steps", "samples/s", "median step ms", "peak RSS MiB (rank 0 / 1)",
    "RSS after setup MiB", "largest rank peak after fit MiB", "wall s",
]  # fmt: skip


def markdown(record: dict[str, Any]) -> str:
    summary, runs, args, machine = record["summary"], record["runs"], record["args"], record["machine"]
    versions = machine["versions"]
    threads = runs[0]["omp_num_threads"] if runs else "?"
    lines = [
        "# Strategy overhead: HybridParallelStrategy vs a hand-written TorchRec loop, and vs DDP",
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
            "includes what the launcher does after training (start method "
            f"`{args['start_method']}`). `interleaved/both` runs both sides in the same processes, "
            f"alternating every {args['interleave']} steps, so both see the same machine."
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
    """Whether every rank of every run of a part (both sides) trained with the same sharding plan."""
    plans: dict[str, set[str]] = {}
    for run in runs:
        for r in run["ranks"]:
            for key in ("plan", "plan_torchrec_loop"):
                if r.get(key):
                    plans.setdefault(run["config"].split("/")[0], set()).add(json.dumps(r[key]))
    return {part: len(p) == 1 for part, p in plans.items()}


def orchestrate(args: argparse.Namespace) -> None:
    configs = run_configs(args)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="strategy_overhead-") as tmp:
        scratch = Path(tmp)
        for part in args.parts:
            for rep in range(args.repeats):
                for name in PARTS[part]:
                    run = launch(name, rep, args, scratch)
                    r0 = run["ranks"][0] if run["ranks"] else {"sides": {}}
                    figures = ", ".join(
                        f"{side} {m['global_samples_per_s']:,.0f} samples/s"
                        for side, m in r0["sides"].items()
                    )
                    print(
                        f"{name} rep {rep}: rc={run['returncode']} {figures}; peak RSS "
                        f"{[round(r['peak_rss_mib']) for r in run['ranks']]} MiB; wall {run['wall_s']} s",
                        flush=True,
                    )
                    if "log_tail" in run:
                        print(run["log_tail"], file=sys.stderr)
                    runs.append(run)
    record = {
        "benchmark": "strategy_overhead",
        "command": command_line(),
        "machine": machine_info(REPO),
        "args": vars(args),
        "configs": {name: asdict(c) | {"table_gib": c.table_gib} for name, c in configs.items()},
        "same_plan_per_part": same_plan_per_part(runs),
        "orchestrator_peak_rss_mib": peak_rss_mib(),
        "runs": runs,
        "summary": summarize(runs),
    }
    out_json = Path(args.out) if args.out else RESULTS / "strategy_overhead.json"
    write_json(out_json, record)
    out_json.with_suffix(".md").write_text(markdown(record))
    print(json.dumps(record["summary"]["ratios"], indent=1))
    print(f"wrote {out_json} and {out_json.with_suffix('.md')}")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="what to run")
    p.add_argument("--devices", type=int, default=2, help="gloo ranks")
    p.add_argument("--batch-size", type=int, default=2048, help="samples per rank per step")
    p.add_argument("--pooling", type=int, default=1, help="ids per feature per sample")
    p.add_argument("--lr", type=float, default=0.01, help="Adagrad learning rate (tables and dense)")
    p.add_argument("--seed", type=int, default=0, help="data seed (each rank adds its rank)")
    p.add_argument("--repeats", type=int, default=2, help="runs of every configuration (fresh processes)")
    p.add_argument("--start-method", choices=["fork", "spawn", "popen"], default="fork",
                   help="Lightning's launcher (the hand loop forks, or spawns for spawn/popen)")
    p.add_argument("--sharding", default=None,
                   help="one sharding type for every table; None: TorchRec's planner decides")
    p.add_argument("--overhead-tables", type=int, default=8, help="overhead parts: tables")
    p.add_argument("--overhead-rows", type=int, default=200_000, help="overhead parts: rows per table")
    p.add_argument("--overhead-dim", type=int, default=64, help="overhead parts: embedding dim")
    p.add_argument("--overhead-warmup", type=int, default=10, help="overhead parts: untimed steps")
    p.add_argument("--overhead-steps", type=int, default=150, help="overhead parts: timed steps per side")
    p.add_argument("--interleave", type=int, default=5,
                   help="interleaved part: steps per turn of each side (divides --overhead-steps)")
    p.add_argument("--memory-tables", type=int, default=4, help="memory part: tables")
    p.add_argument("--memory-rows", type=int, default=2_097_152, help="memory part: rows per table")
    p.add_argument("--memory-dim", type=int, default=32, help="memory part: embedding dim")
    p.add_argument("--memory-warmup", type=int, default=3, help="memory part: untimed steps")
    p.add_argument("--memory-hybrid-steps", type=int, default=100, help="memory part: timed steps, hybrid")
    p.add_argument("--memory-ddp-steps", type=int, default=6, help="memory part: timed steps, DDP (~5 s)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run before it is killed")
    p.add_argument("--out", default=None,
                   help="JSON path, the .md next to it; None: benchmarks/results/strategy_overhead.json")
    # Internal: set by the orchestrator when it re-executes this script for one configuration.
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
