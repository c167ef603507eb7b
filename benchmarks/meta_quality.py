"""Cold-start quality of meta-DLRM against plain DLRM, over a family of synthetic users.

    OMP_NUM_THREADS=1 python benchmarks/meta_quality.py                 # defaults below
    python benchmarks/meta_quality.py --heterogeneity 0 2 --seeds 0 --methods plain maml
    python benchmarks/meta_quality.py --movielens ~/data/ml-100k         # a real data set instead
    python benchmarks/meta_quality.py --combine a/meta_quality.json b/meta_quality.json  # parts side by side

For each heterogeneity level (`SyntheticTaskConfig.heterogeneity`: how much users differ, 0 =
every user alike) and seed (of the generated users, the cold-start holdout and the training), the
shipped recipes run in this process, one after the other, on one device and the same task store:

- ``plain``: the shipped ``dlrm_tasks_synthetic`` config (plain DLRM on the training users'
  rows), tested as is on the checkpoint with the best validation AUC as is;
- ``plain+ft``: the same training run, tested fine-tuned on each cold user's support set (the same
  inner loop as meta-DLRM, `ColdStartEvaluation`) on the checkpoint with the best fine-tuned
  validation AUC; the fine-tuning steps and rate are chosen on the validation users among
  ``--finetune-grid``, so the baseline is tuned as a practitioner would tune it;
- ``maml``, ``fomaml``, ``anil``, ``metasgd``: the shipped ``meta_dlrm_synthetic`` config with
  MAML (one inner rate), first-order MAML, only the last layer adapting and no embedding offsets
  (ANIL), or learned inner rates (Meta-SGD, the config as shipped); adapted on each cold user's
  support set, on the checkpoint with the best adapted validation AUC.

and, on generated users only, the ceilings that knowing the generator gives (`ceilings`):

- ``bayes-shared``: the Bayes predictive click probability of a user known only by their
  features (their own bias and taste averaged out under the true prior): about the best any
  model scored as is can do;
- ``bayes-adapted``: the same after the user's support rows (Laplace posterior of their bias and
  taste, item factors known): about the best adaptation on the support set can do.

With ``--movielens DIR`` the ``*_movielens`` configs run on that directory instead (one level,
named after it; no ceilings).

Every method keeps the configs' model selection (best validation checkpoint, early stopping) and
is scored on every query row of the same test users (the validation users are the other half of
the cold-start users). Reported per level and method: query AUC and query log loss (mean over
users of their mean), mean and standard deviation over seeds, and meta-DLRM's AUC gain over the
best plain baseline with its spread over seeds (per-seed differences).

Writes ``benchmarks/results/<date>_<machine>/meta_quality.{json,md,svg}`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import command_line, machine_info, markdown_table, results_dir, write_results  # noqa: E402

METHODS = ("plain", "plain+ft", "maml", "fomaml", "anil", "metasgd", "bayes-shared", "bayes-adapted")
# What knowing the generator gives (synthetic data only): the ceilings no trained model can pass.
CEILINGS = ("bayes-shared", "bayes-adapted")
# Overrides of the shipped meta config per method: only the algorithm differs (shipped: Meta-SGD).
META_OVERRIDES = {
    "maml": ["--meta.algorithm=maml", "--meta.learn_inner_lr=false"],
    "fomaml": ["--meta.algorithm=fomaml", "--meta.learn_inner_lr=false"],
    "anil": ["--meta.algorithm=maml", "--meta.learn_inner_lr=false", "--meta.adapt=[dlrm.over_arch.model.1]",
             "--meta.adapt_embeddings=[]"],
    "metasgd": ["--meta.algorithm=maml", "--meta.learn_inner_lr=true"],
}


@contextlib.contextmanager
def _inside(directory: Path) -> Iterator[None]:
    """Run a recipe with its relative output paths (checkpoints) under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    previous = Path.cwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)


def _data_args(args: argparse.Namespace, heterogeneity: float) -> list[str]:
    if args.movielens is not None:
        return [f"--data.init_args.interactions={args.movielens}"]
    return [f"--data.init_args.num_users={args.num_users}",
            f"--data.init_args.synthetic={{heterogeneity: {heterogeneity}}}"]


