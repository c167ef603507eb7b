"""Every shipped recipe config parses, and the small ones run end to end on 2 processes.

A run's test metrics are compared with the ones stored in ``expected/<test>.json`` (torchtune's
way: a changed loss is a changed model, data or kernel, and shows). Stored from a run on 2 CPU
processes; after an intended change, store them again with ``UPDATE_EXPECTED=1 pytest tests/recipes``
and say why in the commit.
"""

from __future__ import annotations

import json
import os
import re
import socket
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
EXPECTED = Path(__file__).parent / "expected"
# Same process count, same seed: the runs repeat to float rounding (gloo's sums, threads).
RTOL = 1e-4


def test_recipes_lists_and_cp_copies_a_config_that_runs_from_anywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_dembed.cli import main

    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert "meta_dlrm_synthetic" in listing and "recipe meta_dlrm" in listing
    assert main(["cp", "dlrm_synthetic_tiny", str(tmp_path / "mine.yaml")]) == 0
    assert (tmp_path / "_base.yaml").is_file()  # the base it names travels with it
    assert "_base" not in listing  # a base is not a config to run
    # A user's copy, anywhere, runs with the recipe it names.
    out = run(tmp_path, str(tmp_path / "mine.yaml"), "--trainer.max_steps=3", "--trainer.val_check_interval=3",
              "--data.init_args.train_batches=3", "--data.init_args.test_batches=1",
              "--trainer.logger=false", "--trainer.callbacks=[]")
    assert "HybridParallelStrategy sharding plan (2 ranks)" in out
    (tmp_path / "nameless.yaml").write_text("trainer:\n  max_steps: 1\n")
    with pytest.raises(SystemExit, match="names no recipe"):
        main(["run", str(tmp_path / "nameless.yaml")])


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
    assert "lightning_dembed/recipes/configs/_base.yaml" in names
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


def free_port() -> int:
    """A port nothing listens on: the default 29500 may be taken by another run on this machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(tmp_path: Path, config: str, *overrides: str) -> str:
    """``lightning-dembed run`` of a shipped config by name (``dlrm_synthetic_tiny``) or a YAML path."""
    proc = subprocess.run(
        [*CLI, "run", config, "--devices", "2", f"--main-port={free_port()}", "--", *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def metric(output: str, name: str) -> float:
    return float(re.findall(rf"{re.escape(name)}\s+([0-9.]+)", output)[-1])


def assert_expected(test: str, output: str, names: list[str]) -> None:
    """The run's final ``names`` metrics equal those stored for ``test`` (``UPDATE_EXPECTED=1`` stores them)."""
    measured = {name: metric(output, name) for name in names}
    path = EXPECTED / f"{test}.json"
    if os.environ.get("UPDATE_EXPECTED") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(measured, indent=2) + "\n")
    expected = json.loads(path.read_text())
    assert measured == pytest.approx(expected, rel=RTOL), f"{test}: measured {measured}, stored {expected}"


def test_dlrm_synthetic_tiny_learns(tmp_path: Path) -> None:
    out = run(tmp_path, "dlrm_synthetic_tiny", "--trainer.max_steps=60", "--trainer.val_check_interval=60",
              "--data.init_args.train_batches=60", "--data.init_args.test_batches=4")
    assert "HybridParallelStrategy sharding plan (2 ranks)" in out
    assert metric(out, "test/auc") > 0.6
    assert_expected("dlrm_synthetic_tiny", out, ["test/auc", "test/log_loss", "test/ne"])
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
    # The data are the same on 1 and 2 processes; the steps are not (per-rank batches), hence one file each.
    assert_expected(f"dlrm_synthetic_tiny_{devices}_process", out, ["test/auc", "test/log_loss", "test/ne"])


def test_meta_dlrm_runs_and_reports_cold_start_auc(tmp_path: Path) -> None:
    # Meta-SGD on top of the config's MAML with adapted user offsets: the loop adds the learned rates.
    out = run(tmp_path, "meta_dlrm_synthetic", "--trainer.max_steps=20", "--trainer.val_check_interval=20",
              "--data.init_args.num_users=1200", "--data.init_args.num_workers=0", "--meta.learn_inner_lr=true")
    assert_expected("meta_dlrm_synthetic", out, ["test/query_auc_adapted", "test/query_auc_unadapted"])


