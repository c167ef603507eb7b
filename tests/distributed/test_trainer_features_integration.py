"""Trainer and LightningModule features under HybridParallelStrategy, on 2 gloo processes.

Each one either trains exactly what one plain process trains (the tables as ordinary parameters,
as under ``strategy="ddp"``), or is refused before training with an error that names the way out.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import numpy
import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from test_hybrid_parallel_integration import (  # noqa: E402
    ATOL,
    GLOBAL_BATCH,
    LR,
    RTOL,
    assert_same_state,
    every_table,
    full_state,
    global_losses,
    run_worker,
)
from tiny import TABLES, GlobalBatches, TinyRecModule, reference_run  # noqa: E402

STEPS = 4


def run_and_compare(tmp_path: Path, *args: str, sharding: str = "row_wise", compare_losses: bool = True,
                    strategy: dict | None = None, **reference) -> None:
    worker_args = ["--steps", str(reference.pop("steps_per_epoch", STEPS)), "--max-steps", str(STEPS)]
    run_worker(tmp_path, *worker_args, *args, "--policy", every_table(sharding, **(strategy or {})),
               "--save", "final.ckpt")
    steps_per_epoch = int(worker_args[1])
    ref_losses, ref_state = reference_run(STEPS, GLOBAL_BATCH, reference.pop("optimizer", "sgd"), LR,
                                          steps_per_epoch=steps_per_epoch, **reference)
    if compare_losses:
        torch.testing.assert_close(global_losses(tmp_path), ref_losses, rtol=RTOL, atol=ATOL)
    assert_same_state(full_state(tmp_path / "final.ckpt.full.pt"), ref_state)


@pytest.mark.parametrize("scheduler", ["step", "warmup", "onecycle", "plateau"])
def test_lr_schedulers_drive_the_tables(tmp_path: Path, scheduler: str) -> None:
    run_and_compare(tmp_path, "--scheduler", scheduler, scheduler=scheduler)


def test_epoch_interval_scheduler_with_adagrad(tmp_path: Path) -> None:
    run_and_compare(tmp_path, "--scheduler", "epoch", "--optimizer", "adagrad", scheduler="epoch",
                    optimizer="adagrad", steps_per_epoch=2)


def test_tables_take_their_param_groups_values_and_schedule(tmp_path: Path) -> None:
    run_and_compare(tmp_path, "--groups", "--scheduler", "step", groups=True, scheduler="step",
                    sharding="table_wise")


@pytest.mark.parametrize(("sharding", "scheduler"), [("row_wise", "none"), ("table_wise", "none"),
                                                    ("row_wise", "warmup0")])
def test_a_frozen_table_stays_as_it_was(tmp_path: Path, sharding: str, scheduler: str) -> None:
    # warmup0: the other tables' group starts at learning rate 0, as the frozen table's kernel did
    # (TorchRec then built one kernel for all, and the warm-up trained the frozen table).
    run_and_compare(tmp_path, "--frozen-table", "t1", "--scheduler", scheduler, frozen_table="t1",
                    scheduler=scheduler, sharding=sharding)


def test_batch_norm_statistics_are_rank_zeros_as_under_ddp(tmp_path: Path) -> None:
    # DDP broadcasts rank 0's buffers as each training forward starts, and a checkpoint holds rank
    # 0's; TorchRec's DDP broadcast none, and DCP wrote the dense part from any rank.
    run_worker(tmp_path, "--steps", str(STEPS), "--batch-norm", "--policy", every_table("row_wise"),
               "--save", "final.ckpt")
    rank0, rank1 = (torch.load(tmp_path / f"batch_norm{rank}.pt") for rank in range(2))
    assert len(rank0["seen"]) == len(rank1["seen"]) == STEPS
    for step, (seen0, seen1) in enumerate(zip(rank0["seen"], rank1["seen"])):
        torch.testing.assert_close(seen1, seen0, rtol=0, atol=0, msg=f"step {step}")
    assert not torch.equal(rank0["final"], rank1["final"])  # each rank's last batch, as under DDP
    saved = full_state(tmp_path / "final.ckpt.full.pt")["mlp.1.running_mean"]
    torch.testing.assert_close(saved, rank0["final"], rtol=0, atol=0)


def test_a_second_fit_on_one_trainer_starts_the_table_optimizers_afresh(tmp_path: Path) -> None:
    # As under DDP, where configure_optimizers runs again: Adagrad's sums of the first fit are gone
    # for the tables too (their fused kernels kept them).
    run_worker(tmp_path, "--steps", str(STEPS), "--optimizer", "adagrad", "--fit-twice", "--start-method", "popen",
               "--policy", every_table("row_wise"), "--save", "final.ckpt")
    ref_losses, ref_state = reference_run(2 * STEPS, GLOBAL_BATCH, "adagrad", LR, steps_per_epoch=STEPS,
                                          new_optimizer_at=STEPS)
    torch.testing.assert_close(global_losses(tmp_path), ref_losses, rtol=RTOL, atol=ATOL)
    assert_same_state(full_state(tmp_path / "final.ckpt.full.pt"), ref_state)


def test_a_new_trainer_on_a_module_sharded_by_another_is_refused(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, "--steps", "2", "--start-method", "popen", "--second-trainer", expect_ok=False)
    assert "were sharded by another Trainer's HybridParallelStrategy" in proc.stderr, proc.stderr[-3000:]


def test_tables_follow_the_optimizer_that_holds_them(tmp_path: Path) -> None:
    # Two optimizer steps per batch: Lightning's global_step counts both.
    run_worker(tmp_path, "--steps", str(STEPS), "--max-steps", str(2 * STEPS), "--two-optimizers",
               "--policy", every_table("row_wise"), "--save", "final.ckpt")
    from tiny import TinyRecModule, make_batch

    torch.manual_seed(0)
    module = TinyRecModule(lr=LR)
    dense = torch.optim.SGD(module.mlp.parameters(), lr=LR)
    tables = torch.optim.SGD(module.ebc.parameters(), lr=4 * LR)
    schedule = torch.optim.lr_scheduler.StepLR(tables, step_size=1, gamma=0.5)
    losses = []
    for step in range(STEPS):
        dense.zero_grad()
        tables.zero_grad()
        loss = module.loss(make_batch(step, GLOBAL_BATCH))
        loss.backward()
        dense.step()
        tables.step()
        schedule.step()
        losses.append(float(loss))
    torch.testing.assert_close(global_losses(tmp_path), losses, rtol=RTOL, atol=ATOL)
    assert_same_state(full_state(tmp_path / "final.ckpt.full.pt"),
                      {k: v.detach() for k, v in module.state_dict().items()})


def test_clipping_the_dense_parameters_in_configure_gradient_clipping_trains_as_ddp(tmp_path: Path) -> None:
    # The way the refusal of gradient_clip_val points to: the override clips the dense parameters
    # (0.02 is below most of their gradients at this lr, so clipping changes the result), the
    # tables train unclipped, as in a DDP run that clips only the non-table parameters.
    run_and_compare(tmp_path, "--dense-clip", "0.02", dense_clip=0.02)


def used_ahead(out: Path) -> set[int]:
    """How many forwards of each sharded module found their input exchanged ahead, over the ranks."""
    return {n for r in range(2) for n in torch.load(out / f"rank{r}.pt")["used_ahead"].values()}


# "extra-feature": the batches' KeyedJaggedTensor also holds a feature no table consumes (one KJT for
# several modules, as in a two-tower model), with ids beyond every table, and every other batch lists
# the tables' features in reverse: each looked up by name as unsharded, in training (pipelined) and
# validation.
@pytest.mark.parametrize(("sharding", "args", "pipeline"), [
    ("row_wise", ("--sized", "--split", "3,5"), True),
    ("table_wise", ("--sized", "--extra-feature"), True),
    ("row_wise", ("--sized",), False),
], ids=["row_wise-ragged", "table_wise-extra-feature", "off"])
def test_pipelined_training_with_validation_trains_as_ddp(tmp_path: Path, sharding: str, args: tuple[str, ...],
                                                          pipeline: bool) -> None:
    split = [3, 5] if "--split" in args else None
    run_and_compare(tmp_path, "--val-every", "2", *args, sharding=sharding, strategy={"pipeline": pipeline},
                    split=split)
    # Every step's input exchange was started during the step before (the first's before it).
    assert used_ahead(tmp_path) == ({STEPS} if pipeline else {0})


def test_data_without_a_length_trains_unpipelined_as_ddp(tmp_path: Path) -> None:
    run_and_compare(tmp_path)
    assert used_ahead(tmp_path) == {0}


def test_a_step_that_edits_its_ids_trains_unpipelined_as_ddp(tmp_path: Path) -> None:
    run_and_compare(tmp_path, "--touch-ids", "--sized")
    assert used_ahead(tmp_path) == {0}


def test_a_step_that_edits_its_ids_on_one_rank_only_fails_there_naming_pipeline_off(tmp_path: Path) -> None:
    # The other rank uses the input exchanged ahead without waiting for the first to decide.
    proc = run_worker(tmp_path, "--steps", str(STEPS), "--touch-ids-on-rank", "1", "--sized",
                      "--policy", every_table("row_wise"), expect_ok=False)
    assert proc.returncode != 0
    assert "on rank 1 this step's forward was given other sparse features than the batch's" in proc.stderr
    assert "HybridParallelStrategy(pipeline=False)" in proc.stderr


@pytest.mark.parametrize(
    "sharding", ["row_wise", "table_row_wise", "table_wise", "column_wise", "data_parallel"]
)
def test_ragged_batches_train_as_ddp(tmp_path: Path, sharding: str) -> None:
    run_and_compare(tmp_path, "--split", "3,5", split=[3, 5], sharding=sharding)


def test_an_empty_batch_on_one_rank_trains_as_ddp(tmp_path: Path) -> None:
    # DDP: the empty rank's loss is NaN but its gradients are zeros; the other rank's count half.
    run_and_compare(tmp_path, "--split", "0,8", split=[0, 8], compare_losses=False)


@pytest.mark.parametrize(("sized", "message"), [(False, "yield different numbers of batches in epoch 0"),
                                                (True, "have different lengths in epoch 0 (from 3 to 4 batches")])
def test_a_rank_that_runs_out_of_batches_fails_every_rank_with_the_fix(tmp_path: Path, sized: bool,
                                                                         message: str) -> None:
    proc = run_worker(tmp_path, "--steps", "4", "--max-steps", "10", "--rank-steps", "3,4",
                      "--policy", every_table("row_wise"), *(["--sized"] if sized else []), expect_ok=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "drop_last=True" in proc.stderr


def test_nonfinite_loss_guard_skips_the_step_on_every_rank(tmp_path: Path) -> None:
    run_worker(tmp_path, "--steps", str(STEPS), "--skip-nonfinite", "--nan-at", "1",
               "--policy", every_table("row_wise"), "--save", "final.ckpt")
    state = full_state(tmp_path / "final.ckpt.full.pt")
    assert all(torch.isfinite(v).all() for v in state.values())
    # Step 1 was skipped: the same weights as training on the other steps' batches only.
    # (Reference: steps 0, 2, 3 -> run 3 steps on batches with seeds 0, 2, 3.)
    torch.manual_seed(0)
    from tiny import TinyRecModule, make_batch

    module = TinyRecModule(lr=LR)
    opt = module.configure_optimizers()
    for seed in (0, 2, 3):
        opt.zero_grad()
        module.loss(make_batch(seed, GLOBAL_BATCH)).backward()
        opt.step()
    assert_same_state(state, {k: v.detach() for k, v in module.state_dict().items()})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--clip", "1.0", "--clip-algorithm", "norm"), "Clip the dense parameters only"),
        (("--clip", "0.02"), "can only clip each lookup's gradient"),
        (("--precision", "bf16-true"), "Use precision='bf16-mixed'"),
        (("--optimizer", "adamw-dense"), "are in no param group of configure_optimizers, so they train with the first "
                                         "optimizer's first group (AdamW): AdamW has no fused FBGEMM equivalent"),
        (("--precision", "64-true"), "Use precision='bf16-mixed'"),
        (("--policy", '{"model_averaging_period": 4}'), "does not support model averaging"),
        (("--swa",), "StochasticWeightAveraging keeps an averaged copy"),
        (("--accumulate-from-epoch-1",), "or a GradientAccumulationScheduler that accumulates"),
        (("--prune",), "ModelPruning would prune embedding tables"),
        (("--frozen-table", "t1", "--policy", every_table("data_parallel")), "are frozen (requires_grad=False)"),
        (("--dense-clip", "0.5", "--clip-optimizer"), "configure_optimizers gave this optimizer the embedding tables"),
        (("--weighted", "--trainable-weights"), "the ids' weights require grad"),
        (("--lr-after-backward",), "between the backward and the optimizer step of one training step"),
        (("--table-penalty",), "other than through their lookup (a penalty over self.parameters()"),
        (("--optimizer", "sgd-first-layer"), "'ebc.embedding_bags.t3.weight'] and parameters ['mlp.2.weight', "
                                             "'mlp.2.bias'] in no optimizer. Under strategy='ddp' none of them"),
        (("--async-checkpoint-io",), "a CheckpointIO plugin (AsyncCheckpointIO, from Trainer(plugins=...)"),
    ],
    ids=["norm-clipping", "value-clipping", "bf16-true", "adamw-dense-only", "64-true", "model-averaging", "swa", "accumulation-scheduler",
         "pruning", "frozen-replicated",
         "clip-gradients-of-tables", "trainable-id-weights",
         "lr-set-after-backward", "penalty-over-table-weights", "tables-and-dense-left-out", "checkpoint-io-plugin"],
)
def test_unsupported_features_are_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], message: str
) -> None:
    error = refusal_in_this_process(tmp_path, monkeypatch, "--steps", "2", *args)
    assert message in error, error[-3000:]
    assert not list(tmp_path.glob("rank*.pt"))


def refusal_in_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    """The traceback of a worker run that must fail, on one process: this one.

    For refusals, which do not depend on the number of ranks: two processes per case would cost the
    suite about 6 s each.
    """
    import worker

    monkeypatch.setattr(sys, "argv", ["worker.py", "--out", str(tmp_path), "--devices", "1", "--global-batch",
                                      str(GLOBAL_BATCH), "--lr", str(LR), "--start-method", "popen", *args])
    monkeypatch.setattr(os, "environ", dict(os.environ))  # Lightning sets the process group's variables
    # What the run sets for the whole process (seed_everything, Lightning's thread count) is put back.
    threads, python_random, numpy_random = torch.get_num_threads(), random.getstate(), numpy.random.get_state()
    try:
        with torch.random.fork_rng(), pytest.raises((ValueError, RuntimeError, TypeError)) as refused:
            worker.main()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        torch.set_num_threads(threads)
        random.setstate(python_random)
        numpy.random.set_state(numpy_random)
    return "".join(traceback.format_exception(refused.value))


@pytest.mark.parametrize("args", [("--two-backwards",), ("--alternate-steps",), ("--skip-odd-steps",)],
                         ids=["two-manual-backwards", "alternating-optimizers", "optimizer-step-skipped"])
def test_a_second_backward_before_the_tables_step_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]
) -> None:
    # Under DDP the tables' gradients would add up for their optimizer's step, or wait for it.
    error = refusal_in_this_process(tmp_path, monkeypatch, "--steps", "4", *args, "--sharding", "table_wise")
    assert "a backward ran again before the optimizer that holds the embedding tables" in error, error[-3000:]


def test_lr_finder_leaves_training_as_one_process(tmp_path: Path) -> None:
    # Its trial steps move the tables and Adagrad's state; the checkpoint it restores must undo both.
    run_worker(tmp_path, "--steps", str(STEPS), "--lr-find", "--start-method", "popen", "--optimizer", "adagrad",
               "--policy", every_table("row_wise"), "--save", "final.ckpt")
    ref_losses, ref_state = reference_run(STEPS, GLOBAL_BATCH, "adagrad", LR)
    torch.testing.assert_close(global_losses(tmp_path), ref_losses, rtol=RTOL, atol=ATOL)
    assert_same_state(full_state(tmp_path / "final.ckpt.full.pt"), ref_state)


def test_two_lookups_per_step_train_as_one_process_with_sgd(tmp_path: Path) -> None:
    # Plain SGD: FBGEMM's update per lookup, in turn, is DDP's update of their summed gradient.
    run_worker(tmp_path, "--steps", str(STEPS), "--lookups", "2", "--policy", every_table("row_wise"),
               "--save", "final.ckpt")
    ref_losses, ref_state = reference_run(STEPS, GLOBAL_BATCH, "sgd", LR, lookups=2)
    torch.testing.assert_close(global_losses(tmp_path), ref_losses, rtol=RTOL, atol=ATOL)
    assert_same_state(full_state(tmp_path / "final.ckpt.full.pt"), ref_state)


def test_two_lookups_per_step_are_refused_where_updates_do_not_add_up(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, "--steps", "2", "--lookups", "2", "--sharding", "table_wise", "--optimizer", "adagrad",
                      expect_ok=False)
    assert proc.returncode != 0
    assert "ebc ran forward again before the backward" in proc.stderr, proc.stderr[-3000:]


def test_a_table_learning_rate_changed_between_forward_and_backward_is_refused(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, "--steps", "2", "--schedule-before-backward", "--sharding", "table_wise",
                      expect_ok=False)
    assert proc.returncode != 0
    assert "changed its learning rate from 0.4 to 0.2 between the forward and the backward" in proc.stderr, \
        proc.stderr[-3000:]


def test_bf16_mixed_trains_close_to_one_process(tmp_path: Path) -> None:
    run_worker(tmp_path, "--steps", str(STEPS), "--precision", "bf16-mixed", "--policy", every_table("row_wise"),
               "--save", "final.ckpt")
    _, ref_state = reference_run(STEPS, GLOBAL_BATCH, "sgd", LR)
    state = full_state(tmp_path / "final.ckpt.full.pt")
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=2e-2, msg=key)


def test_validate_without_fit_uses_rank_zeros_dense_weights(tmp_path: Path) -> None:
    run_worker(tmp_path, "--steps", "2", "--validate-only", "--policy", every_table("row_wise"))
    rank0, rank1 = (torch.load(tmp_path / f"dense{r}.pt") for r in range(2))
    assert_same_state(rank1, rank0)


def test_consolidated_checkpoint_serves_a_meta_built_module(tmp_path: Path) -> None:
    """Fork hands the trained tables back into meta-built tables; consolidate + load_from_checkpoint serve."""
    from tiny import TinyRecModule, make_batch, rank_slice

    run_worker(tmp_path, "--steps", str(STEPS), "--meta-tables", "--policy", every_table("row_wise"),
               "--save", "final.ckpt", "--predict")
    served = TinyRecModule.load_from_checkpoint(tmp_path / "final.ckpt.full.pt")
    assert served.hparams.device == "meta" and not any(p.is_meta for p in served.parameters())
    with torch.no_grad():
        expected = torch.cat([served.predict_step(rank_slice(make_batch(step, GLOBAL_BATCH), 0, 2), step)
                              for step in range(STEPS)])
    # predictions.pt: the sharded model's, from the tables fork handed back to the launching process.
    torch.testing.assert_close(torch.load(tmp_path / "predictions.pt"), expected, rtol=RTOL, atol=ATOL)
    weights_only = TinyRecModule.load_from_checkpoint(tmp_path / "final.ckpt.full.pt", weights_only=True)
    assert_same_state(weights_only.state_dict(), served.state_dict())


def test_hand_back_opt_out_leaves_no_untrained_weights_in_the_launching_process(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, "--steps", "2", "--policy", every_table("row_wise", hand_back_weights=False))
    assert all(torch.load(tmp_path / "launcher_params_meta.pt").values())
    assert "hand_back_weights=False" in proc.stderr


def test_model_checkpoint_top_k_and_resume_from_last(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    common = ("--steps", str(STEPS), "--policy", every_table("row_wise"), "--checkpoint-dir", str(checkpoints))
    run_worker(tmp_path / "first", *common, "--max-steps", str(STEPS))
    names = sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith("."))
    assert len(names) == 3 and "last.ckpt" in names, names  # top 2 by train_loss, and last
    # Versions of removed checkpoints are gone: one per checkpoint left.
    assert len([p for p in checkpoints.iterdir() if p.name.startswith(".")]) == 3
    run_worker(tmp_path / "resumed", *common, "--max-steps", str(STEPS + 2), "--resume", "last",
               "--save", "final.ckpt")
    _, ref_state = reference_run(STEPS + 2, GLOBAL_BATCH, "sgd", LR, steps_per_epoch=STEPS)
    assert_same_state(full_state(tmp_path / "resumed" / "final.ckpt.full.pt"), ref_state)

    # As under DDP, the checkpoint hooks see the whole state dict, and what on_load_checkpoint
    # leaves in it is what loads, keys the checkpoint lacks included; keys that still do not match
    # the module are refused (strict_loading).
    run_worker(tmp_path / "edited", *common, "--max-steps", str(STEPS + 2), "--resume", "last", "--checkpoint-hooks",
               "--extra-layer", "--save", "final.ckpt")
    assert torch.load(tmp_path / "edited" / "saved_keys0.pt") == sorted([*ref_state, "extra"])
    edited = full_state(tmp_path / "edited" / "final.ckpt.full.pt")
    assert edited["mlp.2.bias"].eq(0).all() and edited.pop("extra").eq(3).all()
    assert_same_state({k: v for k, v in edited.items() if k != "mlp.2.bias"},
                      {k: v for k, v in ref_state.items() if k != "mlp.2.bias"})
    proc = run_worker(tmp_path / "extra", *common, "--max-steps", str(STEPS + 2), "--resume", "last", "--extra-layer",
                      expect_ok=False)
    assert 'Missing key(s) in state_dict: "extra".' in proc.stderr, proc.stderr[-3000:]


def test_warm_start_from_a_consolidated_checkpoint(tmp_path: Path) -> None:
    # SGD has no state, so restarting its optimizer loses nothing: the result is the continuous run's.
    # Epochs of 2 batches: the saved run ends at an epoch's end (the data's position is not saved).
    common = ("--steps", "2", "--policy", every_table("row_wise"))
    run_worker(tmp_path / "half", *common, "--max-steps", "2", "--save", "half.ckpt")
    proc = run_worker(tmp_path / "warm", *common, "--max-steps", "4",
                      "--resume", str(tmp_path / "half" / "half.ckpt.full.pt"), "--save", "final.ckpt")
    assert "start fresh" not in proc.stderr  # SGD keeps no state, and the dense groups' state is in the file
    _, ref_state = reference_run(4, GLOBAL_BATCH, "sgd", LR, steps_per_epoch=2)
    assert_same_state(full_state(tmp_path / "warm" / "final.ckpt.full.pt"), ref_state)


def test_warm_start_under_a_plan_that_replicates_other_tables_keeps_each_state_with_its_parameter(
        tmp_path: Path) -> None:
    # Saved with t0 replicated (its Adagrad state among the dense optimizer's), warm started with t2
    # replicated instead: t0's state goes to its fused kernel, the dense parameters keep theirs, and
    # what the consolidated file lacks (the sharded tables' fused state, here t1, t2, t3) starts anew.
    def policy(replicated: str) -> str:
        return json.dumps({"sharding_types": {name: "data_parallel" if name == replicated else "row_wise"
                                              for name, _, _ in TABLES}})

    common = ("--steps", "2", "--optimizer", "adagrad")
    run_worker(tmp_path / "half", *common, "--policy", policy("t0"), "--max-steps", "2", "--save", "half.ckpt")
    proc = run_worker(tmp_path / "warm", *common, "--policy", policy("t2"), "--max-steps", "4",
                      "--resume", str(tmp_path / "half" / "half.ckpt.full.pt"), "--save", "final.ckpt")
    assert "the optimizer state of ['ebc.embedding_bags.t2.weight'] and the fused optimizer state of tables " \
           "['t1', 't3'] start fresh" in proc.stderr, proc.stderr[-3000:]
    _, ref_state = reference_run(4, GLOBAL_BATCH, "adagrad", LR, steps_per_epoch=2,
                                 fresh_tables_at=(2, ["t1", "t2", "t3"]))
    assert_same_state(full_state(tmp_path / "warm" / "final.ckpt.full.pt"), ref_state)


def test_no_checkpoint_between_a_backward_and_its_optimizer_step(tmp_path: Path) -> None:
    # The tables are updated in the backward; such a checkpoint would make a resume update them twice.
    # popen: the ranks run the exception's callbacks themselves (under fork the launching process does,
    # with its own module, as under DDP).
    proc = run_worker(tmp_path, "--steps", "4", "--fail-before-step", "2", "--sharding", "row_wise",
                      "--start-method", "popen", expect_ok=False)
    assert "failing before the optimizer step of step 2" in proc.stderr, proc.stderr[-3000:]
    assert "on_exception.ckpt not saved: it would fall between a backward and its optimizer step" in proc.stderr
    assert not (tmp_path / "on_exception.ckpt").exists()


def test_resume_from_a_checkpoint_written_under_ddp_goes_on_as_ddp(tmp_path: Path) -> None:
    # One plain process on the global batches writes what strategy="ddp" writes: the tables' Adagrad
    # state among the dense parameters' in one optimizer's state. Resumed sharded (every kind of
    # table, one replicated), the dense state goes to the dense optimizer, the tables' to FBGEMM.
    torch.manual_seed(0)  # the reference's initial weights
    module = TinyRecModule(optimizer="adagrad", lr=LR)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(GlobalBatches(2, GLOBAL_BATCH, rank=0, world_size=1), batch_size=None))
    trainer.save_checkpoint(tmp_path / "ddp.ckpt")
    policy = json.dumps({"sharding_types": {"t0": "table_wise", "t1": "row_wise", "t2": "data_parallel",
                                            "t3": "column_wise"}})
    proc = run_worker(tmp_path / "resumed", "--steps", "2", "--max-steps", "4", "--optimizer", "adagrad",
                      "--policy", policy, "--resume", str(tmp_path / "ddp.ckpt"), "--save", "final.ckpt")
    assert "start fresh" not in proc.stderr
    _, ref_state = reference_run(4, GLOBAL_BATCH, "adagrad", LR, steps_per_epoch=2)
    assert_same_state(full_state(tmp_path / "resumed" / "final.ckpt.full.pt"), ref_state)


@pytest.mark.parametrize("where", ["train", "save"])
def test_killed_rank_then_restart_loses_nothing(tmp_path: Path, where: str) -> None:
    """kill -9 of rank 1 mid-training or mid-save; a restart from last.ckpt ends where an uninterrupted run does.

    Checkpoints at epoch ends (2 batches each): resuming mid-epoch would replay the epoch's first
    batches, since the test's data does not record its position.
    """
    checkpoints = tmp_path / "checkpoints"
    common = ("--steps", "2", "--optimizer", "adagrad", "--policy", every_table("row_wise"),
              "--checkpoint-dir", str(checkpoints), "--checkpoint-every-epoch", "--max-steps", "6")
    # train: killed as step 3 starts (last good: step 2). save: after its shards of its 4th save, the
    # one of last.ckpt at step 4 (each epoch end saves epoch=...ckpt, then last.ckpt); rank 0 may or
    # may not link the new version before the launcher stops it, so last.ckpt is step 2 or 4, whole.
    kill = "1:3:train" if where == "train" else "1:4:save"
    proc = run_worker(tmp_path / "killed", *common, "--kill", kill, expect_ok=False)
    assert proc.returncode != 0
    last_step = torch.load(checkpoints / "last.ckpt" / "meta.pt", weights_only=False)["global_step"]
    assert last_step == 2 if where == "train" else last_step in (2, 4)
    run_worker(tmp_path / "restarted", *common, "--resume", "last", "--save", "final.ckpt")
    _, ref_state = reference_run(6, GLOBAL_BATCH, "adagrad", LR, steps_per_epoch=2)
    assert_same_state(full_state(tmp_path / "restarted" / "final.ckpt.full.pt"), ref_state)


def test_slurm_requeue_checkpoints_every_rank_at_one_step_and_the_requeued_job_resumes(tmp_path: Path) -> None:
    """SLURM's requeue warning (SIGUSR1) reaching the ranks after different batches: one checkpoint, between steps.

    Lightning saves it from the signal handler, where each rank happens to be; sharded, that save is
    a collective. The ranks are started as srun starts them, each with its SLURM variables; the
    requeued job (the same command again) resumes from that checkpoint by itself.
    """
    from lightning_dembed import consolidate_checkpoint

    def srun(*args: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
                 "SLURM_JOB_NAME": "requeue-test", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "127.0.0.1",
                 "MASTER_PORT": str(port)}
        command = [sys.executable, str(Path(__file__).parent / "worker.py"), "--out", str(tmp_path), "--devices", "2",
                   "--global-batch", str(GLOBAL_BATCH), "--lr", str(LR), "--steps", "3", "--max-steps", "6",
                   "--start-method", "popen", "--policy", every_table("row_wise"), "--optimizer", "adagrad", *args]
        ranks = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)})
                 for r in (0, 1)]
        outputs = [rank.communicate(timeout=300)[0] for rank in ranks]
        assert [rank.returncode for rank in ranks] == [0, 0], "\n".join(output[-3000:] for output in outputs)

    srun("--signal-after", "1:1,0:2", "--agree-on-signals-every-step")
    assert sorted(path.name for path in tmp_path.glob("hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt"]
    checkpoint = consolidate_checkpoint(tmp_path / "hpc_ckpt_1.ckpt")
    # Marked after batch 1 (rank 1), counted in step 2's all-reduce, read as step 3 starts.
    assert checkpoint["global_step"] == 3
    _, ref_state = reference_run(3, GLOBAL_BATCH, "adagrad", LR, steps_per_epoch=3)
    assert_same_state(checkpoint["state_dict"], ref_state)
    srun("--save", "final.ckpt")  # requeued: Lightning resumes from hpc_ckpt_1 under SLURM
    assert len(torch.load(tmp_path / "rank0.pt")["losses"]) == 3  # steps 3 to 5 only
    _, ref_state = reference_run(6, GLOBAL_BATCH, "adagrad", LR, steps_per_epoch=3)
    assert_same_state(full_state(tmp_path / "final.ckpt.full.pt"), ref_state)


def test_sigterm_reaching_ranks_after_different_batches_stops_every_rank_after_one_step(tmp_path: Path) -> None:
    """SIGTERM (a preemption, scancel, a stopped pod) reaching the ranks after different batches.

    Lightning's handler broadcasts from inside the signal, wherever each rank is: on gloo that
    aborted on the mismatched collective here and hung `strategy="ddp"` (both probed). Now every
    rank stops after one same step, OnExceptionCheckpoint saves one whole checkpoint there, and a
    restart from it ends where an uninterrupted run does.
    """
    from lightning_dembed import consolidate_checkpoint

    common = ("--steps", "3", "--max-steps", "6", "--optimizer", "adagrad", "--policy", every_table("row_wise"),
              "--start-method", "popen")
    stopped = tmp_path / "stopped"
    proc = run_worker(stopped, *common, "--signal", "SIGTERM", "--signal-after", "1:0,0:1", "--checkpoint-on-exception",
                      "--agree-on-signals-every-step")
    assert "[rank: 1] Received SIGTERM" in proc.stderr and "[rank: 0] Received SIGTERM" in proc.stderr
    checkpoint = consolidate_checkpoint(stopped / "on_exception.ckpt")
    # Marked after batch 0 (rank 1), counted in batch 1's all-reduce, read as batch 2 starts; that step ends fit.
    assert checkpoint["global_step"] == 3
    _, ref_state = reference_run(3, GLOBAL_BATCH, "adagrad", LR, steps_per_epoch=3)
    assert_same_state(checkpoint["state_dict"], ref_state)
    restarted = tmp_path / "restarted"
    run_worker(restarted, *common, "--resume", str(stopped / "on_exception.ckpt"), "--save", "final.ckpt")
    _, ref_state = reference_run(6, GLOBAL_BATCH, "adagrad", LR, steps_per_epoch=3)
    assert_same_state(full_state(restarted / "final.ckpt.full.pt"), ref_state)
