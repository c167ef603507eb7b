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
from lightning_dembed.cli import recipe_for_config
from lightning_dembed.data import write_fake_criteo_tsv, write_fake_movielens
from lightning_dembed.meta import MetaLearningLoop
from lightning_dembed.models import DLRMModule
from lightning_dembed.recipe import RecipeCLI

ROOT = Path(__file__).parents[2]
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
CLI = [sys.executable, "-m", "lightning_dembed.cli"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_instantiates(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.read_text().startswith(f"# lightning-dembed run recipes/configs/{config.name}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = ["--config", str(config), "--trainer.accelerator=cpu", "--trainer.devices=1"]
    if recipe_for_config(config).stem == "meta_dlrm":
        cli = _MetaCLI(DLRMModule, LightningDataModule, run=False, args=args)
        assert any(isinstance(c, MetaLearningLoop) for c in cli.trainer.callbacks)
    else:
        cli = RecipeCLI(DLRMModule, LightningDataModule, run=False, args=args)
    assert cli.model.feature_names


class _MetaCLI(RecipeCLI):
    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(MetaLearningLoop, "meta")


def run(tmp_path: Path, config: str, *overrides: str) -> str:
    proc = subprocess.run(
        [*CLI, "run", str(ROOT / "recipes" / "configs" / config), "--devices", "2", "--", *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def metric(output: str, name: str) -> float:
    return float(re.findall(rf"{re.escape(name)}\s+([0-9.]+)", output)[-1])


def test_dlrm_synthetic_tiny_learns(tmp_path: Path) -> None:
    out = run(tmp_path, "dlrm_synthetic_tiny.yaml", "--trainer.max_steps=60", "--trainer.val_check_interval=60",
              "--data.init_args.train_batches=60", "--data.init_args.test_batches=4")
    assert "HybridParallelStrategy sharding plan (2 ranks)" in out
    assert metric(out, "test/auc") > 0.6
    last = tmp_path / "outputs" / "checkpoints" / "dlrm-synthetic-tiny" / "last.ckpt"
    assert (last / "meta.pt").is_file()
    assert list((tmp_path / "outputs" / "wandb").glob("offline-run-*"))
    # The documented serve path: consolidate, then load_from_checkpoint into DLRMModule (tables on meta).
    subprocess.run([*CLI, "consolidate", str(last), str(tmp_path / "full.ckpt")], check=True, timeout=300)
    config = ROOT / "recipes" / "configs" / "dlrm_synthetic_tiny.yaml"
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
        [*launcher, str(ROOT / "recipes" / "dlrm.py"), "fit", "--config",
         str(ROOT / "recipes" / "configs" / "dlrm_synthetic_tiny.yaml"), f"--trainer.devices={devices}",
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
    out = run(tmp_path, "meta_dlrm_synthetic.yaml", "--trainer.max_steps=20", "--trainer.val_check_interval=20",
              "--data.init_args.num_users=1200", "--data.init_args.num_workers=0", "--meta.learn_inner_lr=true")
    assert 0.5 < metric(out, "test/query_auc_adapted") <= 1.0
    assert 0.0 < metric(out, "test/query_auc_unadapted") <= 1.0


def test_plain_dlrm_on_tasks_is_scored_as_is_and_fine_tuned_on_its_best_checkpoint(tmp_path: Path) -> None:
    out = run(tmp_path, "dlrm_tasks_synthetic.yaml", "--trainer.max_steps=20",
              "--trainer.val_check_interval=10", "--data.init_args.num_users=1200",
              "--data.init_args.num_workers=0")
    # The same cold-start query rows, side by side: plain DLRM as is, and fine-tuned on each support set.
    assert 0.5 < metric(out, "test/query_auc_unadapted") <= 1.0
    assert 0.5 < metric(out, "test/query_auc_adapted") <= 1.0
    assert "Loaded model weights from the checkpoint at" in out  # the best checkpoint is the one tested


def test_meta_dlrm_runs_on_a_movielens_directory(tmp_path: Path) -> None:
    movielens = write_fake_movielens(tmp_path / "ml-1m", "ml-1m", num_users=600, num_items=300)
    out = run(tmp_path, "meta_dlrm_movielens.yaml", f"--data.init_args.interactions={movielens}",
              "--trainer.max_steps=20", "--trainer.val_check_interval=20", "--data.init_args.num_workers=0")
    stats = (tmp_path / "outputs" / "task_store_movielens" / "stats.json").read_text()
    assert f'"source": "{movielens}"' in stats and '"label_rule": "rating >= 4"' in stats
    assert 0.5 < metric(out, "test/query_auc_adapted") <= 1.0


def test_dlrm_dcn_on_criteo_format_files(tmp_path: Path) -> None:
    raw = tmp_path / "criteo"
    raw.mkdir()
    write_fake_criteo_tsv(raw / "day_0", 6000, seed=0)
    out = run(tmp_path, "dlrm_dcn_criteo.yaml", "--trainer.accelerator=cpu", "--trainer.max_steps=10",
              "--trainer.val_check_interval=10", f"--data.init_args.criteo_dir={raw}",
              "--data.init_args.criteo_num_embeddings=1000", "--data.init_args.embedding_dim=16",
              "--model.dense_arch_layer_sizes=[32,16]", "--data.init_args.global_batch_size=256",
              "--data.init_args.val_batches=2", "--data.init_args.test_batches=2")
    assert (raw / "preprocessed" / "metadata.json").is_file()
    assert 0.0 < metric(out, "test/auc") <= 1.0
