"""Meta-IO throughput: task-consistent meta-batches against a per-sample pipeline, and against training.

    python benchmarks/meta_io.py                    # both parts (about 3 minutes on 2 CPU cores)
    python benchmarks/meta_io.py --skip-training    # the pipelines only

Part 1, pipelines. One task store (Meta-IO's Arrow store, built by `build_task_store` from
``--num-users`` generated users of `SyntheticTaskConfig`, the features `TaskDataModule` uses:
``user_id``, ``item_id``, ``category`` and ``d0..d3``) is read three ways, each producing the same
`TaskBatch` of ``--tasks-per-batch`` whole tasks (every row of a task, support rows first, one
`KeyedJaggedTensor`; checked on one meta-batch before timing), through a ``DataLoader`` with 0
and 1 worker processes:

- ``meta-io``: `MetaBatchDataset` (``batch_size=None``): a meta-batch is a few vectorised gathers
  of contiguous row ranges of the memory-mapped Arrow columns.
- ``per-sample (arrays)``: the usual PyTorch pipeline at its best: a map-style ``Dataset`` whose
  ``__getitem__`` returns one row as a dict of tensors, from columns copied once into in-memory
  numpy arrays; a batch sampler yielding the row indices of ``--tasks-per-batch`` tasks; a
  ``collate_fn`` that stacks the rows and groups them into the same `TaskBatch`.
- ``per-sample (HF rows)``: the same, with ``__getitem__`` reading the row through the store's HF
  ``datasets.Dataset`` (``rows[i]``), as a plain HF + PyTorch pipeline would.

Each loader is timed after its first batch (worker start-up excluded); a figure is the median of
``--repeats`` loaders (Meta-IO reads one whole pass of the store per repeat, the per-sample
pipelines ``--sample-batches`` / ``--hf-batches`` meta-batches). Target: Meta-IO >= 10x the
per-sample pipeline in tasks/s.

Part 2, what training consumes: the meta-DLRM recipe's setup (``recipes/configs/
meta_dlrm_synthetic.yaml``: `TaskDataModule` with 4000 generated users, 32 tasks per rank and
meta-batch, one loader worker; `DLRMModule`; `MetaLearningLoop`, MAML with one inner step;
Adagrad) trained by Lightning with `HybridParallelStrategy` on ``--devices`` gloo processes started
by ``torch.distributed.run``, without logger, checkpoints or validation. Its steady-state
meta-batches/s per rank (after ``--warmup`` steps, the clock between two barriers) is what each
rank's loader has to deliver; the report gives Meta-IO's single-loader rate as a multiple of it
(target >= 3x). The loader rate is measured on an otherwise idle machine, while in training the
loader shares the cores with the ranks.

Writes ``benchmarks/results/<date>_<machine>/meta_io.{json,md,svg}`` (``--out``).
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
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine_info, markdown_table, results_dir, write_results  # noqa: E402

from lightning_dembed.data.batch import TaskBatch  # noqa: E402
from lightning_dembed.data.task_loader import MetaBatchDataset  # noqa: E402
from lightning_dembed.data.task_store import TaskSplit, build_task_store  # noqa: E402
from lightning_dembed.data.tasks import SyntheticTaskConfig, write_interactions  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CATEGORICAL = ["user_id", "item_id", "category"]
DENSE = ["d0", "d1", "d2", "d3"]


# -- the per-sample pipeline ----------------------------------------------------------------------


class _RowTasks:
    """Which task (position in the split) each stored row belongs to, and whether it is a support row."""

    def __init__(self, split: TaskSplit) -> None:
        sizes = np.diff(split.offsets)
        self.task = np.repeat(np.arange(split.num_tasks), sizes)
        position = np.arange(split.offsets[-1]) - np.repeat(split.offsets[:-1], sizes)
        self.support = position < np.repeat(split.support_sizes, sizes)


class ArrayRowDataset(Dataset):
    """One row per ``__getitem__`` from columns copied once into RAM: the per-sample best case."""

    def __init__(self, split: TaskSplit) -> None:
        self.sparse = np.stack([split.column(c) for c in CATEGORICAL], axis=1).astype(np.int64)
        self.dense = np.stack([split.column(c) for c in DENSE], axis=1).astype(np.float32)
        self.labels = np.array(split.column("label"), dtype=np.float32)
        self.tasks = _RowTasks(split)

    def __len__(self) -> int:
        return self.labels.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "sparse": torch.from_numpy(self.sparse[i]),
            "dense": torch.from_numpy(self.dense[i]),
            "label": torch.tensor(self.labels[i]),
            "task": torch.tensor(self.tasks.task[i]),
            "support": torch.tensor(self.tasks.support[i]),
        }


class HFRowDataset(Dataset):
    """One row per ``__getitem__``, read through the split's HF ``datasets.Dataset``."""

    def __init__(self, split: TaskSplit) -> None:
        self.rows = split.rows
        self.tasks = _RowTasks(split)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        return {
            "sparse": torch.tensor([row[c] for c in CATEGORICAL], dtype=torch.int64),
            "dense": torch.tensor([row[c] for c in DENSE], dtype=torch.float32),
            "label": torch.tensor(row["label"], dtype=torch.float32),
            "task": torch.tensor(self.tasks.task[i]),
            "support": torch.tensor(self.tasks.support[i]),
        }


