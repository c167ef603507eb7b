"""MetaLearningLoop over sharded tables on 2 gloo processes, against a single-process reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lightning.pytorch import Trainer, seed_everything  # noqa: E402
from tiny import ColdStartTinyModule, TinyMetaModule, meta_reference_run, meta_tasks, task_batch  # noqa: E402
from warm import run_script  # noqa: E402

from lightning_dembed.meta import ColdStartEvaluation, MetaLearningConfig  # noqa: E402

WORKER = Path(__file__).parent / "meta_worker.py"
STEPS, INNER_LR, LR = 3, 0.3, 0.1


def run(out: Path, *args: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    proc = run_script(WORKER, ["--out", str(out), "--steps", str(STEPS), *args], cwd=out, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return {r: torch.load(out / f"rank{r}.pt") for r in (0, 1)}


TABLE_WISE = json.dumps({"sharding_types": dict.fromkeys(("t_user", "t_item", "t_category"), "table_wise")})


@pytest.mark.parametrize(
    ("algorithm", "policy"),
    [("maml", None), ("fomaml", None), ("maml", TABLE_WISE)],
    ids=["maml", "fomaml", "maml-table-wise"],  # table-wise alone: uneven rows per rank, never padded
)
def test_meta_training_on_sharded_tables_matches_single_process(
    tmp_path: Path, algorithm: str, policy: str | None
) -> None:
    extra = ("--policy", policy) if policy else ()
    ranks = run(tmp_path, "--algorithm", algorithm, "--tasks", "8", "--inner-lr", str(INNER_LR),
                "--lr", str(LR), *extra)
    config = MetaLearningConfig(algorithm=algorithm, inner_lr=INNER_LR, adapt=("over_arch",), adapt_embeddings=("user",))
    ref_losses, ref_state = meta_reference_run(STEPS, 8, config, LR)
    # Each rank averages its 4 tasks; the meta-batch's loss is the mean of the two.
    losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    # The meta-batch's one lookup took its input exchanged ahead at every step, uneven rows included.
    assert {n for r in (0, 1) for n in ranks[r]["used_ahead"].values()} == {STEPS}
    state = torch.load(tmp_path / "final.full.pt", weights_only=False)["state_dict"]
    assert state.keys() == ref_state.keys()
    for key, expected in ref_state.items():
        torch.testing.assert_close(state[key], expected, rtol=1e-5, atol=1e-6, msg=key)
    torch.manual_seed(0)
    initial = TinyMetaModule().state_dict()
    for table in ("t_user", "t_item", "t_category"):
        key = f"ebc.embedding_bags.{table}.weight"
        assert not torch.equal(state[key], initial[key]), f"{table} was not updated by the outer step"


def test_the_run_leaves_the_module_and_the_fit_loop_as_they_were(tmp_path: Path) -> None:
    run(tmp_path)
    for rank in (0, 1):
        left = json.loads((tmp_path / f"rank{rank}.module.json").read_text())
        # Only what any sharded fit leaves: TorchRec's DDP-ignore list, Lightning's _hparams, and the
        # forward that Lightning's DDP forward redirection re-binds on the instance at every step.
        assert left["added"] == ["_ddp_params_and_buffers_to_ignore", "_hparams", "forward"], left
        assert left["removed"] == [] and left["own_steps"], left
        assert left["loop"] == "lightning.pytorch.loops.optimization.automatic._AutomaticOptimization"


def test_collectives_per_meta_batch_do_not_grow_with_tasks_or_inner_steps(tmp_path: Path) -> None:
    small = run(tmp_path / "small", "--tasks", "4", "--inner-steps", "1")
    large = run(tmp_path / "large", "--tasks", "16", "--inner-steps", "3")
    for rank in (0, 1):
        # Step by step the same calls (pipelined, the first step also starts the next steps' exchanges).
        assert small[rank]["collectives"] == large[rank]["collectives"]
    # One DDP all-reduce of the dense gradients per meta-batch, whatever the tasks and inner steps.
    assert all(step["ddp_bucket_all_reduce"] == 1 for step in small[0]["collectives"])


def test_cold_start_scores_on_ranks_with_uneven_tasks_are_those_of_one_process(tmp_path: Path) -> None:
    worker = Path(__file__).parent / "cold_start_worker.py"
    proc = run_script(worker, ["--out", str(tmp_path), "--tasks", "5", "--rank0-tasks", "4"], cwd=tmp_path,
                      timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    seed_everything(0)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[ColdStartEvaluation(**ColdStartTinyModule.EVALUATION)])
    loader = torch.utils.data.DataLoader([task_batch(meta_tasks(0, 5))], batch_size=None)
    want = trainer.validate(ColdStartTinyModule(), loader, verbose=False)[0]
    got = json.loads((tmp_path / "metrics.json").read_text())
    assert got.keys() == want.keys()
    # The losses too are means over all 5 users, not the mean of rank 0's 4 and rank 1's 1.
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
