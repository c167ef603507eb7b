"""Lightning + `HybridParallelStrategy` against a hand-written TorchRec loop, on N CPU processes.

    python benchmarks/vs_torchrec_loop.py                          # the defaults below
    python benchmarks/vs_torchrec_loop.py --parts interleaved --steps 50 --repeats 1   # quick look

The same DLRM-like model (``--tables`` tables of ``--rows`` x ``--dim`` on the meta device + MLPs),
batches, sharding plan, sharders and optimizers (see `harness`) trained
  a) by Lightning with ``HybridParallelStrategy``, and
  b) by each baseline in `BASELINES`: TorchRec's own `TrainPipelineSparseDist` loop
     (`harness.TorchRecPipelineLoop`: the next batch's input all-to-alls overlap the current
     batch's compute), and the naive hand-written TorchRec loop (`harness.TorchRecLoop`:
     `DistributedModelParallel`, `apply_optimizer_in_backward`, `KeyedOptimizerWrapper`, no
     Lightning, no overlap).

Part "separate": each side in its own fresh processes. Part "interleaved": all sides in the same
processes (Lightning's), taking turns of ``--interleave`` steps, each turn timed between barriers;
on a machine whose speed drifts (a VM whose CPUs are shared) this is the comparison to trust.
Reported: global samples/s of every side and ``strategy_over_<baseline>_samples_per_s`` (separate
processes; interleaved; interleaved, median of paired turns), target per baseline.

A new baseline is one class with ``plan_rows`` and ``run(steps, watch)`` (`harness.BaselineLoop`)
and one more ``Baseline(...)`` line in `BASELINES`.

Writes ``benchmarks/results/<date>_<machine>/vs_torchrec_loop.{json,md,svg}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    Baseline,
    Comparison,
    TorchRecLoop,
    TorchRecPipelineLoop,
    baseline_parts,
    baseline_ratios,
    main,
)

BASELINES = (
    Baseline("torchrec_pipeline", TorchRecPipelineLoop, target=">= 1.0"),
    Baseline("torchrec_loop", TorchRecLoop, target=">= 0.95"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--interleave",
        type=int,
        default=5,
        help="interleaved part: steps per turn of each side (divides --steps)",
    )
    parser.set_defaults(tables=8, rows=200_000, dim=64, warmup=10, steps=150)


COMPARISON = Comparison(
    name="vs_torchrec_loop",
    title="HybridParallelStrategy vs a hand-written TorchRec loop",
    parts=lambda args: baseline_parts(args, BASELINES),
    ratios=baseline_ratios(BASELINES),
    add_arguments=add_arguments,
    baselines=BASELINES,
)

if __name__ == "__main__":
    main(COMPARISON)
