"""No instant at which the last good checkpoint is unreadable, whatever kills the saving process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lightning_dembed.checkpoint import (
    META_FILE,
    CheckpointError,
    consolidate_checkpoint,
    load_sharded_checkpoint,
    load_sharded_tensors,
    read_sharded_checkpoint,
    remove_sharded_checkpoint,
    reshaped_tensors,
    saved_keys,
    saved_only_entries,
    save_sharded_checkpoint,
    unsaved_tensors,
)


def save(path: Path, value: float) -> None:
    save_sharded_checkpoint(
        path, {"state_dict": {"w": torch.full((3,), value)}}, {"global_step": int(value)},
        is_global_zero=True, broadcast=lambda obj, src: obj,
    )


def load(path: Path) -> tuple[int, list[float]]:
    target = {"state_dict": {"w": torch.zeros(3)}}
    meta = load_sharded_checkpoint(path, target)
    return meta["global_step"], target["state_dict"]["w"].tolist()


def versions(path: Path) -> list[Path]:
    return sorted(path.with_name(f".{path.name}.versions").iterdir())


# Each step of the protocol: the module and function after which the process is killed, and at
# which call.
KILL_POINTS = {
    "after creating the version": ("_atomic", "new_version", 1),
    "after the shards": ("dcp", "save", 1),
    "after meta.pt": ("checkpoint", "_write_meta", 1),
    "after the fsync": ("_atomic", "_fsync_tree", 1),
    "after the link": ("_atomic", "_swap_link", 1),
    "after the cleanup": ("_atomic", "_remove_stale", 2),
}
KILLER = """
import os, sys, torch
sys.path.insert(0, {tests!r})
import lightning_dembed._atomic as _atomic
import lightning_dembed.checkpoint as checkpoint
from test_checkpoint_atomic import save
owner = {{"_atomic": _atomic, "checkpoint": checkpoint, "dcp": checkpoint.dcp}}[{module!r}]
original = getattr(owner, {name!r})
calls = []
def killed_after(*args, **kwargs):
    result = original(*args, **kwargs)
    calls.append(1)
    if len(calls) == {nth}:
        os.kill(os.getpid(), 9)
    return result
setattr(owner, {name!r}, killed_after)
save(__import__("pathlib").Path({path!r}), 2.0)
"""


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_at_each_step_leaves_a_loadable_checkpoint(tmp_path: Path, point: str) -> None:
    path = tmp_path / "last.ckpt"
    save(path, 1.0)
    module, name, nth = KILL_POINTS[point]
    tests = str(Path(__file__).parent)
    script = KILLER.format(tests=tests, module=module, name=name, nth=nth, path=str(path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    step, weights = load(path)
    expected = 2 if point in ("after the link", "after the cleanup") else 1
    assert (step, weights) == (expected, [float(expected)] * 3)
    # The next save (a restarted run) removes what the killed one left.
    save(path, 3.0)
    assert load(path) == (3, [3.0] * 3)
    assert len(versions(path)) == 1


def test_error_before_commit_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    save(path, 1.0)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(dcp, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save(path, 2.0)
    monkeypatch.undo()
    assert load(path) == (1, [1.0] * 3)
    save(path, 2.0)
    assert consolidate_checkpoint(path)["state_dict"]["w"].tolist() == [2.0, 2.0, 2.0]


def test_rank_zero_error_is_raised_on_the_other_ranks(tmp_path: Path) -> None:
    # What rank 1 receives when rank 0's part of the save failed.
    with pytest.raises(CheckpointError, match="failed on rank 0: OSError: No space left"):
        save_sharded_checkpoint(
            tmp_path / "last.ckpt", {"state_dict": {"w": torch.zeros(3)}}, {}, is_global_zero=False,
            broadcast=lambda obj, src: (None, "OSError: No space left on device"),
        )


def test_truncated_or_missing_shard_is_named(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    save(path, 1.0)
    shard = next(p for p in path.iterdir() if p.suffix == ".distcp")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"shard file .*{shard.name} is truncated"):
        load(path)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard file .*{shard.name} is missing"):
        load(path)
    shard.write_bytes(data)
    (path / META_FILE).write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match=f"{META_FILE} is truncated or corrupt"):
        consolidate_checkpoint(path)


def test_plain_directory_of_an_older_release_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    dcp.save({"state_dict": {"w": torch.full((3,), 1.0)}}, checkpoint_id=path)
    torch.save({"global_step": 1}, path / META_FILE)
    assert load(path) == (1, [1.0] * 3)
    save(path, 2.0)
    assert path.is_symlink() and load(path) == (2, [2.0] * 3)
    assert len(versions(path)) == 1


def test_remove_takes_the_versions_too(tmp_path: Path) -> None:
    path = tmp_path / "epoch=0.ckpt"
    save(path, 1.0)
    remove_sharded_checkpoint(path)
    assert list(tmp_path.iterdir()) == []


def test_loading_something_else_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a sharded checkpoint directory"):
        load_sharded_checkpoint(tmp_path / "model.ckpt", {})


class _NotAWeight:
    """Anything torch.load's weights_only mode refuses to unpickle."""


