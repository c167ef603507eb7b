"""Fails loudly when a Lightning upgrade changes the private pieces lightning-dembed builds on."""

from __future__ import annotations

import inspect

from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput

import lightning_dembed._lightning_private as private


def test_launcher_hook_exists_with_expected_signature() -> None:
    params = list(inspect.signature(_MultiProcessingLauncher._collect_rank_zero_results).parameters)
    assert params == ["self", "trainer", "results"]
    assert "weights_path" in _WorkerOutput._fields
    assert issubclass(private.ShardedMultiProcessingLauncher, _MultiProcessingLauncher)