class TaskRowSampler(Sampler[list[int]]):
    """Row indices of the meta-batches a `MetaBatchDataset` plans (same tasks, same order)."""

    def __init__(self, plan: list[np.ndarray], offsets: np.ndarray) -> None:
        self.plan, self.offsets = plan, offsets

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[list[int]]:
        for tasks in self.plan:
            yield [i for t in tasks for i in range(self.offsets[t], self.offsets[t + 1])]


class CollateTaskRows:
    """Stacks one meta-batch's rows (task by task, support first) into a `TaskBatch`."""

    def __init__(self, task_keys: np.ndarray) -> None:
        self.task_keys = torch.from_numpy(task_keys.astype(np.int64))

    def __call__(self, samples: Sequence[dict[str, torch.Tensor]]) -> TaskBatch:
        sparse = torch.stack([s["sparse"] for s in samples])  # [R, F]
        task = torch.stack([s["task"] for s in samples])
        support = torch.stack([s["support"] for s in samples])
        tasks, sizes = torch.unique_consecutive(task, return_counts=True)
        owner = torch.repeat_interleave(torch.arange(tasks.numel()), sizes)
        rows = sparse.shape[0]
        return TaskBatch(
            dense_features=torch.stack([s["dense"] for s in samples]),
            # Feature-major values, one id per row and feature: the layout Meta-IO produces.
            sparse_features=KeyedJaggedTensor(keys=CATEGORICAL, values=sparse.t().reshape(-1),
                                              lengths=torch.ones(rows * len(CATEGORICAL), dtype=torch.int32)),
            labels=torch.stack([s["label"] for s in samples]),
            task_offsets=torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]),
            support_sizes=torch.zeros(tasks.numel(), dtype=torch.int64).index_add_(0, owner, support.long()),
            task_keys=self.task_keys[tasks],
        )


def per_sample_loader(rows: Dataset, split: TaskSplit, tasks_per_batch: int, batches: int, workers: int,
                      seed: int) -> DataLoader:
    plan = MetaBatchDataset(split, tasks_per_batch, seed=seed, rank=0, world_size=1).plan()[: batches + 1]
    return DataLoader(rows, batch_sampler=TaskRowSampler(plan, split.offsets), collate_fn=CollateTaskRows(split.keys),
                      num_workers=workers)


def meta_io_loader(split: TaskSplit, tasks_per_batch: int, workers: int, seed: int) -> DataLoader:
    return DataLoader(MetaBatchDataset(split, tasks_per_batch, seed=seed, rank=0, world_size=1), batch_size=None,
                      num_workers=workers)


def check_same_batches(split: TaskSplit, rows: Sequence[Dataset], tasks_per_batch: int) -> None:
    """Every pipeline builds the same first meta-batch, so the comparison is of speed alone."""
    want = next(iter(meta_io_loader(split, tasks_per_batch, 0, seed=0)))
    for data in rows:
        got = next(iter(per_sample_loader(data, split, tasks_per_batch, 1, 0, seed=0)))
        for field in ("dense_features", "labels", "task_offsets", "support_sizes", "task_keys"):
            if not torch.equal(getattr(got, field), getattr(want, field)):
                raise AssertionError(f"{type(data).__name__} builds another {field} than MetaBatchDataset")
        if not torch.equal(got.sparse_features.values(), want.sparse_features.values()):
            raise AssertionError(f"{type(data).__name__} builds other sparse ids than MetaBatchDataset")


# -- timing ------------------------------------------------------------------------------------------


def loader_rate(loader: DataLoader, batches: int) -> dict[str, float]:
    """Tasks, rows and meta-batches per second over ``batches`` batches after the first one."""
    it = iter(loader)
    next(it)  # worker start-up and first-batch latency are not throughput
    tasks = rows = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        tasks += batch.num_tasks
        rows += batch.num_rows
    seconds = time.perf_counter() - start
    del it  # shuts its worker down before the next measurement starts
    return {"tasks_per_sec": tasks / seconds, "rows_per_sec": rows / seconds, "batches_per_sec": batches / seconds}


def median_rate(make_loader: Callable[[int], DataLoader], batches: int, repeats: int) -> dict[str, Any]:
    runs = [loader_rate(make_loader(seed), batches) for seed in range(repeats)]
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]} | {"runs": runs}


