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


@pytest.mark.parametrize("planner", [("--placement", "memory_optimized"), ()], ids=["merlin", "torchrec"])
def test_offload_moves_the_largest_tables_to_host_memory_until_the_plan_fits(
    capsys: pytest.CaptureFixture, planner: tuple[str, ...]
) -> None:
    args = ("--world-size", "2", "--memory-per-rank", "150MiB", *planner, "--", "--data.init_args.scale=0.05")
    code, without = plan(capsys, *args[:-2], "--", args[-1])
    assert code == 1 and "offload='uvm_caching'" in without["error"]
    code, result = plan(capsys, "--offload", "uvm_caching", *args)
    assert code == 0 and result["fits"]
    offloaded = [t for t in result["tables"] if t["kernel"] == "fused_uvm_caching"]
    kept = [t for t in result["tables"] if t["kernel"] != "fused_uvm_caching"]
    assert offloaded and kept
    if planner:  # Merlin's rule: the largest tables go first
        assert min(t["bytes"] for t in offloaded) >= max(t["bytes"] for t in kept if t["sharding"] != "data_parallel")
    assert all(r["bytes"] <= 150 * 2**20 and r["host_bytes"] > 0 for r in result["ranks"])


def test_offload_is_refused_for_cpu_plans(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="offload='uvm'.* on cpu every table is there already"):
        main(["plan", CONFIG, "--world-size", "2", "--device", "cpu", "--offload", "uvm"])


def test_torchrec_planner_estimates_each_ranks_embedding_time(capsys: pytest.CaptureFixture) -> None:
    code, result = plan(capsys, "--world-size", "4", "--", "--data.init_args.scale=0.01")
    assert code == 0
    per_rank = [r["estimated_ms"] for r in result["ranks"]]
    assert all(ms > 0 for ms in per_rank) and result["estimated_step_ms"] == max(per_rank)
    _, merlin = plan(capsys, "--world-size", "4", "--placement", "basic")
    assert "estimated_step_ms" not in merlin  # Merlin's rules estimate no time


def test_text_plan_of_many_ranks_stays_readable(capsys: pytest.CaptureFixture) -> None:
    code = main(["plan", CONFIG, "--world-size", "32", "--placement", "memory_optimized",
                 "--row-slice-threshold", "10000"])
    text = capsys.readouterr().out
    assert code == 0
    # A row-wise table over every rank is one range; per-rank memory is its balance, not 32 entries.
    assert any(" row_wise " in line and " 0-31 " in line for line in text.splitlines())
    assert "over 32 ranks" in text and "rank 5:" not in text
