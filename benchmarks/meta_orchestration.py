"""G-Meta orchestration (`MetaLearningLoop`) against a naive distributed MAML loop, on N CPU processes.

    python benchmarks/meta_orchestration.py                       # defaults below (about 8 minutes, 2 CPUs)
    python benchmarks/meta_orchestration.py --tasks 32 --repeats 1

Both sides train the same model on the same data with the same meta-learning algorithm, under
Lightning with `HybridParallelStrategy` on ``--devices`` gloo processes (started by
``torch.distributed.run``):

- model: `DLRMModule` (dot interaction, bottom MLP 32-16, top MLP 64-32-1, Adagrad lr 0.05) over the
  tables of `TaskDataModule` (``user_id``, ``item_id``, ``category``: 8192 x 16 each), sharded
  ``row_wise``, ``table_wise`` and ``column_wise`` so that every lookup crosses ranks;
- data: `TaskDataModule` (Meta-IO) over ``--num-users`` generated users, ``T`` tasks per rank and
  meta-batch, loaded in the training process (no worker);
- algorithm: MAML, one inner step (lr 0.1) adapting the top MLP and a per-task ``user_id`` offset
  (the meta-DLRM recipe's ``meta`` section), `lightning_dembed.meta.meta_step` for the inner loop.

They differ only in orchestration, per meta-batch of ``T`` tasks on a rank:

- ``g-meta``: `MetaLearningLoop`: ONE embedding lookup for the rows of all ``T`` tasks (one input
  and one output all-to-all forward, the same backward), the inner loops vectorised over tasks,
  ONE backward: the tables' fused update and one DDP all-reduce of the dense gradients.
- ``naive``: `NaiveMAMLModule` (manual optimization): per task, its own lookup through the sharded
  tables, its own inner loop, its own outer backward and optimizer step: ``T`` lookups, ``T``
  table updates and ``T`` DDP all-reduces of the dense gradients per meta-batch (``manual_backward``
  per task).

Measured: tasks/s (all ranks) in steady state, for ``--tasks`` tasks per rank and meta-batch
(default 8 16 32 64 128): each configuration runs ``--warmup`` meta-batches, meets the other ranks
at a barrier, starts the clock, runs its timed meta-batches (enough for about ``--timed-tasks``
tasks per rank, at least ``--min-steps``, for g-meta at least ``--gmeta-min-steps``), meets them
again and stops the clock. Sides alternate within each ``T`` and repetition (``--repeats``, median
reported). A short extra run per side counts the collectives of one meta-batch (torch.distributed
calls and DDP bucket all-reduces) and checks that the dense weights of all ranks are equal after
training (the naive loop's all-reduces really happen). Target: g-meta >= 3x naive at 32 tasks per
meta-batch.

Writes ``benchmarks/results/<date>_<machine>/meta_orchestration.{json,md,svg}`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine_info, markdown_table, results_dir, write_results  # noqa: E402

from lightning_dembed import HybridParallelStrategy  # noqa: E402
from lightning_dembed.data import TaskBatch, TaskDataModule  # noqa: E402
from lightning_dembed.meta import MetaLearningConfig, MetaLearningLoop, meta_step  # noqa: E402
from lightning_dembed.models import DLRMModule  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
METHODS = ("g-meta", "naive")
# The meta-DLRM recipe's meta section (meta_dlrm_synthetic).
META = dict(algorithm="maml", inner_steps=1, inner_lr=0.1, adapt=("dlrm.over_arch",), adapt_embeddings=("user_id",))
# Every table split across ranks in a different way: each lookup is a real cross-rank exchange.
SHARDING = {"t_user_id": "row_wise", "t_item_id": "table_wise", "t_category": "column_wise"}
COLLECTIVES = ("all_to_all_single", "all_to_all", "all_reduce", "all_gather", "all_gather_into_tensor",
               "reduce_scatter_tensor", "reduce_scatter", "broadcast", "barrier")


# -- the naive loop -----------------------------------------------------------------------------------


def task_features(kjt: KeyedJaggedTensor, start: int, stop: int) -> KeyedJaggedTensor:
    """Rows ``start:stop`` of a `KeyedJaggedTensor` (every key), as a KJT of their own."""
    rows, keys = kjt.stride(), kjt.keys()
    offsets, values = kjt.offsets(), kjt.values()
    parts = [values[offsets[f * rows + start]: offsets[f * rows + stop]] for f in range(len(keys))]
    lengths = kjt.lengths().reshape(len(keys), rows)[:, start:stop].reshape(-1)
    return KeyedJaggedTensor(keys=keys, values=torch.cat(parts), lengths=lengths)


class NaiveMAMLModule(DLRMModule):
    """Distributed MAML without G-Meta's orchestration: every task of a meta-batch on its own.

    Per task: its own sharded lookup, its own inner loop (`meta_step` on one task), its own outer
    backward (fused table update, one DDP all-reduce) and dense optimizer step.
    """

    def __init__(self, *args: Any, meta: MetaLearningConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meta = meta
        self.automatic_optimization = False

    def training_step(self, batch: TaskBatch, batch_idx: int) -> None:
        optimizer = self.optimizers()
        losses = []
        for t in range(batch.num_tasks):
            start, stop = int(batch.task_offsets[t]), int(batch.task_offsets[t + 1])
            embedded = self.embed(task_features(batch.sparse_features, start, stop))
            out = meta_step(
                # As MetaLearningLoop: only what adapts is passed, the module's own weights stand in for the rest.
                self, {n: p for n, p in self.named_parameters() if self.meta.adapts(n)},
                batch.dense_features[start:stop], embedded,
                batch.labels[start:stop], torch.tensor([0, stop - start]), batch.support_sizes[t: t + 1],
                self.meta, self.feature_names,
            )
            optimizer.zero_grad()
            # Steps the sharded tables (fused optimizer) and all-reduces the dense gradients (DDP).
            self.manual_backward(out.query_loss)
            optimizer.step()
            losses.append(out.query_loss.detach())
        self.log("train/query_loss", torch.stack(losses).mean(), prog_bar=True, batch_size=batch.num_tasks)


# -- measuring ----------------------------------------------------------------------------------------


class SteadyState(Callback):
    """Seconds for the meta-batches after ``warmup``, between two barriers."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps, self.start, self.seconds = warmup, 0, 0.0, 0.0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # batch_idx, not global_step: manual optimization steps the optimizer T times per meta-batch.
        if batch_idx + 1 == self.warmup:
            trainer.strategy.barrier()
            self.start = time.perf_counter()
        elif batch_idx + 1 > self.warmup:
            self.steps += 1

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.barrier()
        self.seconds = time.perf_counter() - self.start