def pipelines(split: TaskSplit, args: argparse.Namespace) -> list[dict]:
    tpb = args.tasks_per_batch
    array_rows, hf_rows = ArrayRowDataset(split), HFRowDataset(split)
    check_same_batches(split, [array_rows, hf_rows], tpb)
    candidates = (
        ("meta-io (MetaBatchDataset)", lambda w, s: meta_io_loader(split, tpb, w, s), split.num_tasks // tpb - 1),
        ("per-sample (arrays)", lambda w, s: per_sample_loader(array_rows, split, tpb, args.sample_batches, w, s),
         args.sample_batches),
        ("per-sample (HF rows)", lambda w, s: per_sample_loader(hf_rows, split, tpb, args.hf_batches, w, s),
         args.hf_batches),
    )
    results = []
    for name, make, batches in candidates:
        for workers in (0, 1):
            rate = median_rate(partial(make, workers), batches, args.repeats)
            results.append({"pipeline": name, "num_workers": workers, "timed_batches": batches, **rate})
            print(f"{name:28s} workers={workers}  {rate['tasks_per_sec']:>12,.0f} tasks/s  "
                  f"{rate['rows_per_sec']:>12,.0f} rows/s", flush=True)
    return results


# -- training (worker processes under torch.distributed.run) ----------------------------------------


def train_worker(args: argparse.Namespace) -> None:
    """One rank of the meta-DLRM recipe's training; rank 0 writes the steady-state rate."""
    from lightning.pytorch import Callback, Trainer, seed_everything

    from lightning_dembed import HybridParallelStrategy
    from lightning_dembed.data import TaskDataModule
    from lightning_dembed.meta import MetaLearningLoop
    from lightning_dembed.models import DLRMModule

    class SteadyState(Callback):
        """Meta-batches per rank and second between two barriers, after ``warmup`` steps."""

        def __init__(self, warmup: int) -> None:
            self.warmup, self.start, self.seconds = warmup, 0.0, 0.0
            self.steps = self.tasks = self.rows = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            # global_step, not batch_idx: 4000 users make only 50 meta-batches per rank and epoch.
            if trainer.global_step == self.warmup:
                trainer.strategy.barrier()
                self.start = time.perf_counter()
            elif trainer.global_step > self.warmup:
                self.steps += 1
                self.tasks += batch.num_tasks
                self.rows += batch.num_rows

        def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
            trainer.strategy.barrier()
            self.seconds = time.perf_counter() - self.start

    seed_everything(0)
    # The recipe's data, model, optimizer and meta section (meta_dlrm_synthetic).
    data = TaskDataModule(store_dir=str(Path(args.work_dir) / "recipe_store"), num_users=4000,
                          tasks_per_batch=args.tasks_per_batch, num_workers=1)
    model = DLRMModule(data.tables(), num_dense_features=data.num_dense_features, dense_arch_layer_sizes=(32, 16),
                       over_arch_layer_sizes=(64, 32, 1), optimizer=partial(torch.optim.Adagrad, lr=0.05, eps=1e-8))
    loop = MetaLearningLoop(algorithm="maml", inner_steps=1, inner_lr=0.1, adapt=("dlrm.over_arch",),
                            adapt_embeddings=("user_id",))
    timer = SteadyState(args.warmup)
    trainer = Trainer(strategy=HybridParallelStrategy(), accelerator="cpu", devices=args.devices,
                      max_steps=args.warmup + args.train_steps, limit_val_batches=0, num_sanity_val_steps=0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[loop, timer])
    trainer.fit(model, datamodule=data)
    if trainer.is_global_zero:
        record = {
            "timed_steps": timer.steps, "seconds": timer.seconds, "world_size": trainer.world_size,
            "meta_batches_per_sec_per_rank": timer.steps / timer.seconds,
            "tasks_per_sec_per_rank": timer.tasks / timer.seconds,
            "rows_per_sec_per_rank": timer.rows / timer.seconds,
            "global_tasks_per_sec": timer.tasks * trainer.world_size / timer.seconds,
        }
        Path(args.worker_out).write_text(json.dumps(record))


def training(args: argparse.Namespace, work_dir: Path) -> dict:
    out = work_dir / "training.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.devices}",
               str(Path(__file__).resolve()), "--worker-out", str(out), "--work-dir", str(work_dir),
               "--tasks-per-batch", str(args.tasks_per_batch), "--train-steps", str(args.train_steps),
               "--warmup", str(args.warmup), "--devices", str(args.devices)]
    # One thread per rank when the ranks fill the machine (torch.distributed.run's own default is 1).
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.devices)))
    proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": threads}, cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training run failed:\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text()) | {"omp_num_threads": threads, "command": " ".join(command[:6])}


