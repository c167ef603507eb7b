"""Exact resume mid-epoch: 2K steps equal K steps, a save, a resume in fresh processes and K more.

On the project's data modules, with shuffling on (Criteo's batch order, the task store's rows),
over an epoch boundary, on 2 processes (and on 1 for the task store; each rank reads its own share
of the data, so a run continues on the world size it started with).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from warm import run_script  # noqa: E402

from lightning_dembed.data import preprocess, write_fake_criteo_tsv  # noqa: E402

WORKER = Path(__file__).parent / "data_worker.py"
# Epochs of 5 (synthetic), 6 (criteo) and 4 (tasks) batches: step 3 is mid-epoch, 9 in the next one.
STEPS, SAVE_AT = 9, 3


def run(out: Path, data: str, data_dir: Path, *args: str, devices: int = 2) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # The worker forks its ranks; a forked child of a process that has started OpenMP threads hangs
    # in its first parallel op (GNU libgomp), and DLRMModule's metric states start them: one thread.
    proc = run_script(WORKER, ["--out", str(out), "--data", data, "--data-dir", str(data_dir), "--devices",
                               str(devices), *args], cwd=out, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def criteo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("criteo")
    write_fake_criteo_tsv(root / "train.txt", 16 * 8)
    preprocess([root / "train.txt"], root / "preprocessed", num_embeddings_per_feature=64)
    return root / "preprocessed"


@pytest.mark.parametrize("data", ["synthetic", "criteo", "tasks"])
def test_resume_mid_epoch_equals_uninterrupted(tmp_path: Path, data: str, criteo_dir: Path) -> None:
    data_dir = criteo_dir if data == "criteo" else tmp_path
    # One process too for the task store, whose position is the most involved (meta-batches and rows).
    for devices in (2, 1) if data == "tasks" else (2,):
        continuous, resumed = tmp_path / f"continuous_{devices}", tmp_path / f"resumed_{devices}"
        run(continuous, data, data_dir, "--max-steps", str(STEPS), "--save-at", str(SAVE_AT), devices=devices)
        run(resumed, data, data_dir, "--max-steps", str(STEPS), "--resume", str(continuous / "step.ckpt"),
            devices=devices)
        expected = torch.load(continuous / "final.full.pt", weights_only=False)["state_dict"]
        actual = torch.load(resumed / "final.full.pt", weights_only=False)["state_dict"]
        for key, value in expected.items():
            torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-6, msg=f"{devices} ranks: {key}")