class CountCollectives(Callback):
    """torch.distributed calls and DDP bucket all-reduces of each meta-batch (patched for the run only)."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.per_step: list[dict[str, int]] = []
        self._originals: dict[str, Any] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for name in COLLECTIVES:
            original = self._originals[name] = getattr(dist, name)

            def counted(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)

        # Unannotated: DDP checks a hook's annotations, which `from __future__ import annotations` turns into strings.
        def allreduce(state, bucket):  # type: ignore[no-untyped-def]
            self.calls["ddp_bucket_all_reduce"] += 1
            return default_hooks.allreduce_hook(None, bucket)

        trainer.strategy.model._dmp_wrapped_module.register_comm_hook(None, allreduce)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # From the end of one meta-batch to the end of the next: the fetch in between, where a
        # pipelined input stage starts, counts with the meta-batch it serves.
        self.per_step.append(dict(self.calls))
        self.calls.clear()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)


def dense_weights_agree(model: DLRMModule) -> bool:
    """Whether every rank holds the same dense weights (bitwise), i.e. the all-reduces happened."""
    flat = torch.cat([p.detach().reshape(-1) for name, p in model.named_parameters()
                      if ".dense_arch." in f".{name}." or ".over_arch." in f".{name}."])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def run(method: str, tasks: int, warmup: int, steps: int, args: argparse.Namespace, count: bool = False) -> dict:
    """One fit of one side; returns this rank's figures."""
    seed_everything(0)
    data = TaskDataModule(store_dir=args.store, num_users=args.num_users, tasks_per_batch=tasks, num_workers=0)
    config = MetaLearningConfig(**META)
    common = dict(num_dense_features=data.num_dense_features, dense_arch_layer_sizes=(32, 16),
                  over_arch_layer_sizes=(64, 32, 1), optimizer=partial(torch.optim.Adagrad, lr=0.05, eps=1e-8))
    timer = SteadyState(warmup)
    callbacks: list[Callback] = [timer]
    if method == "g-meta":
        model: DLRMModule = DLRMModule(data.tables(), **common)
        callbacks.append(MetaLearningLoop(**META))
    else:
        model = NaiveMAMLModule(data.tables(), meta=config, **common)
    counter = CountCollectives() if count else None
    if counter is not None:
        callbacks.append(counter)
    trainer = Trainer(
        strategy=HybridParallelStrategy(sharding_types=SHARDING), accelerator="cpu", devices=args.devices,
        max_epochs=1, limit_train_batches=warmup + steps, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=data)
    world = trainer.world_size
    if timer.steps != steps:
        raise RuntimeError(f"{method}, {tasks} tasks: {timer.steps} timed meta-batches instead of {steps}; "
                           "the store has too few tasks for this many (raise --num-users)")
    result = {
        "method": method, "tasks_per_rank": tasks, "world_size": world, "timed_meta_batches": steps,
        "seconds": timer.seconds, "tasks_per_sec": steps * tasks * world / timer.seconds,
        "meta_batches_per_sec": steps / timer.seconds, "dense_weights_agree": dense_weights_agree(model),
    }
    if counter is not None:
        result["collectives_per_meta_batch"] = counter.per_step[-1]
    return result


