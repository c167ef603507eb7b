"""Samples/s of the data pipelines, through ``DataLoader(batch_size=None)`` with 0 and 1 workers.

    python benchmarks/data_pipeline.py
    python benchmarks/data_pipeline.py --batch-size 4096 --batches 40 --criteo-lines 400000

Measures `SyntheticClickDataset` for Merlin's Tiny and Small models (generation cost does not
depend on ``--scale``: no table is allocated, only the id ranges change), Criteo preprocessing
(generated TSV -> Arrow) and `ClickDataset` on the result. Each loader is timed after its first
batch (worker start-up excluded). Writes ``benchmarks/results/<date>_<machine>/data_pipeline.{json,md,svg}``
(``--out``) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_dembed.data import (
    SYNTHETIC_MODELS,
    ClickDataset,
    SyntheticClickDataset,
    preprocess,
    write_fake_criteo_tsv,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, results_dir, write_results  # noqa: E402


def loader_rate(data: IterableDataset, num_workers: int) -> tuple[float, int]:
    """(samples/s after the first batch, ids per sample)."""
    batches = iter(DataLoader(data, batch_size=None, num_workers=num_workers))
    first = next(batches)
    start = time.perf_counter()
    samples = sum(batch.labels.numel() for batch in batches)
    seconds = time.perf_counter() - start
    return samples / seconds, first.sparse_features.values().numel() // first.labels.numel()


def report(record: dict[str, Any]) -> str:
    rows = [[r["pipeline"], r["num_workers"], r["ids_per_sample"], r["samples_per_sec"]] for r in record["results"]]
    return (
        f"batch {record['batch_size']}, {record['machine']['cpu_count']} CPUs, {record['date']}\n\n"
        f"Command: `{record['command']}`\n\n"
        + markdown_table(["pipeline", "workers", "ids/sample", "samples/s"], rows) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per batch (per rank)")
    parser.add_argument("--batches", type=int, default=40, help="batches per measurement")
    parser.add_argument("--scale", type=float, default=0.01, help="synthetic table row scale")
    parser.add_argument("--criteo-lines", type=int, default=400_000, help="generated Criteo TSV lines")
    parser.add_argument("--out", type=Path, default=results_dir() / "data_pipeline.json",
                        help="JSON path, the .md and .svg beside it")
    args = parser.parse_args()

    rows = []
    for name in ("tiny", "small"):
        data = SyntheticClickDataset(SYNTHETIC_MODELS[name], args.batch_size, args.batches + 1, args.scale)
        for workers in (0, 1):
            rate, ids = loader_rate(data, workers)
            rows.append({"pipeline": f"synthetic {name} (scale {args.scale})", "num_workers": workers,
                         "ids_per_sample": ids, "samples_per_sec": rate})

    with tempfile.TemporaryDirectory() as tmp:
        tsv = Path(tmp) / "day_0"
        write_fake_criteo_tsv(tsv, args.criteo_lines, seed=0)
        start = time.perf_counter()
        preprocess([tsv], Path(tmp) / "pre", 10_000_000)
        seconds = time.perf_counter() - start
        rows.append({"pipeline": "criteo preprocess (TSV -> Arrow)", "num_workers": 0, "ids_per_sample": 26,
                     "samples_per_sec": args.criteo_lines / seconds,
                     "mb_per_sec": tsv.stat().st_size / 2**20 / seconds})
        for workers in (0, 1):
            data = ClickDataset(Path(tmp) / "pre", args.batch_size, shuffle=True)
            rate, ids = loader_rate(data, workers)
            rows.append({"pipeline": "criteo preprocessed reader (shuffled batches)", "num_workers": workers,
                         "ids_per_sample": ids, "samples_per_sec": rate})

    record = {
        "benchmark": "data_pipeline",
        "date": date.today().isoformat(),
        "command": " ".join(["python benchmarks/data_pipeline.py", *sys.argv[1:]]),
        "batch_size": args.batch_size,
        "batches": args.batches,
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "versions": {"torch": torch.__version__, "numpy": np.__version__, "pyarrow": pyarrow.__version__},
            "load_average_1min": os.getloadavg()[0],
        },
        "results": rows,
    }
    write_results(args.out, record, report)


if __name__ == "__main__":
    main()