def test_weights_only_is_honoured_for_meta(tmp_path: Path) -> None:
    import pickle

    path = tmp_path / "last.ckpt"
    save_sharded_checkpoint(path, {"state_dict": {"w": torch.ones(3)}}, {"extra": _NotAWeight()},
                            is_global_zero=True, broadcast=lambda obj, src: obj)
    target = {"state_dict": {"w": torch.zeros(3)}}
    with pytest.raises(pickle.UnpicklingError):
        load_sharded_checkpoint(path, target, weights_only=True)
    assert isinstance(load_sharded_checkpoint(path, target, weights_only=False)["extra"], _NotAWeight)


def test_tensors_saved_with_another_shape_are_named(tmp_path: Path) -> None:
    # Optimizer state whose shape depends on the plan (RowWiseAdagrad over column shards): named
    # before DCP fails on it.
    path = tmp_path / "model.ckpt"
    save_sharded_checkpoint(path, {"state_dict": {"w": torch.zeros(4)}, "embedding_optimizer": {"t0.sum": torch.zeros(8)}},
                            {}, is_global_zero=True, broadcast=lambda obj, src: obj)
    _, sizes = read_sharded_checkpoint(path)
    here = {"state_dict": {"w": torch.zeros(4)}, "embedding_optimizer": {"t0.sum": torch.zeros(4)}}
    assert reshaped_tensors(here, sizes) == {"embedding_optimizer.t0.sum": ((8,), (4,))}


def test_keys_only_the_checkpoint_has_load_in_full(tmp_path: Path) -> None:
    # For on_load_checkpoint to rename or drop, as from a file under DDP; objects and nested values too.
    path = tmp_path / "model.ckpt"
    saved = {"kept": torch.ones(2), "renamed": torch.arange(6, dtype=torch.float16).view(2, 3),
             "extra": {"version": 3, "scale": torch.full((1,), 2.0)}}
    save_sharded_checkpoint(path, {"state_dict": saved}, {}, is_global_zero=True, broadcast=lambda obj, src: obj)
    _, held = read_sharded_checkpoint(path)
    assert saved_keys(held) == {"kept", "renamed", "extra"}
    module_state = {"kept": torch.zeros(2), "new": torch.zeros(1)}
    extra = saved_only_entries(held, module_state)
    assert sorted(extra) == ["extra", "renamed"] and extra["renamed"].dtype == torch.float16
    tensors = {"state_dict": {"kept": module_state["kept"], **extra}}
    load_sharded_tensors(path, tensors)
    loaded = tensors["state_dict"]
    assert module_state["kept"].eq(1).all() and loaded["renamed"].equal(saved["renamed"])
    assert loaded["extra"]["version"] == 3 and loaded["extra"]["scale"].eq(2).all()
    assert unsaved_tensors({"state_dict": {"kept": 0, "gone": torch.zeros(1)}}, held) == ["state_dict.gone"]