def timed_steps(method: str, tasks: int, args: argparse.Namespace) -> int:
    # G-Meta's meta-batches are short: give it more of them, so its clock runs long enough too.
    least = args.gmeta_min_steps if method == "g-meta" else args.min_steps
    return max(least, -(-args.timed_tasks // tasks))


def worker(args: argparse.Namespace) -> None:
    """One rank: every configuration in turn, in the same processes; rank 0 writes the results."""
    runs: list[dict] = []
    for method in METHODS:
        runs.append(run(method, args.count_tasks, warmup=1, steps=2, args=args, count=True) | {"kind": "count"})
    for repeat in range(args.repeats):
        for tasks in args.tasks:
            # Alternate which side goes first, so slow drift of the machine hits both.
            for method in (METHODS if (repeat + args.tasks.index(tasks)) % 2 == 0 else METHODS[::-1]):
                result = run(method, tasks, args.warmup, timed_steps(method, tasks, args), args)
                runs.append(result | {"kind": "timed", "repeat": repeat})
                if dist.get_rank() == 0:
                    print(json.dumps(runs[-1]), flush=True)
    if dist.get_rank() == 0:
        Path(args.worker_out).write_text(json.dumps(runs))


# -- launcher and report --------------------------------------------------------------------------------


def summarize(runs: list[dict], tasks: list[int]) -> list[dict]:
    rows = []
    for t in tasks:
        row: dict[str, Any] = {"tasks_per_rank": t}
        for method in METHODS:
            rates = [r["tasks_per_sec"] for r in runs if r["kind"] == "timed" and r["method"] == method
                     and r["tasks_per_rank"] == t]
            row[method] = statistics.median(rates)
            row[f"{method}_runs"] = rates
        row["speedup"] = row["g-meta"] / row["naive"]
        rows.append(row)
    return rows


def report(record: dict) -> str:
    m, world = record["machine"], record["world_size"]
    lines = [
        "# G-Meta orchestration vs naive distributed MAML", "",
        f"{m['date']}, {m['cpu_model']}, {m['cpu_count']} CPUs, {m['ram_gib']} GiB, torch "
        f"{m['versions'].get('torch')}, torchrec {m['versions'].get('torchrec')}, lightning "
        f"{m['versions'].get('lightning')}; {world} gloo processes, OMP_NUM_THREADS={record['omp_num_threads']}; "
        f"1-minute load average before the run {record['load_average_before']:.2f}; wall time "
        f"{record['wall_seconds'] / 60:.1f} min.", "",
        f"Command: `{record['command']}`", "",
        f"Tasks/s over all {world} ranks, median of {record['repeats']} run(s); T tasks per rank and meta-batch "
        f"({world} x T per global meta-batch).", "",
        markdown_table(["T (tasks/rank/meta-batch)", "g-meta tasks/s", "naive tasks/s", "g-meta / naive"],
                       [[r["tasks_per_rank"], r["g-meta"], r["naive"], r["speedup"]] for r in record["summary"]]),
        "",
    ]
    at32 = [r for r in record["summary"] if r["tasks_per_rank"] == 32]
    if at32:
        lines.append(f"At 32 tasks per meta-batch: g-meta is {at32[0]['speedup']:.1f}x naive (target >= 3x).")
    counts = [r for r in record["runs"] if r["kind"] == "count"]
    if counts:
        names = sorted({k for r in counts for k in r["collectives_per_meta_batch"]})
        lines += [
            "", f"Collectives of one meta-batch on rank 0 at T={counts[0]['tasks_per_rank']} (torch.distributed calls "
            "seen from Python, DDP bucket all-reduces), and whether the dense weights agree on all ranks after "
            "training:", "",
            markdown_table(["method", *names, "weights agree"],
                           [[r["method"], *[r["collectives_per_meta_batch"].get(n, 0) for n in names],
                             r["dense_weights_agree"]] for r in counts]),
            "",
            "Counted from the end of one meta-batch to the end of the next, the fetch in between included "
            "(pipelined, the input stage of a meta-batch starts when it is fetched). `all_reduce` counts the "
            "DDP bucket all-reduces (the counting hook issues them through torch.distributed), the ranks' "
            "agreement to use an input stage started ahead, and the row-count all-reduce of gloo's "
            "row-wise lookups.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 16, 32, 64, 128],
                        help="tasks per rank and meta-batch")
    parser.add_argument("--devices", type=int, default=2, help="processes")
    parser.add_argument("--num-users", type=int, default=20000, help="generated users (tasks) of the store")
    parser.add_argument("--warmup", type=int, default=2, help="meta-batches before the clock starts")
    parser.add_argument("--timed-tasks", type=int, default=384, help="about this many timed tasks per rank and run")
    parser.add_argument("--min-steps", type=int, default=4, help="at least this many timed meta-batches (naive)")
    parser.add_argument("--gmeta-min-steps", type=int, default=24, help="at least this many timed meta-batches (g-meta)")
    parser.add_argument("--count-tasks", type=int, default=8, help="T of the collective-counting runs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=results_dir() / "meta_orchestration.json",
                        help="JSON path, the .md and .svg beside it")
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        worker(args)
        return

    load, started = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        TaskDataModule(store_dir=str(store), num_users=args.num_users).prepare_data()  # built once, read by all runs
        out = Path(tmp) / "runs.json"
        forwarded = ["--tasks", *map(str, args.tasks), "--devices", str(args.devices), "--num-users",
                     str(args.num_users), "--warmup", str(args.warmup), "--timed-tasks", str(args.timed_tasks),
                     "--min-steps", str(args.min_steps), "--gmeta-min-steps", str(args.gmeta_min_steps), "--count-tasks", str(args.count_tasks), "--repeats",
                     str(args.repeats)]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.devices}",
                   str(Path(__file__).resolve()), *forwarded, "--store", str(store), "--worker-out", str(out)]
        # One thread per rank when the ranks fill the machine (torch.distributed.run's default is 1).
        threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.devices)))
        proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": threads}, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"worker processes failed (exit {proc.returncode})")
        runs = json.loads(out.read_text())
    record = {
        "benchmark": "meta_orchestration", "command": command_line(), "machine": machine_info(REPO), "load_average_before": load,
        "wall_seconds": time.perf_counter() - started, "world_size": args.devices, "omp_num_threads": threads,
        "repeats": args.repeats, "meta": META, "sharding": SHARDING,
        "summary": summarize(runs, args.tasks), "runs": runs,
    }
    write_results(args.out, record, report)


if __name__ == "__main__":
    main()
