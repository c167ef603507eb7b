"""A crash while writing a checkpoint leaves the last good one as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lightning_dembed.checkpoint import consolidate_checkpoint, load_sharded_checkpoint, save_sharded_checkpoint


def save(path: Path, value: float) -> None:
    save_sharded_checkpoint(
        path, {"state_dict": {"w": torch.full((3,), value)}}, {"global_step": int(value)},
        is_global_zero=True, barrier=lambda: None,
    )


def test_crash_mid_write_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    save(path, 1.0)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(dcp, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save(path, 2.0)
    monkeypatch.undo()
    target = {"state_dict": {"w": torch.zeros(3)}}
    meta = load_sharded_checkpoint(path, target)
    assert meta["global_step"] == 1
    torch.testing.assert_close(target["state_dict"]["w"], torch.ones(3))
    save(path, 2.0)  # the leftover partial directory does not get in the way
    assert consolidate_checkpoint(path)["state_dict"]["w"].tolist() == [2.0, 2.0, 2.0]


def test_loading_something_else_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"not a directory")
    with pytest.raises(FileNotFoundError, match="is not a sharded checkpoint directory"):
        load_sharded_checkpoint(tmp_path / "model.ckpt", {})
