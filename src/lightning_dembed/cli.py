"""The ``lightning-dembed`` console command.

    lightning-dembed recipes                                   # the recipes and configs that ship
    lightning-dembed cp dlrm_synthetic_tiny my_tiny.yaml       # a config to edit
    lightning-dembed run dlrm_synthetic_tiny --devices 2 [-- --trainer.max_steps=50]
    lightning-dembed run my_tiny.yaml --devices 2              # any YAML that names its recipe
    lightning-dembed preprocess-criteo --input day_0 --output data/criteo --num-embeddings 100000
    lightning-dembed consolidate checkpoints/last.ckpt last-full.ckpt
    lightning-dembed plan dlrm_synthetic_medium --world-size 128 [--json] [-- overrides]

``run`` starts the recipe a config names (``recipe: dlrm``, or ``--recipe``) on N local processes
per node through torch's elastic launcher (``torch.distributed.run``, what ``torchrun`` and
``fabric run`` use); Lightning reads the ranks it sets. Anything after ``--`` is passed to the
recipe as LightningCLI overrides, as is any option ``run`` does not know itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:  # torch is imported only by the commands that need it: `recipes` and `cp` start fast
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

__all__ = ["main"]


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    from jsonargparse import ArgumentError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as elastic_main

    from lightning_dembed.recipes import check_config, config_path, recipe_of

    try:
        config = config_path(args.config)
        recipe = recipe_of(config, args.recipe)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"lightning-dembed run: {error}") from None
    recipe_args = [
        "fit", "--config", str(config), f"--trainer.devices={args.devices}", f"--trainer.num_nodes={args.num_nodes}",
        *overrides,
    ]
    # Checked here, once, before any process starts: a config error is one message, not one per rank.
    try:
        check_config(recipe, recipe_args)
    except ArgumentError as error:
        raise SystemExit(
            f"lightning-dembed run: {config} (with {' '.join(overrides) or 'no overrides'}):\n{error}\n"
            f"The recipe's options: python -m lightning_dembed.recipes.{recipe} fit --help"
        ) from None
    launcher = [
        f"--nproc-per-node={args.devices}",
        f"--nnodes={args.num_nodes}",
        f"--node-rank={args.node_rank}",
        f"--master-addr={args.main_address}",
        f"--master-port={args.main_port}",
        "--module",
    ]
    try:
        elastic_main([*launcher, f"lightning_dembed.recipes.{recipe}", *recipe_args])
    except ChildFailedError as failed:
        raise SystemExit(_first_failure(failed)) from None
    return 0


def _first_failure(failed: ChildFailedError) -> str:
    """The traceback of the rank that failed first, to be the last thing the launcher prints.

    torch's own pick (`ChildFailedError.get_first_failure`) compares timestamps in whole seconds, so the
    rank that only lost its peer ("Connection closed by peer") ties with, and often wins over, the rank
    that raised. The recipes' ``@record`` writes each failing rank's traceback to an error file the
    moment it raises: the oldest file is the root cause. Ranks the launcher stopped write none.
    """
    import os

    written = {rank: f for rank, f in failed.failures.items() if os.path.isfile(f.error_file)}
    if written:
        rank = min(written, key=lambda r: os.stat(written[r].error_file).st_mtime_ns)
    else:
        rank, _ = failed.get_first_failure()
    failure = failed.failures[rank]
    message = failure.message
    if isinstance(message, dict):
        message = message.get("extraInfo", {}).get("py_callstack") or message.get("message", "")
    return (
        f"lightning-dembed run: rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) failed first, "
        f"exit code {failure.exitcode}; its error:\n{message or '(no error file: see its output above)'}"
    )


def _recipes() -> int:
    from lightning_dembed.recipes import RECIPES, recipe_of, shipped_configs

    print("recipes:")
    for name, what in RECIPES.items():
        print(f"  {name:<12} {what}")
    print("configs (lightning-dembed run NAME, lightning-dembed cp NAME DEST):")
    for name, path in sorted(shipped_configs().items()):
        print(f"  {name:<24} recipe {recipe_of(path)}")
    return 0


def _copy(args: argparse.Namespace) -> int:
    import shutil

    import yaml

    from lightning_dembed.recipes import config_path

    source = config_path(args.name)
    destination = Path(args.destination)
    if destination.is_dir():
        destination = destination / source.name
    if destination.exists():
        raise SystemExit(f"{destination} exists; choose another destination")
    # The base the config names travels with it (same relative path), so the copy runs from anywhere.
    base_name = (yaml.safe_load(source.read_text()) or {}).get("base")
    if base_name is not None:
        base, base_copy = source.parent / base_name, destination.parent / base_name
        if base_copy.exists() and base_copy.read_bytes() != base.read_bytes():
            raise SystemExit(
                f"{base_copy} exists and differs from the shipped {base_name}, which {source.name} builds on; "
                "copy to another directory, or remove it"
            )
        shutil.copyfile(base, base_copy)
    shutil.copyfile(source, destination)
    print(f"wrote {destination}" + (f" and {base_copy}" if base_name is not None else "")
          + f": run it with `lightning-dembed run {destination}`")
    return 0


def _preprocess_criteo(argv: list[str]) -> int:
    from lightning_dembed.data.criteo import preprocess_main

    preprocess_main(argv)
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    from lightning_dembed.checkpoint import consolidate_checkpoint

    consolidate_checkpoint(args.checkpoint, args.output)
    print(f"wrote {args.output}")
    return 0


def _plan(args: argparse.Namespace, overrides: list[str]) -> int:
    import json

    from lightning_dembed.dry_run import dry_run
    from lightning_dembed.strategies.hybrid_parallel import parse_bytes

    device = args.device
    memory = parse_bytes(args.memory_per_rank or ("80GiB" if device == "cuda" else "64GiB"))
    from lightning_dembed.recipes import config_path

    result = dry_run(
        config_path(args.config), args.world_size, args.local_world_size or min(args.world_size, 8), device, memory,
        overrides, placement=args.placement, row_slice_threshold=args.row_slice_threshold,
        column_slice_threshold=args.column_slice_threshold, data_parallel_threshold=args.data_parallel_threshold,
        offload=args.offload,
    )
    if args.json:
        print(json.dumps({**result.summary.as_dict(), "fits": result.error is None, "error": result.error}))
    else:
        print(result.summary)
        if result.error:
            print(f"does not fit: {result.error}")
    return 0 if result.error is None else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, overrides = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="lightning-dembed", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("recipes", help="list the recipes and configs that ship with the package")
    cp = sub.add_parser("cp", help="copy a shipped config, to edit")
    cp.add_argument("name", help="a shipped config (see `lightning-dembed recipes`)")
    cp.add_argument("destination", help="a file or a directory")

    run = sub.add_parser("run", help="run a config on N processes (per node)")
    run.add_argument("config", help="a shipped config's name, or a YAML file that names its recipe")
    run.add_argument("--recipe", default=None, help="the recipe, when the YAML does not name one")
    run.add_argument("--devices", type=int, default=1, help="processes per node (one per GPU, or CPU processes)")
    run.add_argument("--num-nodes", type=int, default=1)
    run.add_argument("--node-rank", type=int, default=0)
    run.add_argument("--main-address", default="127.0.0.1", help="address of node 0")
    run.add_argument("--main-port", type=int, default=29500)

    sub.add_parser("preprocess-criteo", help="convert Criteo TSV files to Arrow (see --help)", add_help=False)

    consolidate = sub.add_parser("consolidate", help="sharded checkpoint -> one plain Lightning checkpoint")
    consolidate.add_argument("checkpoint")
    consolidate.add_argument("output")

    plan = sub.add_parser("plan", help="plan a config's tables for N ranks, without the cluster")
    plan.add_argument("config", help="a shipped config's name or a YAML file (its data section decides the tables)")
    plan.add_argument("--world-size", type=int, required=True)
    plan.add_argument("--local-world-size", type=int, default=None, help="ranks per host (default min(N, 8))")
    plan.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    plan.add_argument("--memory-per-rank", default=None, help="e.g. 80GiB (default: 80GiB cuda, 64GiB cpu)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--placement", choices=["basic", "memory_balanced", "memory_optimized"], default=None,
                      help="Merlin placement (fast for thousands of tables); default: the config's strategy")
    plan.add_argument("--row-slice-threshold", type=int, default=None)
    plan.add_argument("--column-slice-threshold", type=int, default=None)
    plan.add_argument("--data-parallel-threshold", type=int, default=None)
    plan.add_argument("--offload", choices=["uvm", "uvm_caching"], default=None,
                      help="GPU plans: the largest tables that do not fit go to host memory with this kernel")

    if argv[:1] == ["preprocess-criteo"]:
        return _preprocess_criteo(argv[1:] + overrides)
    args, unknown = parser.parse_known_args(argv)
    if args.command == "run":
        # LightningCLI overrides such as --trainer.max_steps=50 may also come without "--".
        return _run(args, unknown + overrides)
    if args.command == "plan":
        return _plan(args, unknown + overrides)
    if args.command == "recipes":
        return _recipes()
    if args.command == "cp":
        return _copy(args)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return _consolidate(args)


if __name__ == "__main__":
    sys.exit(main())
