"""Lightning + `HybridParallelStrategy` against Lightning's `DDPStrategy` with the tables replicated.

    python benchmarks/vs_ddp.py                    # the defaults below
    python benchmarks/vs_ddp.py --repeats 1 --steps 20 --ddp-steps 2   # quick look

``--tables`` tables of ``--rows`` x ``--dim`` (default 1 GiB of fp32) and the same MLPs, batches
and optimizer as every comparison (see `harness`), trained by Lightning
  a) with ``HybridParallelStrategy`` (tables built on the meta device, sharded, fused Adagrad), and
  b) with ``DDPStrategy``: the same tables as plain ``nn.EmbeddingBag`` (dense gradients)
     replicated on every rank, Adagrad,
each in its own fresh processes, alternating over ``--repeats``. Reported: global samples/s and
every rank's peak RSS, and ``strategy_over_ddp_samples_per_s`` (target >= 5x) and
``strategy_over_ddp_peak_rss`` of the largest rank (target <= 0.6x).

Writes ``benchmarks/results/<date>_<machine>/vs_ddp.{json,md,svg}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import STRATEGY, Comparison, Ratio, RunConfig, main  # noqa: E402

HYBRID, DDP = f"memory/{STRATEGY}", "memory/lightning_ddp"


def parts(args: argparse.Namespace) -> dict[str, tuple[RunConfig, ...]]:
    sizes = dict(tables=args.tables, rows=args.rows, dim=args.dim, warmup=args.warmup)
    return {
        "memory": (
            RunConfig(HYBRID, (STRATEGY,), **sizes, steps=args.steps),
            RunConfig(DDP, ("lightning_ddp",), **sizes, steps=args.ddp_steps),
        )
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ddp-steps", type=int, default=6, help="timed steps of the DDP side (~5 s)")
    parser.set_defaults(tables=4, rows=2_097_152, dim=32, warmup=3, steps=100)


COMPARISON = Comparison(
    name="vs_ddp",
    title="HybridParallelStrategy vs DDPStrategy with replicated tables",
    parts=parts,
    ratios=(
        Ratio(
            "strategy_over_ddp_samples_per_s",
            HYBRID,
            STRATEGY,
            DDP,
            "lightning_ddp",
            "global_samples_per_s",
            ">= 5",
        ),
        Ratio("strategy_over_ddp_peak_rss (largest rank)", HYBRID, "", DDP, "", "peak_rss_mib", "<= 0.6"),
    ),  # fmt: skip
    add_arguments=add_arguments,
)

if __name__ == "__main__":
    main(COMPARISON)
