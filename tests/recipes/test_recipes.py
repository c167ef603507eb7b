"""Every shipped recipe config parses, and the small ones run end to end on 2 processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule

import lightning_dembed  # noqa: F401
from lightning_dembed.data import write_fake_criteo_tsv, write_fake_movielens
from lightning_dembed.meta import MetaLearningLoop
from lightning_dembed.models import DLRMModule
from lightning_dembed.recipe import RecipeCLI
from lightning_dembed.recipes import config_path, recipe_of, shipped_configs
from lightning_dembed.recipes.dlrm import __file__ as DLRM_RECIPE
from lightning_dembed.recipes.meta_dlrm import MetaRecipeCLI

ROOT = Path(__file__).parents[2]
CONFIGS = sorted(shipped_configs().values())
CLI = [sys.executable, "-m", "lightning_dembed.cli"]


def test_recipes_lists_and_cp_copies_a_config_that_runs_from_anywhere(tmp_path: Path) -> None:
    listing = subprocess.run([*CLI, "recipes"], capture_output=True, text=True, check=True).stdout
    assert "meta_dlrm_synthetic" in listing and "recipe meta_dlrm" in listing
    subprocess.run([*CLI, "cp", "dlrm_synthetic_tiny", str(tmp_path / "mine.yaml")], check=True, cwd=tmp_path)
    # A user's copy, anywhere, runs with the recipe it names.
    out = run(tmp_path, str(tmp_path / "mine.yaml"), "--trainer.max_steps=3", "--trainer.val_check_interval=3",
              "--data.init_args.train_batches=3", "--data.init_args.test_batches=1",
              "--trainer.logger=false", "--trainer.callbacks=[]")
    assert "HybridParallelStrategy sharding plan (2 ranks)" in out
    (tmp_path / "nameless.yaml").write_text("trainer:\n  max_steps: 1\n")
    proc = subprocess.run([*CLI, "run", str(tmp_path / "nameless.yaml")], capture_output=True, text=True)
    assert proc.returncode != 0 and "names no recipe" in proc.stderr


def test_configs_ship_in_the_wheel(tmp_path: Path) -> None:
    import zipfile

    import shutil

    # Built from a copy: the build leaves a build/ folder beside pyproject.toml.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, timeout=300)
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assert {f"lightning_dembed/recipes/configs/{c.name}" for c in CONFIGS} <= set(names)
    assert "lightning_dembed/recipes/dlrm.py" in names


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_instantiates(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.read_text().startswith(f"# lightning-dembed run {config.stem}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = ["--config", str(config), "--trainer.accelerator=cpu", "--trainer.devices=1"]
    if recipe_of(config) == "meta_dlrm":
        cli = MetaRecipeCLI(DLRMModule, LightningDataModule, run=False, args=args)
        assert any(isinstance(c, MetaLearningLoop) for c in cli.trainer.callbacks)
    else:
        cli = RecipeCLI(DLRMModule, LightningDataModule, run=False, args=args)
    assert cli.model.feature_names


def run(tmp_path: Path, config: str, *overrides: str) -> str:
    """``lightning-dembed run`` of a shipped config by name (``dlrm_synthetic_tiny``) or a YAML path."""
    proc = subprocess.run(
        [*CLI, "run", config, "--devices", "2", "--", *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def metric(output: str, name: str) -> float:
    return float(re.findall(rf"{re.escape(name)}\s+([0-9.]+)", output)[-1])


def test_dlrm_synthetic_tiny_learns(tmp_path: Path) -> None:
    out = run(tmp_path, "dlrm_synthetic_tiny", "--trainer.max_steps=60", "--trainer.val_check_interval=60",
              "--data.init_args.train_batches=60", "--data.init_args.test_batches=4")
    assert "HybridParallelStrategy sharding plan (2 ranks)" in out
    assert metric(out, "test/auc") > 0.6
    last = tmp_path / "outputs" / "checkpoints" / "dlrm-synthetic-tiny" / "last.ckpt"
    assert (last / "meta.pt").is_file()
    assert list((tmp_path / "outputs" / "wandb").glob("offline-run-*"))
    # The documented serve path: consolidate, then load_from_checkpoint into DLRMModule (tables on meta).
    subprocess.run([*CLI, "consolidate", str(last), str(tmp_path / "full.ckpt")], check=True, timeout=300)
    config = config_path("dlrm_synthetic_tiny")
    cli = RecipeCLI(DLRMModule, LightningDataModule, run=False,
                    args=["--config", str(config), "--trainer.accelerator=cpu", "--trainer.devices=1",
                          "--trainer.logger=false"])
    served = DLRMModule.load_from_checkpoint(tmp_path / "full.ckpt", tables=cli.datamodule.tables())
    assert not any(p.is_meta for p in served.parameters())
    saved = torch.load(tmp_path / "full.ckpt", weights_only=True)["state_dict"]
    for key, value in served.state_dict().items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize(
    "launcher",
    [
        [str(Path(sys.executable).parent / "fabric"), "run", "--accelerator=cpu", "--devices=2"],
        [sys.executable],  # one process: the config's devices overridden below
    ],
    ids=["fabric_run_2_processes", "python_1_process"],
)
def test_recipe_script_runs_under_other_launchers(tmp_path: Path, launcher: list[str]) -> None:
    devices = "2" if "fabric" in launcher[0] else "1"
    proc = subprocess.run(
        [*launcher, DLRM_RECIPE, "fit", "--config", str(config_path("dlrm_synthetic_tiny")), f"--trainer.devices={devices}",
         "--trainer.max_steps=5", "--trainer.val_check_interval=5", "--trainer.limit_val_batches=2",
         "--trainer.limit_test_batches=2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert f"HybridParallelStrategy sharding plan ({devices} ranks)" in out
    assert 0.0 <= metric(out, "test/auc") <= 1.0


def test_meta_dlrm_runs_and_reports_cold_start_auc(tmp_path: Path) -> None:
    # Meta-SGD on top of the config's MAML with adapted user offsets: the loop adds the learned rates.
    out = run(tmp_path, "meta_dlrm_synthetic", "--trainer.max_steps=20", "--trainer.val_check_interval=20",
              "--data.init_args.num_users=1200", "--data.init_args.num_workers=0", "--meta.learn_inner_lr=true")
    assert 0.5 < metric(out, "test/query_auc_adapted") <= 1.0
    assert 0.0 < metric(out, "test/query_auc_unadapted") <= 1.0


def test_plain_dlrm_on_tasks_is_scored_as_is_and_fine_tuned_on_its_best_checkpoint(tmp_path: Path) -> None:
    out = run(tmp_path, "dlrm_tasks_synthetic", "--trainer.max_steps=20",
              "--trainer.val_check_interval=10", "--data.init_args.num_users=1200",
              "--data.init_args.num_workers=0")
    # The same cold-start query rows, side by side: plain DLRM as is, and fine-tuned on each support set.
    assert 0.5 < metric(out, "test/query_auc_unadapted") <= 1.0
    assert 0.5 < metric(out, "test/query_auc_adapted") <= 1.0
    assert "Loaded model weights from the checkpoint at" in out  # the best checkpoint is the one tested


def test_meta_dlrm_runs_on_a_movielens_directory(tmp_path: Path) -> None:
    movielens = write_fake_movielens(tmp_path / "ml-1m", "ml-1m", num_users=600, num_items=300)
    out = run(tmp_path, "meta_dlrm_movielens", f"--data.init_args.interactions={movielens}",
              "--trainer.max_steps=20", "--trainer.val_check_interval=20", "--data.init_args.num_workers=0")
    stats = (tmp_path / "outputs" / "task_store_movielens" / "stats.json").read_text()
    assert f'"source": "{movielens}"' in stats and '"label_rule": "rating >= 4"' in stats
    assert 0.5 < metric(out, "test/query_auc_adapted") <= 1.0


def test_dlrm_dcn_on_criteo_format_files(tmp_path: Path) -> None:
    raw = tmp_path / "criteo"
    raw.mkdir()
    write_fake_criteo_tsv(raw / "day_0", 6000, seed=0)
    out = run(tmp_path, "dlrm_dcn_criteo", "--trainer.accelerator=cpu", "--trainer.max_steps=10",
              "--trainer.val_check_interval=10", f"--data.init_args.criteo_dir={raw}",
              "--data.init_args.criteo_num_embeddings=1000", "--data.init_args.embedding_dim=16",
              "--model.dense_arch_layer_sizes=[32,16]", "--data.init_args.global_batch_size=256",
              "--data.init_args.val_batches=2", "--data.init_args.test_batches=2")
    assert (raw / "preprocessed" / "metadata.json").is_file()
    assert 0.0 < metric(out, "test/auc") <= 1.0