def test_plain_dlrm_on_tasks_is_scored_as_is_and_fine_tuned_on_its_best_checkpoint(tmp_path: Path) -> None:
    out = run(tmp_path, "dlrm_tasks_synthetic", "--trainer.max_steps=20",
              "--trainer.val_check_interval=10", "--data.init_args.num_users=1200",
              "--data.init_args.num_workers=0")
    # The same cold-start query rows, side by side: plain DLRM as is, and fine-tuned on each support set.
    assert_expected("dlrm_tasks_synthetic", out, ["test/query_auc_unadapted", "test/query_auc_adapted"])
    assert "Loaded model weights from the checkpoint at" in out  # the best checkpoint is the one tested


def test_meta_dlrm_runs_on_a_movielens_directory(tmp_path: Path) -> None:
    movielens = write_fake_movielens(tmp_path / "ml-1m", "ml-1m", num_users=600, num_items=300)
    out = run(tmp_path, "meta_dlrm_movielens", f"--data.init_args.interactions={movielens}",
              "--trainer.max_steps=20", "--trainer.val_check_interval=20", "--data.init_args.num_workers=0")
    stats = (tmp_path / "outputs" / "task_store_movielens" / "stats.json").read_text()
    assert f'"source": "{movielens}"' in stats and '"label_rule": "rating >= 4"' in stats
    assert_expected("meta_dlrm_movielens", out, ["test/query_auc_adapted", "test/query_auc_unadapted"])


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
    assert_expected("dlrm_dcn_criteo", out, ["test/auc", "test/log_loss", "test/ne"])


def test_a_config_error_is_one_message_before_any_process_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_dembed.cli import main

    shipped = config_path("dlrm_synthetic_tiny")
    broken = tmp_path / "broken.yaml"
    broken.write_text(shipped.read_text().replace("max_steps: 400", "max_stepz: 400"))
    (tmp_path / "_base.yaml").write_text((shipped.parent / "_base.yaml").read_text())
    monkeypatch.chdir(tmp_path)

    def launch(args: list[str]) -> None:
        raise AssertionError(f"the launcher started ranks for {args}: the config check let an error through")

    monkeypatch.setattr("torch.distributed.run.main", launch)
    for config, override, error in [
        ("dlrm_synthetic_tiny", "--trainer.max_stepz=3", "unrecognized arguments: --trainer.max_stepz=3"),
        ("dlrm_synthetic_tiny", "--trainer.max_steps=abc", 'Parser key "trainer.max_steps"'),
        (str(broken), "--trainer.max_steps=3", "max_stepz"),
        ("missing.yaml", "--trainer.max_steps=3", "neither a YAML file nor a shipped config"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main(["run", config, "--devices", "2", override])
        captured = capsys.readouterr()
        out = f"{exited.value.code}\n{captured.out}{captured.err}"
        assert exited.value.code not in (0, None) and out.count(error) == 1, out[-3000:]
        assert "torch.distributed" not in out and "[rank" not in out, out[-3000:]  # no launcher, no process


def test_a_failing_rank_is_the_last_thing_the_launcher_prints(tmp_path: Path) -> None:
    # Rank 1 raises while rank 0 waits in a collective; rank 0 then fails too ("Connection closed by peer").
    proc = subprocess.run(
        [*CLI, "run", "dlrm_synthetic_tiny", "--devices", "2", f"--main-port={free_port()}", "--trainer.max_steps=5",
         "--trainer.logger=false",
         "--trainer.callbacks=[{class_path: failing_rank.RaiseOnRank, init_args: {rank: 1, step: 2}}]"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode != 0
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line == "RuntimeError: rank 1 fails here on purpose, at step 2", proc.stderr[-5000:]
    summary = proc.stderr[proc.stderr.rindex("lightning-dembed run: rank"):]
    assert summary.startswith("lightning-dembed run: rank 1 (local rank 1") and "Connection closed" not in summary


def test_a_failing_rank_is_the_last_thing_a_script_launched_run_prints(tmp_path: Path) -> None:
    # Lightning's script launcher: rank 0 is the launching process, and fails second ("Connection closed by peer").
    temp = tmp_path / "tmp"  # where the ranks' error folder goes, and is gone from once rank 0 exited
    temp.mkdir()
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "failing_rank.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TMPDIR": str(temp)})
    assert proc.returncode == 1, proc.stderr[-5000:]  # an error, not Lightning's observer's SIGKILL (-9)
    assert not list(temp.glob("lightning-dembed-rank-errors-*"))
    assert proc.stderr.strip().splitlines()[-1].endswith("RuntimeError: rank 1 fails here on purpose, at step 2")
    last_error = proc.stderr[proc.stderr.rindex("The above exception was the direct cause"):]
    assert "RankFailedFirst: rank 1 failed first; its error:" in last_error and "Connection closed" not in last_error