def _common_args(args: argparse.Namespace, heterogeneity: float, seed: int, store: Path) -> list[str]:
    return [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        *_data_args(args, heterogeneity),
        f"--data.init_args.store_dir={store}",
        "--data.init_args.num_workers=0",
        *([f"--data.init_args.holdout_seed={seed}"] if args.vary_holdout else []),
        *args.override,
    ]


def _scores(metrics: dict[str, float], kind: str) -> dict[str, float]:
    return {
        "auc": float(metrics[f"test/query_auc_{kind}"]),
        "user_auc": float(metrics[f"test/query_user_auc_{kind}"]),
        "log_loss": float(metrics[f"test/query_loss_{kind}"]),
    }


def run_plain(args: argparse.Namespace, common: list[str], workdir: Path) -> dict[str, dict[str, Any]]:
    """Plain DLRM: as is and fine-tuned, each on its own best validation checkpoint."""
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_dembed.meta import ColdStartEvaluation, MetaLearningConfig
    from lightning_dembed.models import DLRMModule
    from lightning_dembed.recipe import RecipeCLI
    from lightning_dembed.recipes import config_path

    with _inside(workdir):
        start = time.perf_counter()
        plain_args = [a for a in common if not a.startswith("--meta.")]  # the meta section is meta-DLRM's
        config = config_path(f"dlrm_tasks_{args.data_name}")
        cli = RecipeCLI(DLRMModule, LightningDataModule, run=False,
                        args=["--config", str(config), *plain_args])
        trainer, model, data = cli.trainer, cli.model, cli.datamodule
        # The shipped config selects by the fine-tuned AUC; the as-is baseline gets its own selection.
        as_is = ModelCheckpoint(dirpath="as_is", monitor="val/query_auc_unadapted", mode="max", save_top_k=1)
        trainer.callbacks.append(as_is)
        trainer.fit(model, datamodule=data)
        steps = trainer.global_step
        # Read before testing: loading a checkpoint restores the callbacks' state as it was saved.
        as_is_ckpt, best_ckpt = as_is.best_model_path, trainer.checkpoint_callback.best_model_path
        unadapted = trainer.test(model, datamodule=data, ckpt_path=as_is_ckpt, verbose=False)[0]

        evaluation = next(c for c in trainer.callbacks if isinstance(c, ColdStartEvaluation))
        shipped = evaluation.config
        chosen, chosen_auc = shipped, -1.0
        for inner_steps, inner_lr in args.finetune_grid:
            evaluation.config = MetaLearningConfig(
                inner_steps=inner_steps, inner_lr=inner_lr, adapt=shipped.adapt,
                adapt_embeddings=shipped.adapt_embeddings,
            )
            val = trainer.validate(model, datamodule=data, ckpt_path=best_ckpt, verbose=False)[0]
            if val["val/query_auc_adapted"] > chosen_auc:
                chosen, chosen_auc = evaluation.config, val["val/query_auc_adapted"]
        evaluation.config = chosen
        finetuned = trainer.test(model, datamodule=data, ckpt_path=best_ckpt, verbose=False)[0]
        seconds = time.perf_counter() - start
    return {
        "plain": {**_scores(unadapted, "unadapted"), "steps": steps, "seconds": seconds,
                  "best_checkpoint": Path(as_is_ckpt).name},
        "plain+ft": {**_scores(finetuned, "adapted"), "steps": steps, "seconds": seconds,
                     "best_checkpoint": Path(best_ckpt).name,
                     "finetune": {"inner_steps": chosen.inner_steps, "inner_lr": chosen.inner_lr}},
    }


