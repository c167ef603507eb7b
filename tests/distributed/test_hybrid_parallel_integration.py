"""HybridParallelStrategy on 2 real gloo processes, checked against single-process training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import TABLES, TinyRecModule, make_batch, rank_slice, reference_run  # noqa: E402
from warm import run_script  # noqa: E402

WORKER = Path(__file__).parent / "worker.py"
STEPS, GLOBAL_BATCH, LR = 3, 8, 0.1
RTOL, ATOL = 1e-5, 1e-6


def run_worker(out: Path, *args: str, devices: int = 2, expect_ok: bool = True) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    proc = run_script(WORKER, ["--out", str(out), "--devices", str(devices), "--global-batch", str(GLOBAL_BATCH),
                               "--lr", str(LR), *args], cwd=out, timeout=600)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def global_losses(out: Path, devices: int = 2) -> list[float]:
    per_rank = [torch.load(out / f"rank{r}.pt")["losses"] for r in range(devices)]
    return [sum(step) / devices for step in zip(*per_rank)]


def full_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["state_dict"]


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=RTOL, atol=ATOL, msg=key)


def every_table(sharding: str, **extra) -> str:
    return json.dumps({"sharding_types": {name: sharding for name, _, _ in TABLES}, **extra})


@pytest.mark.parametrize(
    "policy",
    [
        every_table("table_wise"),
        every_table("row_wise"),
        # Merlin rules, so every table really is split into column slices on both ranks.
        every_table("column_wise", placement="basic"),
        every_table("table_row_wise"),
        every_table("table_column_wise"),
        every_table("data_parallel"),
    ],
    ids=["table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise", "data_parallel"],
)
def test_sharded_training_matches_single_process(tmp_path: Path, policy: str) -> None:
    proc = run_worker(tmp_path, "--steps", str(STEPS), "--policy", policy, "--save", "final.ckpt", "--model-summary")
    ref_losses, ref_state = reference_run(STEPS, GLOBAL_BATCH, "sgd", LR)
    torch.testing.assert_close(global_losses(tmp_path), ref_losses, rtol=RTOL, atol=ATOL)
    assert_same_state(full_state(tmp_path / "final.ckpt.full.pt"), ref_state)
    plan = torch.load(tmp_path / "rank0.pt")["plan"]
    wanted = json.loads(policy)["sharding_types"]
    assert {t["name"]: t["sharding_type"] for t in plan} == wanted
    # ModelSummary counts rank 0's shards; the strategy says how many of the tables' parameters those are.
    replicated = set(wanted.values()) == {"data_parallel"}
    assert ("ModelSummary counts the sharded tables' parameters that rank 0 holds" in proc.stdout + proc.stderr) \
        != replicated
    if "placement" in json.loads(policy):
        # Slices stay 4 columns wide at least (FBGEMM), so the 4-wide t3 cannot be split.
        assert all(len(t["ranks"]) == 2 for t in plan if t["embedding_dim"] >= 8), plan


@pytest.mark.parametrize(
    ("worker_args", "sharding_types", "model"),
    [
        # TorchRec divides the pooled output of the whole module by the bag sizes when a mean-pooled
        # table is row-wise; the tables sharded otherwise were pooled to means already.
        (("--mean-pooling",), {"t0": "row_wise", "t1": "table_wise", "t2": "table_row_wise", "t3": "data_parallel"},
         {"mean_pooling": True}),
        # Every sharding type an EmbeddingCollection takes on CPU, in one plan.
        (("--sequence",), {"t0": "table_wise", "t1": "row_wise", "t2": "column_wise", "t3": "table_wise"},
         {"sequence": True}),
        # Weighted ids, with ranks of 3 and 5 rows: the row-wise exchange pads weights too.
        (("--weighted", "--split", "3,5"),
         {"t0": "row_wise", "t1": "column_wise", "t2": "table_row_wise", "t3": "data_parallel"},
         {"weighted": True, "split": [3, 5]}),
    ],
    ids=["mean-pooling-mixed-plan", "embedding-collection", "weighted-ragged"],
)
def test_other_kinds_of_tables_match_single_process(
    tmp_path: Path, worker_args: tuple[str, ...], sharding_types: dict[str, str], model: dict[str, Any]
) -> None:
    policy = json.dumps({"sharding_types": sharding_types})
    run_worker(tmp_path, "--steps", str(STEPS), *worker_args, "--policy", policy, "--save", "final.ckpt")
    ref_losses, ref_state = reference_run(STEPS, GLOBAL_BATCH, "sgd", LR, **model)
    torch.testing.assert_close(global_losses(tmp_path), ref_losses, rtol=RTOL, atol=ATOL)
    assert_same_state(full_state(tmp_path / "final.ckpt.full.pt"), ref_state)


def test_adagrad_with_merlin_thresholds_matches_single_process(tmp_path: Path) -> None:
    # t3 (96 elements) is replicated, t2 (768) row-sliced, the rest table-parallel.
    policy = json.dumps({"placement": "memory_balanced", "data_parallel_threshold": 100, "row_slice_threshold": 700})
    run_worker(tmp_path, "--steps", str(STEPS), "--optimizer", "adagrad", "--policy", policy, "--save", "final.ckpt")
    ref_losses, ref_state = reference_run(STEPS, GLOBAL_BATCH, "adagrad", LR)
    torch.testing.assert_close(global_losses(tmp_path), ref_losses, rtol=RTOL, atol=ATOL)
    assert_same_state(full_state(tmp_path / "final.ckpt.full.pt"), ref_state)
    kinds = {t["name"]: t["sharding_type"] for t in torch.load(tmp_path / "rank0.pt")["plan"]}
    assert kinds == {"t0": "table_wise", "t1": "table_wise", "t2": "row_wise", "t3": "data_parallel"}


def test_manual_optimization_matches_single_process(tmp_path: Path) -> None:
    run_worker(tmp_path, "--steps", str(STEPS), "--manual", "--policy", every_table("row_wise"), "--save", "final.ckpt")
    ref_losses, ref_state = reference_run(STEPS, GLOBAL_BATCH, "sgd", LR)
    torch.testing.assert_close(global_losses(tmp_path), ref_losses, rtol=RTOL, atol=ATOL)
    assert_same_state(full_state(tmp_path / "final.ckpt.full.pt"), ref_state)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Continuous 2K-step run on 2 ranks, and K-step runs saved on 2 ranks and on 1 (Adagrad: state matters)."""
    root = tmp_path_factory.mktemp("resume")
    common = ("--steps", str(STEPS), "--optimizer", "adagrad", "--policy", every_table("row_wise"))
    run_worker(root / "continuous", *common, "--max-steps", str(2 * STEPS), "--save", "final.ckpt")
    run_worker(root / "half2", *common, "--save", "half.ckpt")
    run_worker(root / "half1", *common, "--save", "half.ckpt", devices=1)
    return {
        "continuous": root / "continuous" / "final.ckpt.full.pt",
        "half_on_2": root / "half2" / "half.ckpt",
        "half_on_1": root / "half1" / "half.ckpt",
        "root": root,
    }


