"""Configs that build on a base YAML: the bases come first, each relative to the file that names it."""

from __future__ import annotations

from pathlib import Path

from lightning_dembed.recipe import with_base_configs
from lightning_dembed.recipes import shipped_configs


def test_bases_are_read_first_relative_to_the_config_that_names_them(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "root.yaml").write_text("seed_everything: 1\n")
    (tmp_path / "shared" / "_base.yaml").write_text("base: root.yaml\ntrainer:\n  max_steps: 5\n")
    (tmp_path / "run.yaml").write_text("base: shared/_base.yaml\ntrainer:\n  max_steps: 7\n")
    args = ["fit", "--config", str(tmp_path / "run.yaml"), "--trainer.max_steps=9"]
    assert with_base_configs(args) == [
        "fit",
        "--config", str(tmp_path / "shared" / "root.yaml"),
        "--config", str(tmp_path / "shared" / "_base.yaml"),
        "--config", str(tmp_path / "run.yaml"),
        "--trainer.max_steps=9",
    ]
    assert with_base_configs([f"--config={tmp_path / 'shared' / 'root.yaml'}"]) == [
        "--config", str(tmp_path / "shared" / "root.yaml")
    ]


def test_every_shipped_config_builds_on_the_shipped_base_which_is_not_a_config() -> None:
    configs = shipped_configs()
    assert "_base" not in configs
    for name, path in configs.items():
        assert with_base_configs(["--config", str(path)])[:2] == ["--config", str(path.parent / "_base.yaml")], name
