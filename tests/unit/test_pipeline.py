"""The strategy's train dataloader one batch ahead, and which dataloaders it runs ahead of (one process)."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader
from torchrec import KeyedJaggedTensor

from lightning_dembed import HybridParallelStrategy
from lightning_dembed.sharding.lookup import find_features
from lightning_dembed.strategies.pipeline import PipelinedLoader


class Recording:
    """A stand-in for `LookupPipeline` that records what it is asked to do."""

    active = True

    def __init__(self) -> None:
        self.calls: list[object] = []

    def prefetch(self, batch: object) -> None:
        self.calls.append(("prefetch", batch))

    def drain(self) -> None:
        self.calls.append("drain")


def test_each_batch_is_prefetched_before_the_one_before_it_is_yielded() -> None:
    pipeline = Recording()
    loader = PipelinedLoader([0, 1, 2], pipeline, to_device=lambda b: b, same_length_on_every_rank=lambda: True)
    seen = []
    for batch in loader:
        seen.append(batch)
        seen.append(list(pipeline.calls))
    assert seen[0] == 0 and seen[1] == ["drain", ("prefetch", 0), ("prefetch", 1)]
    assert seen[2] == 1 and seen[3][-1] == ("prefetch", 2)
    assert seen[4] == 2 and seen[5][-1] == ("prefetch", 2)  # nothing after the last batch
    assert len(loader) == 3


def test_epochs_whose_lengths_differ_or_are_unknown_run_unpipelined() -> None:
    pipeline = Recording()
    loader = PipelinedLoader([0, 1], pipeline, to_device=lambda b: b, same_length_on_every_rank=lambda: False)
    assert list(loader) == [0, 1] and pipeline.calls == ["drain"]


def test_loader_attributes_are_the_wrapped_loaders() -> None:
    data = DataLoader(list(range(4)), batch_size=2)
    loader = PipelinedLoader(data, Recording(), to_device=lambda b: b, same_length_on_every_rank=lambda: True)
    assert loader.sampler is data.sampler and loader.batch_size == 2 and len(loader) == 2


def test_features_are_found_in_dataclasses_mappings_and_sequences() -> None:
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1]), lengths=torch.tensor([1]))
    assert find_features((torch.zeros(1), {"sparse": kjt}, [kjt])) == [kjt, kjt]
    assert find_features(torch.zeros(1)) == []


class _Module(LightningModule):
    pass


def _strategy_in_fit(training: bool) -> HybridParallelStrategy:
    strategy = HybridParallelStrategy(parallel_devices=[torch.device("cpu")])
    module = _Module()
    trainer = Trainer(accelerator="cpu", devices=1, logger=False)
    trainer.training = training
    module.trainer = trainer
    strategy._lightning_module = module
    strategy._pipeline = Recording()
    return strategy


def test_the_train_dataloader_is_run_ahead_unless_it_keeps_its_own_state() -> None:
    class Stateful(list):
        def state_dict(self) -> dict:
            return {}

    assert isinstance(_strategy_in_fit(True).process_dataloader([1, 2]), PipelinedLoader)
    stateful = Stateful([1, 2])
    assert _strategy_in_fit(True).process_dataloader(stateful) is stateful
    plain = [1, 2]
    assert _strategy_in_fit(False).process_dataloader(plain) is plain  # validation, predict
    assert HybridParallelStrategy(pipeline=False).process_dataloader(plain) is plain
