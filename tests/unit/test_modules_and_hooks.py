"""DistributedEmbedding against plain layers, and the checks hooked onto embedding modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

from lightning_dembed import DistributedEmbedding
from lightning_dembed.sharding.hooks import FeatureCheck, register_output_order


def test_distributed_embedding_matches_plain_layers() -> None:
    torch.manual_seed(0)
    layers = [nn.EmbeddingBag(100, 16, mode="sum"), nn.Embedding(50, 8), nn.EmbeddingBag(30, 4, mode="mean")]
    embedding = DistributedEmbedding(layers)
    inputs = [torch.randint(100, (4, 3)), torch.randint(50, (4, 2, 5)), torch.randint(30, (4, 5))]
    for got, layer, x in zip(embedding(inputs), layers, inputs):
        torch.testing.assert_close(got, layer(x))
    # Gradients flow into the collection's tables as they would into the layers.
    sum(o.sum() for o in embedding(inputs)).backward()
    assert embedding.bags.embedding_bags["table_0"].weight.grad is not None


def test_distributed_embedding_on_meta_and_bad_layers() -> None:
    with torch.device("meta"):
        layers = [nn.EmbeddingBag(10**9, 64)]
    assert DistributedEmbedding(layers).bags.embedding_bags["table_0"].weight.is_meta
    with pytest.raises(ValueError, match=r"layer 0 .* sets \['padding_idx'\]"):
        DistributedEmbedding([nn.Embedding(10, 4, padding_idx=0)])
    with pytest.raises(ValueError, match="mode='max'"):
        DistributedEmbedding([nn.EmbeddingBag(10, 4, mode="max")])
    with pytest.raises(ValueError, match="scale_grad_by_freq"):  # FBGEMM's kernels would ignore it
        DistributedEmbedding([nn.Embedding(10, 4, scale_grad_by_freq=True)])
    with pytest.raises(ValueError, match=r"input for nn.EmbeddingBag 'table_0' must be \[batch, ids per bag\]"):
        DistributedEmbedding([nn.EmbeddingBag(10, 4)])([torch.tensor([1, 2])])


def test_distributed_embedding_keeps_a_frozen_layer_frozen() -> None:
    pretrained = nn.Embedding.from_pretrained(torch.randn(10, 4), freeze=True)
    embedding = DistributedEmbedding([pretrained, nn.Embedding(10, 4)], names=["frozen", "trained"])
    tables = embedding.sequences.embeddings
    assert not tables["frozen"].weight.requires_grad and tables["trained"].weight.requires_grad
    torch.testing.assert_close(tables["frozen"].weight, pretrained.weight)


def test_one_collection_at_two_paths_is_refused() -> None:
    from lightning_dembed.modules.discovery import find_embedding_modules

    model = nn.Module()
    model.ebc = ebc()
    model.tower = nn.Module()
    model.tower.ebc = model.ebc  # sharding would replace it under one path and leave the other unsharded
    with pytest.raises(ValueError, match="the same EmbeddingBagCollection is both 'ebc' and 'tower.ebc'"):
        find_embedding_modules(model)


def test_plain_embedding_layers_beside_collections_are_found_and_named() -> None:
    from lightning_dembed.modules.discovery import find_plain_embedding_layers
    from lightning_dembed.strategies.hybrid_parallel import _warn_of_plain_embedding_layers

    model = nn.Module()
    model.tables = ebc()  # TorchRec's collections hold nn.EmbeddingBag layers inside: not plain ones
    model.wrapped = DistributedEmbedding([nn.Embedding(50, 8)])
    model.tower = nn.Sequential(nn.Embedding(1024, 32), nn.Linear(32, 1))
    assert list(find_plain_embedding_layers(model)) == ["tower.0"]
    with pytest.warns(UserWarning, match=r"tower.0 \(Embedding 1024x32, 0.1 MiB\) stay whole on every rank.*"
                                         r"DistributedEmbedding"):
        _warn_of_plain_embedding_layers(model)
    del model.tower
    assert find_plain_embedding_layers(model) == {}


def test_collections_whose_input_a_torchrec_wrapper_rewrites_are_told_apart() -> None:
    # Their input is made in the step, so the pipeline starts nothing ahead for them.
    from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
    from torchrec.modules.mc_modules import LRU_EvictionPolicy, ManagedCollisionCollection, MCHManagedCollisionModule

    from lightning_dembed.modules.discovery import find_embedding_modules, input_rewritten_by_wrapper

    tables = ebc()
    remapping = ManagedCollisionCollection(
        {t.name: MCHManagedCollisionModule(zch_size=t.num_embeddings, device=torch.device("cpu"),
                                           eviction_policy=LRU_EvictionPolicy(), eviction_interval=1)
         for t in tables.embedding_bag_configs()},
        tables.embedding_bag_configs(),
    )
    model = nn.Module()
    model.plain = ebc()
    model.tower = nn.Module()
    model.tower.remapped = ManagedCollisionEmbeddingBagCollection(tables, remapping)
    found = find_embedding_modules(model)
    assert {path: input_rewritten_by_wrapper(model, path) for path in found} == {
        "plain": False, "tower.remapped._embedding_module": True,
    }


def ebc() -> EmbeddingBagCollection:
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name="t_user", num_embeddings=10, embedding_dim=4, feature_names=["user"]),
            EmbeddingBagConfig(name="t_item", num_embeddings=5, embedding_dim=4, feature_names=["item"]),
        ]
    )


def kjt(keys: list[str], values: list[int]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=keys, values=torch.tensor(values), lengths=torch.ones(len(values), dtype=torch.int64))


def check(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    feature_check = FeatureCheck.of(ebc(), "model.sparse")
    own = feature_check.own(features)
    feature_check.ids(own)
    return own


def test_valid_input_passes() -> None:
    features = kjt(["user", "item"], [9, 4])
    assert check(features) is features


def test_out_of_range_id_names_feature_and_table() -> None:
    with pytest.raises(ValueError, match=r"feature 'item' has id 5 outside table 't_item', which has 5 rows"):
        check(kjt(["user", "item"], [9, 5]))
    with pytest.raises(ValueError, match=r"feature 'user' has id -1"):
        check(kjt(["user", "item"], [-1, 0]))


def test_features_no_table_consumes_are_left_out_as_unsharded() -> None:
    # One KeyedJaggedTensor for several modules: each looks up its own features, by name.
    features = KeyedJaggedTensor(keys=["age", "user", "item"], values=torch.tensor([30, 7, 8, 2]),
                                 lengths=torch.tensor([1, 2, 1]), weights=torch.tensor([0.5, 1.0, 2.0, 3.0]))
    own = check(features)
    assert own.keys() == ["user", "item"]
    assert own.to_dict()["user"].values().tolist() == [7, 8]
    assert own.weights().tolist() == [1.0, 2.0, 3.0]
    module = ebc()  # unsharded, it ignores "age": the selection looks up the same
    torch.testing.assert_close(module(own).values(), module(features).values(), rtol=0, atol=0)


def test_own_features_come_in_the_module_order_whatever_the_input_order() -> None:
    # TorchRec's sharded input stage keeps the order of the first input it sees and applies it to
    # every later one without reading the keys: each input is put in one order, the module's.
    own = check(kjt(["item", "user"], [4, 9]))
    assert own.keys() == ["user", "item"] and own.values().tolist() == [9, 4]


def test_a_variable_batch_kjt_with_other_modules_features_is_refused_by_name() -> None:
    vbe = KeyedJaggedTensor(keys=["user", "item", "age"], values=torch.tensor([1, 2, 3]),
                            lengths=torch.tensor([1, 1, 1]), stride_per_key_per_rank=[[1], [1], [1]],
                            inverse_indices=(["user", "item", "age"], torch.zeros(3, 1, dtype=torch.int64)))
    with pytest.raises(ValueError, match=r"model.sparse: a variable-batch KeyedJaggedTensor .*\['age'\]"):
        check(vbe)


def test_missing_features_are_named() -> None:
    with pytest.raises(ValueError, match=r"feature\(s\) \['item'\] \(tables \['t_item'\]\) are missing"):
        check(KeyedJaggedTensor(keys=["user"], values=torch.tensor([1]), lengths=torch.tensor([1])))


def test_output_order_restored() -> None:
    module = ebc()

    class Shuffled(nn.Module):
        def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
            out = module(features).to_dict()
            return KeyedTensor.from_tensor_list(["item", "user"], [out["item"], out["user"]])

    shuffled = Shuffled()
    register_output_order(shuffled, module)
    features = kjt(["user", "item"], [3, 2])
    assert shuffled(features).keys() == ["user", "item"]
    torch.testing.assert_close(shuffled(features).values(), module(features).values())


def test_output_order_hook_never_waits_early() -> None:
    from torchrec.distributed.types import LazyAwaitable

    module = ebc()
    features = kjt(["user", "item"], [3, 2])

    class Lazy(LazyAwaitable[KeyedTensor]):
        waited = False

        def _wait_impl(self) -> KeyedTensor:
            Lazy.waited = True
            return module(features)

    class Sharded(nn.Module):
        def forward(self, features: KeyedJaggedTensor) -> LazyAwaitable[KeyedTensor]:
            return Lazy()

    sharded = Sharded()
    assert register_output_order(sharded, module)
    output = sharded(features)
    assert not Lazy.waited
    assert output.wait().keys() == ["user", "item"]
