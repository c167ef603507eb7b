"""The strategy's train dataloader one batch ahead, which dataloaders it runs ahead of, and how ranks agree to use it (one process)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from lightning_dembed import HybridParallelStrategy
from lightning_dembed.sharding import lookup as lookup_module
from lightning_dembed.sharding.hooks import FeatureCheck
from lightning_dembed.sharding.lookup import ShardedLookup, find_features
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


class _Count:
    """``dist.all_reduce`` as a stand-in: adds the other ranks' part to the tensor, records how it is called and awaited."""

    def __init__(self, others: int) -> None:
        self.others, self.waited, self.async_ops = others, [], []

    def __call__(self, tensor: torch.Tensor, op: object = None, group: object = None, async_op: bool = False):
        self.async_ops.append(async_op)
        tensor += self.others
        count = self

        class Work:
            def wait(self) -> bool:
                count.waited.append(int(tensor))
                return True

        return Work()


def _lookup_with_one_input_ahead(monkeypatch, others: int, extra_key: bool = False
                                 ) -> tuple[ShardedLookup, KeyedJaggedTensor, _Count]:
    count = _Count(others)
    monkeypatch.setattr(lookup_module.dist, "all_reduce", count)
    monkeypatch.setattr(lookup_module.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(lookup_module.dist, "get_rank", lambda group=None: 1)
    table = EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=4, feature_names=["f"])
    lookup = ShardedLookup(module=None, check=FeatureCheck("ebc", [table]), sharding_types={"table_wise"},
                           check_ids=False, control_group=None, updates_add_up=True)
    features = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    given = KeyedJaggedTensor(keys=["f", "g"], values=torch.tensor([1, 2, 5, 6]), lengths=torch.ones(4, dtype=torch.int64)) \
        if extra_key else features  # the batch's KJT holding another module's feature too
    exchanged = _Exchanged(_Exchanged(features))  # the exchange of the splits, then of the ids: both done
    lookup._started.append(lookup_module._StartedInput(given, features, 2, None, exchanged, lookup_module._versions(given)))
    return lookup, given, count


class _Exchanged:
    """An exchange already done: its result at once."""

    def __init__(self, result: object) -> None:
        self.result = result

    def wait(self) -> object:
        return self.result


def test_a_rank_given_its_batch_uses_the_input_started_ahead_without_waiting_for_the_others(monkeypatch) -> None:
    lookup, features, count = _lookup_with_one_input_ahead(monkeypatch, others=0)
    assert lookup._take(features, training=True) is not None
    assert count.async_ops == [True] and count.waited == []  # the count travels meanwhile
    lookup.drain()
    assert count.waited == [0]


def test_a_rank_given_other_features_waits_and_fails_where_another_rank_went_on(monkeypatch) -> None:
    lookup, features, count = _lookup_with_one_input_ahead(monkeypatch, others=0)
    edited = KeyedJaggedTensor(keys=["f"], values=torch.tensor([3, 4]), lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"ebc: on rank 1 this step's forward was given other sparse features.*pipeline=False"):
        lookup._take(edited, training=True)
    lookup, features, count = _lookup_with_one_input_ahead(monkeypatch, others=1)  # every rank was given others
    assert lookup._take(edited, training=True) is None and count.waited == [2]


def test_a_module_called_with_its_own_split_of_the_batch_stops_prefetching_at_once(monkeypatch) -> None:
    # The input was started from the batch's KJT (more features than the module's); the model splits
    # that KJT itself, so no input started ahead will ever be used: every rank stops at the first step.
    lookup, given, count = _lookup_with_one_input_ahead(monkeypatch, others=1, extra_key=True)
    split = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    assert lookup._take(split, training=False) is None  # validation between two steps: kept for the next
    assert lookup.prefetching and len(lookup._started) == 1
    assert lookup._take(split, training=True) is None
    assert not lookup.prefetching and lookup._started == []


class _Module:
    """A sharded module's stages, each done at once: the splits' exchange, then the ids' (TorchRec's two awaits)."""

    training = True

    def create_context(self) -> None:
        return None

    def input_dist(self, context: None, features: KeyedJaggedTensor) -> _Exchanged:
        return _Exchanged(_Exchanged(features))

    def compute_and_output_dist(self, context: None, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return features


def test_check_ids_checks_the_ids_looked_up_not_those_started_ahead(monkeypatch) -> None:
    monkeypatch.setattr(lookup_module.dist, "all_reduce", _Count(others=1))
    monkeypatch.setattr(lookup_module.dist, "get_world_size", lambda group=None: 2)
    table = EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=4, feature_names=["f"])
    lookup = ShardedLookup(module=_Module(), check=FeatureCheck("ebc", [table]), sharding_types={"table_wise"},
                           check_ids=True, control_group=None, updates_add_up=True)
    raw = KeyedJaggedTensor(keys=["f"], values=torch.tensor([4000]), lengths=torch.tensor([1]))
    lookup.prefetch(raw)  # the batch's raw ids, which a managed-collision wrapper remaps before the lookup
    remapped = KeyedJaggedTensor(keys=["f"], values=torch.tensor([4]), lengths=torch.tensor([1]))
    with torch.no_grad():
        assert lookup(remapped).values().tolist() == [4]
        with pytest.raises(ValueError, match="feature 'f' has id 4000 outside table 't'"):
            lookup(raw)


def test_an_embedding_collections_output_loses_the_padding_rows() -> None:
    # Row-wise tables on gloo look up a short batch padded with empty bags; an EmbeddingCollection's
    # per-feature JaggedTensors must come back with the batch's own rows, as unsharded.
    from torchrec.sparse.jagged_tensor import JaggedTensor

    padded = {"f": JaggedTensor(values=torch.ones(3, 4), lengths=torch.tensor([2, 1, 0]))}
    trimmed = lookup_module._first_rows(padded, rows=2)["f"]
    assert trimmed.lengths().tolist() == [2, 1] and torch.equal(trimmed.values(), torch.ones(3, 4))
