"""``lightning-dembed plan``: a recipe's tables planned for a cluster that is not there."""

from __future__ import annotations

import json

import pytest

from lightning_dembed.cli import main

CONFIG = "dlrm_synthetic_tiny"  # a shipped config, by name


def plan(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict]:
    code = main(["plan", CONFIG, "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def test_json_plan_of_a_config_on_ranks_that_are_not_there(capsys: pytest.CaptureFixture) -> None:
    code, result = plan(capsys, "--world-size", "16", "--placement", "memory_optimized")
    assert code == 0 and result["fits"] and result["world_size"] == 16
    assert [r["rank"] for r in result["ranks"]] == list(range(16))
    assert len(result["tables"]) == 55  # Merlin's Tiny model
    assert {"name", "sharding", "ranks", "bytes"} <= result["tables"][0].keys()
    # Every table's bytes (and Adagrad's state, as much again) are on some rank.
    assert sum(r["bytes"] for r in result["ranks"]) >= 2 * sum(t["bytes"] for t in result["tables"])


def test_torchrec_planner_and_overrides(capsys: pytest.CaptureFixture) -> None:
    code, result = plan(capsys, "--world-size", "2", "--device", "cpu", "--", "--data.init_args.scale=0.0001")
    assert code == 0 and result["fits"] and result["world_size"] == 2


def test_a_model_that_does_not_fit_exits_nonzero_and_says_what_to_change(capsys: pytest.CaptureFixture) -> None:
    code, result = plan(capsys, "--world-size", "4", "--placement", "basic", "--memory-per-rank", "1MiB")
    assert code == 1 and not result["fits"]
    assert "use more processes" in result["error"] and "row_slice_threshold" in result["error"]