def run_meta(args: argparse.Namespace, method: str, common: list[str], workdir: Path) -> dict[str, Any]:
    """Meta-DLRM by one algorithm, adapted, on its best validation checkpoint."""
    from lightning.pytorch import LightningDataModule

    from lightning_dembed.models import DLRMModule
    from lightning_dembed.recipes import config_path
    from lightning_dembed.recipes.meta_dlrm import MetaRecipeCLI

    with _inside(workdir):
        start = time.perf_counter()
        cli = MetaRecipeCLI(DLRMModule, LightningDataModule, run=False,
                            args=["--config", str(config_path(f"meta_dlrm_{args.data_name}")), *common,
                                  *META_OVERRIDES[method]])
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        best_ckpt = cli.trainer.checkpoint_callback.best_model_path
        metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best_ckpt,
                                   verbose=False)[0]
        return {**_scores(metrics, "adapted"), "unadapted": _scores(metrics, "unadapted"),
                "steps": cli.trainer.global_step, "seconds": time.perf_counter() - start,
                "best_checkpoint": Path(best_ckpt).name}


def _query_scores(clicks: Any, labels: Any, users: Any, label_noise: float) -> dict[str, float]:
    """AUC and mean-over-users log loss of click probabilities (before the generator's label noise)."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    clicks, labels, users = (torch.as_tensor(a) for a in (clicks, labels, users))
    p = _with_label_noise(clicks, label_noise)
    losses = torch.nn.functional.binary_cross_entropy(p, labels.double(), reduction="none")
    _, user_index = torch.unique(users, return_inverse=True)
    per_user = torch.zeros(int(user_index.max()) + 1, dtype=losses.dtype).index_add_(0, user_index, losses)
    counts = torch.bincount(user_index).to(losses.dtype)
    return {"auc": float(binary_auroc(p, labels.long())), "log_loss": float((per_user / counts).mean())}


def _with_label_noise(clicks: Any, label_noise: float) -> Any:
    """The probability of a positive label: the generator flips labels to a coin at rate label_noise."""
    return (1 - label_noise) * clicks + label_noise / 2


def _predictive(mean: Any, variance: Any) -> Any:
    """E[sigmoid(z)] for z ~ N(mean, variance), by the probit approximation (MacKay 1992)."""
    import torch

    return torch.sigmoid(mean / torch.sqrt(1 + torch.pi * variance / 8))


def ceilings(
    args: argparse.Namespace, heterogeneity: float, seed: int, store_dir: Path
) -> dict[str, dict[str, Any]]:
    """About the best scores possible on the same test users' query rows, from the generator's click model.

    Both are Bayes predictive probabilities under the generator's true model and prior, item factors
    known. ``bayes-shared``: for a user known only by their features (item, brand, hour, context
    and the segment's share of the taste), their own click bias and taste averaged out under the
    prior: what a model scored as is can at best do. ``bayes-adapted``: the same after observing the
    user's support rows, by a Laplace approximation of the posterior of their bias and taste: what
    adaptation on the support set can at best do. (Probit and Laplace approximations: close to,
    not exactly, the Bayes optimum.)
    """
    import numpy as np
    import torch

    from lightning_dembed.data import SyntheticTaskConfig, TaskStore, generate_with_click_model

    start = time.perf_counter()
    if not (store_dir / "stats.json").is_file():
        raise FileNotFoundError(
            f"{store_dir}: no task store; the ceilings score its test users. Run a model method in the same "
            "command, or pass the --workdir of a run that did"
        )
    config = SyntheticTaskConfig(num_users=args.num_users, heterogeneity=heterogeneity, seed=seed)
    table, truth = generate_with_click_model(config)
    store = TaskStore.load(store_dir)
    cold, stats = store.cold_start, store.stats
    built = {k: stats["config"].get(k) for k in ("support_size", "split", "query_size")}
    shipped = {"support_size": 0.5, "split": "time", "query_size": None}
    if built != shipped or stats["input_rows"] != table.num_rows:
        raise ValueError(
            f"{store_dir}: the ceilings regenerate the users of the shipped config (time split, "
            f"support_size 0.5, every later row a query; {table.num_rows} rows) but the store was built "
            f"with {built} from {stats['input_rows']} rows: drop the data overrides for the ceilings"
        )
    test_users = cold.task_range(cold.num_tasks // 2, cold.num_tasks).keys

    user, timestamp = table["user_id"].to_numpy(), table["timestamp"].to_numpy()
    rows = np.flatnonzero(np.isin(user, test_users))
    rows = rows[np.lexsort((timestamp[rows], user[rows]))]  # each user's rows in time order
    users, first, counts = np.unique(user[rows], return_index=True, return_counts=True)
    position = np.arange(rows.size) - np.repeat(first, counts)
    support = position < np.repeat(np.maximum(counts // 2, 1), counts)  # as the store's support_size 0.5

    labels = torch.as_tensor(table["label"].to_numpy()[rows], dtype=torch.float64)
    shared = torch.as_tensor(truth.global_logit[rows] + heterogeneity * truth.segment_logit[rows])
    user_index = torch.as_tensor(np.searchsorted(users, user[rows]))
    # Per user: a click bias and their own taste over the item factors, with the generator's prior.
    features = torch.cat([torch.ones(rows.size, 1, dtype=torch.float64),
                          torch.as_tensor(truth.item_factors[rows])], dim=1)
    prior = torch.tensor([truth.bias_variance] + [truth.own_taste_variance] * config.latent_dim,
                         dtype=torch.float64) * max(heterogeneity, 1e-6) ** 2
    weights = torch.zeros(users.size, features.shape[1], dtype=torch.float64, requires_grad=True)
    on_support = torch.as_tensor(support)
    noise = config.label_noise

    def noisy_click(logits: torch.Tensor) -> torch.Tensor:
        return _with_label_noise(torch.sigmoid(logits), noise)

    def negative_log_posterior() -> torch.Tensor:
        optimizer.zero_grad()
        logits = shared[on_support] + (weights[user_index[on_support]] * features[on_support]).sum(1)
        clicks = noisy_click(logits)
        loss = torch.nn.functional.binary_cross_entropy(clicks, labels[on_support], reduction="sum")
        loss = loss + (weights**2 / (2 * prior)).sum()
        loss.backward()
        return loss

    optimizer = torch.optim.LBFGS([weights], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")
    optimizer.step(negative_log_posterior)
    mode = weights.detach()

    # Laplace: the posterior's covariance is the inverse Hessian of the negative log posterior at its mode.
    mode_logits = (shared + (mode[user_index] * features).sum(1)).requires_grad_(True)
    row_loss = torch.nn.functional.binary_cross_entropy(noisy_click(mode_logits), labels, reduction="none")
    (slope,) = torch.autograd.grad(row_loss.sum(), mode_logits, create_graph=True)
    (curvature,) = torch.autograd.grad(slope.sum(), mode_logits)
    curvature = torch.where(on_support, curvature.clamp(min=0), 0.0)  # the noisy likelihood can bend down
    outer = curvature[:, None, None] * features[:, :, None] * features[:, None, :]
    hessian = torch.zeros(users.size, *outer.shape[1:], dtype=torch.float64).index_add_(0, user_index, outer)
    covariance = torch.linalg.inv(hessian + torch.diag(1 / prior))

    query = ~support
    x, u = features[query], user_index[query]
    shared_click = _predictive(shared[query], (x * x * prior).sum(1))
    adapted_click = _predictive(
        shared[query] + (mode[u] * x).sum(1), torch.einsum("ni,nij,nj->n", x, covariance[u], x)
    )
    query_users = users[u]
    common = {"steps": None, "seconds": time.perf_counter() - start}
    return {
        "bayes-shared": {**_query_scores(shared_click, labels[query], query_users, noise), **common},
        "bayes-adapted": {**_query_scores(adapted_click, labels[query], query_users, noise), **common},
    }


def _mean_or_none(values: list[Optional[float]]) -> Optional[float]:
    return None if None in values else statistics.fmean(values)  # type: ignore[arg-type]


def _mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per level and method, and each meta method's gain over plain's best."""
    rows = []
    for level in sorted({r["heterogeneity"] for r in runs}):
        at = [r for r in runs if r["heterogeneity"] == level]
        seeds = sorted({r["seed"] for r in at})
        score = {(r["method"], r["seed"]): r for r in at}
        plain = [m for m in ("plain", "plain+ft") if m in methods]
        # Best plain baseline at this level: the one with the higher mean AUC over seeds.
        best_plain = (
            max(plain, key=lambda m: statistics.fmean(score[m, s]["auc"] for s in seeds)) if plain else None
        )
        for method in methods:
            aucs = [score[method, s]["auc"] for s in seeds]
            losses = [score[method, s]["log_loss"] for s in seeds]
            row = {"heterogeneity": level, "method": method, "seeds": len(seeds),
                   "auc": _mean_std(aucs), "log_loss": _mean_std(losses),
                   "steps": _mean_or_none([score[method, s]["steps"] for s in seeds])}
            # Per-user AUC: in runs since 2026-12-02, and not for the ceilings.
            has_user_auc = all("user_auc" in score[method, s] for s in seeds)
            if has_user_auc:
                row["user_auc"] = _mean_std([score[method, s]["user_auc"] for s in seeds])
            if best_plain is not None and method not in plain:
                row["vs_best_plain"] = best_plain
                row["auc_gain"] = _mean_std(
                    [score[method, s]["auc"] - score[best_plain, s]["auc"] for s in seeds]
                )
                if has_user_auc and all("user_auc" in score[best_plain, s] for s in seeds):
                    row["user_auc_gain"] = _mean_std(
                        [score[method, s]["user_auc"] - score[best_plain, s]["user_auc"] for s in seeds]
                    )
                row["log_loss_change"] = _mean_std(
                    [score[method, s]["log_loss"] - score[best_plain, s]["log_loss"] for s in seeds]
                )
            rows.append(row)
    return rows


def _pm(value: tuple[float, Optional[float]], signed: bool = False) -> str:
    mean, std = value
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text if std is None else f"{text} ± {std:.3f}"


def report(record: dict[str, Any]) -> str:
    rows = [
        [r["heterogeneity"], r["method"], _pm(r["auc"]), _pm(r["log_loss"]),
         _pm(r["auc_gain"], signed=True) if "auc_gain" in r else "",
         _pm(r["log_loss_change"], signed=True) if "log_loss_change" in r else "",
         _pm(r["user_auc"]) if "user_auc" in r else "",
         _pm(r["user_auc_gain"], signed=True) if "user_auc_gain" in r else "",
         "" if r["steps"] is None else f"{r['steps']:.0f}"]
        for r in record["summary"]
    ]
    table = markdown_table(
        ["heterogeneity", "method", "query AUC", "query log loss", "AUC vs best plain",
         "log loss vs best plain", "per-user AUC", "per-user AUC vs best plain", "steps trained"],
        rows,
    )
    settings = record["settings"]
    data = (
        f"MovieLens ratings from `{settings['movielens']}`; seeds {settings['seeds']}"
        if settings.get("movielens")
        else f"{settings['num_users']} generated users per level and seed; seeds {settings['seeds']}"
    )
    return (
        "# Cold-start quality: meta-DLRM vs plain DLRM\n\n"
        f"`{record['command']}`\n\n"
        + "".join(f"- part: `{part}`\n" for part in record.get("parts", ()))
        + ("\n" if record.get("parts") else "")
        + data
        + "; mean ± standard deviation over seeds; 'vs best plain': "
        "per-seed difference to the better of plain and plain+ft at that level (mean AUC); 'per-user AUC': "
        "each test user's own query AUC, averaged over users (every user weighs alike).\n\n" + table + "\n"
    )


def combined(paths: list[Path], command: str) -> dict[str, Any]:
    """One record of the runs of several records made with the same settings but their levels or seeds."""
    records = [json.loads(path.read_text()) for path in paths]
    split_by = ("heterogeneity", "seeds")  # what parts run side by side may divide between them
    settings = {k: v for k, v in records[0]["settings"].items() if k not in split_by}
    for path, record in zip(paths, records):
        theirs = {k: v for k, v in record["settings"].items() if k not in split_by}
        if theirs != settings:
            raise ValueError(
                f"{path}: settings {theirs} differ from {paths[0]}'s {settings}; only levels and seeds may differ"
            )
    methods_of = [sorted({run["method"] for run in record["runs"]}) for record in records]
    for path, methods in zip(paths, methods_of):
        if methods != methods_of[0]:
            raise ValueError(f"{path} ran methods {methods}, {paths[0]} ran {methods_of[0]}; combine like with like")
    runs = [run for record in records for run in record["runs"]]
    keys = [(run["heterogeneity"], run["seed"], run["method"]) for run in runs]
    repeated = sorted({key for key in keys if keys.count(key) > 1}, key=str)
    if repeated:
        raise ValueError(f"runs (level, seed, method) {repeated} are in more than one of {paths}")
    methods = list(dict.fromkeys(run["method"] for run in runs))
    return {
        "benchmark": "meta_quality",
        "command": command,
        "parts": [record["command"] for record in records],
        "machine": records[0]["machine"],
        "settings": {
            **settings,
            "heterogeneity": sorted({run["heterogeneity"] for run in runs}),
            "seeds": sorted({run["seed"] for run in runs}),
        },
        "runs": runs,
        "summary": summarize(runs, methods),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heterogeneity", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--num-users", type=int, default=2000)
    parser.add_argument("--movielens", type=Path, default=None,
                        help="an unzipped MovieLens directory (ml-100k, ml-1m, ml-latest-small...): run the "
                        "*_movielens configs on it instead of generated users (one level, named after the directory)")
    parser.add_argument("--finetune-grid", type=lambda s: (int(s.split(":")[0]), float(s.split(":")[1])),
                        nargs="+", default=[(1, 0.1), (5, 0.1), (5, 0.5)],
                        help="inner_steps:inner_lr pairs tried for plain+ft on the validation users")
    parser.add_argument("--vary-holdout", action="store_true",
                        help="hold out other users with every seed (data.init_args.holdout_seed=SEED), so that "
                        "the spread over seeds covers which users are scored, not only training")
    parser.add_argument("--override", action="append", default=[],
                        help="a LightningCLI override for every run (--meta.* ones for meta-DLRM only), e.g. "
                        "--override=--trainer.max_steps=200 (repeat for more)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="task stores and checkpoints (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=results_dir() / "meta_quality.json")
    parser.add_argument("--combine", type=Path, nargs="+", default=None,
                        help="summarize the runs of these meta_quality.json files together (parts run "
                        "side by side, e.g. one per core with other --heterogeneity); runs nothing")
    args = parser.parse_args()
    args.data_name = "synthetic" if args.movielens is None else "movielens"
    if args.movielens is not None:
        args.heterogeneity = [args.movielens.name]  # the level column names the data set
        args.methods = [m for m in args.methods if m not in CEILINGS]  # no hidden truth to know
    if args.combine:
        write_results(args.out, combined(args.combine, command_line()), report)
        return

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_MODE", "offline")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="meta_quality_"))
    runs = []
    for heterogeneity in args.heterogeneity:
        for seed in args.seeds:
            where = workdir / f"h{heterogeneity}_s{seed}"
            common = _common_args(args, heterogeneity, seed, where / "task_store")
            results: dict[str, dict[str, Any]] = {}
            if {"plain", "plain+ft"} & set(args.methods):
                results.update(run_plain(args, common, where / "plain"))
            for method in args.methods:
                if method in META_OVERRIDES:
                    results[method] = run_meta(args, method, common, where / method)
            if set(CEILINGS) & set(args.methods):
                results.update(ceilings(args, heterogeneity, seed, where / "task_store"))
            for method in args.methods:
                run = {"heterogeneity": heterogeneity, "seed": seed, "method": method, **results[method]}
                runs.append(run)
                print(f"h={heterogeneity} seed={seed} {method}: {results[method]}", flush=True)
    record = {
        "benchmark": "meta_quality",
        "command": command_line(),
        "machine": machine_info(ROOT),
        "settings": {"heterogeneity": args.heterogeneity, "seeds": args.seeds,
                     "num_users": None if args.movielens is not None else args.num_users,
                     "movielens": None if args.movielens is None else str(args.movielens),
                     "finetune_grid": args.finetune_grid, "override": args.override,
                     "vary_holdout": args.vary_holdout},
        "runs": runs,
        "summary": summarize(runs, args.methods),
    }
    write_results(args.out, record, report)


if __name__ == "__main__":
    main()
