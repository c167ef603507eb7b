"""On a CUDA machine: NCCL + FBGEMM's CUDA kernels train what the CPU reference trains."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_hybrid_parallel_integration import GLOBAL_BATCH, LR, STEPS, full_state, global_losses, run_worker  # noqa: E402
from tiny import TABLES, reference_run  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "column_wise", "data_parallel"])
def test_gpu_training_matches_cpu_reference(tmp_path: Path, sharding: str) -> None:
    devices = min(torch.cuda.device_count(), 2)
    policy = json.dumps({"sharding_types": {name: sharding for name, _, _ in TABLES}})
    run_worker(tmp_path, "--steps", str(STEPS), "--policy", policy, "--accelerator", "gpu", "--save", "final.ckpt",
               devices=devices)
    ref_losses, ref_state = reference_run(STEPS, GLOBAL_BATCH, "sgd", LR)
    # GPU kernels sum in another order than the CPU: a looser tolerance than the CPU parity tests.
    torch.testing.assert_close(global_losses(tmp_path, devices), ref_losses, rtol=1e-4, atol=1e-5)
    state = full_state(tmp_path / "final.ckpt.full.pt")
    for key, expected in ref_state.items():
        torch.testing.assert_close(state[key].cpu(), expected, rtol=1e-4, atol=1e-5, msg=key)