def test_resume_with_stateless_tables_each_on_one_rank(tmp_path: Path) -> None:
    # SGD keeps no table state: the checkpoint has none for tables that only one rank holds.
    common = ("--steps", "2", "--policy", every_table("table_wise"))
    run_worker(tmp_path / "half", *common, "--save", "half.ckpt")
    run_worker(tmp_path / "resumed", *common, "--max-steps", "4", "--resume", str(tmp_path / "half" / "half.ckpt"),
               "--save", "final.ckpt")
    _, ref_state = reference_run(4, GLOBAL_BATCH, "sgd", LR, steps_per_epoch=2)
    assert_same_state(full_state(tmp_path / "resumed" / "final.ckpt.full.pt"), ref_state)


@pytest.mark.parametrize(
    ("saved", "devices"), [("half_on_2", 2), ("half_on_2", 1), ("half_on_1", 2)], ids=["2->2", "2->1", "1->2"]
)
def test_resume_equals_continuous_training(checkpoints: dict[str, Path], saved: str, devices: int) -> None:
    out = checkpoints["root"] / f"resumed_{saved}_{devices}"
    run_worker(
        out, "--steps", str(STEPS), "--optimizer", "adagrad", "--policy", every_table("row_wise"),
        "--max-steps", str(2 * STEPS), "--resume", str(checkpoints[saved]), "--save", "final.ckpt", devices=devices,
    )
    assert_same_state(full_state(out / "final.ckpt.full.pt"), full_state(checkpoints["continuous"]))


def test_resume_into_a_plan_that_replicates_a_sharded_table_is_refused(checkpoints: dict[str, Path]) -> None:
    # A replicated table's Adagrad state lives in the dense optimizer, a sharded one's in its fused
    # kernel: a plan that moves a table between them (another world size can) has no place for it.
    policy = json.dumps({"sharding_types": {name: "data_parallel" if name == "t1" else "row_wise" for name, _, _ in
                                            TABLES}})
    proc = run_worker(checkpoints["root"] / "replicated", "--steps", str(STEPS), "--optimizer", "adagrad", "--policy",
                      policy, "--max-steps", str(2 * STEPS), "--resume", str(checkpoints["half_on_2"]),
                      expect_ok=False)
    assert "tables ['t1'] keep optimizer state and were planned data_parallel now but not when saved" in proc.stderr
    assert "sharding_types={'t1': 'row_wise'}" in proc.stderr, proc.stderr[-3000:]


def test_out_of_range_id_names_feature_and_table(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, "--steps", "1", "--bad-id", "--policy", every_table("table_wise"), expect_ok=False)
    assert proc.returncode != 0
    assert "feature 'f_t2' has id 10000 outside table 't2', which has 96 rows" in proc.stderr


def test_gradient_accumulation_is_refused_before_training(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, "--steps", "2", "--accumulate", "2", expect_ok=False)
    assert proc.returncode != 0
    assert "accumulate_grad_batches=2" in proc.stderr and "fused optimizer" in proc.stderr
    assert not list(tmp_path.glob("rank*.pt"))


def test_fork_hands_trained_tables_back_and_predict_matches(tmp_path: Path) -> None:
    run_worker(tmp_path, "--steps", str(STEPS), "--policy", every_table("row_wise"), "--predict")
    _, ref_state = reference_run(STEPS, GLOBAL_BATCH, "sgd", LR)
    reference = TinyRecModule()
    reference.load_state_dict(ref_state)
    # trainer.predict returns rank 0's predictions: its half of every global batch.
    with torch.no_grad():
        expected = torch.cat([reference.predict_step(rank_slice(make_batch(step, GLOBAL_BATCH), 0, 2), step)
                              for step in range(STEPS)])
    torch.testing.assert_close(torch.load(tmp_path / "predictions.pt"), expected, rtol=RTOL, atol=ATOL)