# -- report ------------------------------------------------------------------------------------------


def report(record: dict) -> str:
    rows = record["pipelines"]
    meta_io = {r["num_workers"]: r for r in rows if r["pipeline"].startswith("meta-io")}
    best_sample = {w: max((r for r in rows if r["num_workers"] == w and r["pipeline"].startswith("per-sample")),
                          key=lambda r: r["tasks_per_sec"]) for w in (0, 1)}
    m = record["machine"]
    lines = [
        "# Meta-IO throughput", "",
        f"{m['date']}, {m['cpu_model']}, {m['cpu_count']} CPUs, {m['ram_gib']} GiB RAM, torch "
        f"{m['versions'].get('torch')}, torchrec {m['versions'].get('torchrec')}, lightning "
        f"{m['versions'].get('lightning')}; 1-minute load average before the run {record['load_average_before']:.2f}.",
        "", f"Command: `{record['command']}`", "",
        f"## Pipelines: {record['tasks_per_batch']} tasks per meta-batch, {record['store']['train_tasks']} tasks / "
        f"{record['store']['train_rows']} rows ({record['store']['train_rows'] / record['store']['train_tasks']:.1f} "
        f"rows per task), {len(CATEGORICAL)} sparse + {len(DENSE)} dense features", "",
        markdown_table(
            ["pipeline", "workers", "tasks/s", "rows/s", "meta-batches/s", "Meta-IO / this"],
            [[r["pipeline"], r["num_workers"], r["tasks_per_sec"], r["rows_per_sec"], r["batches_per_sec"],
              None if r["pipeline"].startswith("meta-io") else meta_io[r["num_workers"]]["tasks_per_sec"]
              / r["tasks_per_sec"]] for r in rows],
        ), "",
    ]
    for w in (0, 1):
        lines.append(f"- {w} worker(s): Meta-IO is {meta_io[w]['tasks_per_sec'] / best_sample[w]['tasks_per_sec']:,.1f}x "
                     f"the fastest per-sample pipeline ({best_sample[w]['pipeline']}); target >= 10x.")
    train = record.get("training")
    if train:
        consumed = train["meta_batches_per_sec_per_rank"]
        lines += [
            "", f"## What training consumes (meta-DLRM recipe, {train['world_size']} gloo processes, "
            f"OMP_NUM_THREADS={train['omp_num_threads']}, {train['timed_steps']} timed steps)", "",
            markdown_table(
                ["", "meta-batches/s per rank", "tasks/s per rank", "rows/s per rank"],
                [["training (steady state)", consumed, train["tasks_per_sec_per_rank"], train["rows_per_sec_per_rank"]]]
                + [[f"Meta-IO loader, {w} worker(s)", meta_io[w]["batches_per_sec"], meta_io[w]["tasks_per_sec"],
                    meta_io[w]["rows_per_sec"]] for w in (0, 1)],
            ), "",
        ]
        for w in (0, 1):
            lines.append(f"- Meta-IO with {w} worker(s) delivers {meta_io[w]['batches_per_sec'] / consumed:,.1f}x the "
                         "meta-batches a rank consumes; target >= 3x.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-users", type=int, default=20000, help="generated users (tasks) of the pipeline store")
    parser.add_argument("--tasks-per-batch", type=int, default=32)
    parser.add_argument("--sample-batches", type=int, default=30, help="timed meta-batches, per-sample (arrays)")
    parser.add_argument("--hf-batches", type=int, default=6, help="timed meta-batches, per-sample (HF rows)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=50, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=10, help="training steps before the clock starts")
    parser.add_argument("--devices", type=int, default=2, help="training processes")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--out", type=Path, default=results_dir() / "meta_io.json",
                        help="JSON path, the .md and .svg beside it")
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        train_worker(args)
        return

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = write_interactions(SyntheticTaskConfig(num_users=args.num_users, num_dense=len(DENSE), seed=0),
                                    work / "interactions.parquet")
        store = build_task_store(source, work / "store", task_key="user_id", categorical=CATEGORICAL,
                                 num_embeddings={c: 8192 for c in CATEGORICAL}, dense=DENSE, label="label",
                                 time_column="timestamp", holdout_fraction=0.2)
        record: dict[str, Any] = {
            "benchmark": "meta_io", "command": command_line(), "machine": machine_info(REPO), "load_average_before": load,
            "tasks_per_batch": args.tasks_per_batch,
            "store": {"train_tasks": store.train.num_tasks, "train_rows": store.train.num_rows},
            "pipelines": pipelines(store.train, args),
        }
        if not args.skip_training:
            record["training"] = training(args, work)
            print(json.dumps(record["training"]), flush=True)
    record["load_average_after"] = os.getloadavg()[0]
    write_results(args.out, record, report)


if __name__ == "__main__":
    main()
