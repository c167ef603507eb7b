"""meta_step against a plain per-task reference: autograd through a Python loop over tasks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from lightning_dembed.meta.config import MetaLearningConfig
from lightning_dembed.meta.functional import InnerLearningRates, adapt_and_predict, meta_step, task_index

FEATURES = ["user", "item", "category"]
DIM, NUM_DENSE = 4, 3


class TinyMetaModel(nn.Module):
    """embed() is the lookup; forward takes the looked-up [R, F, D] tensor or a KJT."""

    def __init__(self) -> None:
        super().__init__()
        self.feature_names = FEATURES
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=f"t_{f}", num_embeddings=20, embedding_dim=DIM, feature_names=[f])
                    for f in FEATURES]
        )
        self.bottom = nn.Linear(NUM_DENSE, DIM)
        self.over_arch = nn.Sequential(nn.Linear(DIM * (len(FEATURES) + 1), 8), nn.Tanh(), nn.Linear(8, 1))

    def embed(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.ebc(features).values().reshape(-1, len(FEATURES), DIM)

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        embedded = self.embed(sparse) if isinstance(sparse, KeyedJaggedTensor) else sparse
        x = torch.cat([torch.tanh(self.bottom(dense)), embedded.flatten(-2)], dim=-1)
        return self.over_arch(x).squeeze(-1)


def meta_batch(sizes=((3, 2), (2, 4), (4, 3)), seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = sum(s + q for s, q in sizes)
    offsets = torch.tensor([0] + [s + q for s, q in sizes]).cumsum(0)
    kjt = KeyedJaggedTensor(keys=FEATURES, values=torch.randint(20, (rows * len(FEATURES),), generator=g),
                            lengths=torch.ones(rows * len(FEATURES), dtype=torch.int64))
    return (torch.randn(rows, NUM_DENSE, generator=g), kjt, torch.randint(2, (rows,), generator=g).float(),
            offsets, torch.tensor([s for s, _ in sizes]))


def reference_query_loss(model, dense, embedded, labels, offsets, supports, config, inner_lrs=None):
    positions = [FEATURES.index(f) for f in config.adapt_embeddings]
    losses = []
    for t in range(len(supports)):
        start, mid, end = int(offsets[t]), int(offsets[t] + supports[t]), int(offsets[t + 1])
        params = {n: p for n, p in model.named_parameters() if config.adapts(n)}
        offset = torch.zeros(len(positions), DIM, requires_grad=bool(positions))

        def loss(params, offset, rows):
            e = embedded[rows].clone()
            e[:, positions] = e[:, positions] + offset
            logits = functional_call(model, params, (dense[rows], e))
            return nn.functional.binary_cross_entropy_with_logits(logits, labels[rows])

        for _ in range(config.inner_steps):
            inputs = list(params.values()) + ([offset] if positions else [])
            grads = torch.autograd.grad(loss(params, offset, slice(start, mid)), inputs,
                                        create_graph=not config.first_order)
            lr = (lambda n: inner_lrs(n)) if inner_lrs is not None else (lambda n: config.inner_lr)
            params = {n: p - lr(n) * g for (n, p), g in zip(params.items(), grads)}
            if positions:
                offset = offset - lr("__embedding_offset__") * grads[-1]
        losses.append(loss(params, offset, slice(mid, end)))
    return torch.stack(losses).mean()


CONFIGS = {
    "maml": MetaLearningConfig(algorithm="maml", inner_lr=0.3, adapt=("over_arch",)),
    "fomaml": MetaLearningConfig(algorithm="fomaml", inner_lr=0.3, adapt=("over_arch",)),
    "maml_2_steps_all_dense": MetaLearningConfig(inner_steps=2, inner_lr=0.2, adapt=("over_arch", "bottom")),
    "fomaml_3_steps": MetaLearningConfig(algorithm="fomaml", inner_steps=3, inner_lr=0.2, adapt=("over_arch",)),
    "maml_embedding_offsets": MetaLearningConfig(inner_steps=2, adapt=("over_arch",), adapt_embeddings=("user",)),
    "meta_sgd": MetaLearningConfig(inner_steps=2, adapt=("over_arch",), learn_inner_lr=True,
                                   adapt_embeddings=("item",)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_meta_gradients_match_per_task_autograd(name: str) -> None:
    config = CONFIGS[name]
    torch.manual_seed(0)
    model = TinyMetaModel()
    inner_lrs = InnerLearningRates(model, config, embedding_dim=DIM) if config.learn_inner_lr else None
    dense, kjt, labels, offsets, supports = meta_batch()
    params = list(model.parameters()) + (list(inner_lrs.parameters()) if inner_lrs is not None else [])

    embedded = model.embed(kjt)
    out = meta_step(model, dense, embedded, labels, offsets, supports, config, FEATURES, inner_lrs)
    got = torch.autograd.grad(out.query_loss, params + [embedded], allow_unused=True)

    embedded_ref = model.embed(kjt)
    ref = reference_query_loss(model, dense, embedded_ref, labels, offsets, supports, config, inner_lrs)
    want = torch.autograd.grad(ref, params + [embedded_ref], allow_unused=True)

    torch.testing.assert_close(out.query_loss, ref, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # The looked-up rows get a gradient: through the one lookup it reaches the (sharded) tables.
    assert got[-1] is not None and torch.count_nonzero(got[-1]) > 0


def test_first_and_second_order_differ() -> None:
    torch.manual_seed(0)
    model = TinyMetaModel()
    dense, kjt, labels, offsets, supports = meta_batch()
    grads = {}
    for algorithm in ("maml", "fomaml"):
        config = MetaLearningConfig(algorithm=algorithm, inner_lr=0.5, adapt=("over_arch",))
        out = meta_step(model, dense, model.embed(kjt), labels, offsets, supports, config, FEATURES)
        grads[algorithm] = torch.autograd.grad(out.query_loss, model.bottom.weight)[0]
    assert not torch.allclose(grads["maml"], grads["fomaml"])


def test_adaptation_helps_on_the_support_set_it_adapted_to() -> None:
    torch.manual_seed(0)
    model = TinyMetaModel()
    dense, kjt, labels, offsets, supports = meta_batch()
    # Query = support: adapting must lower the loss on those rows.
    offsets = torch.tensor([0, 6, 12])
    supports = torch.tensor([3, 3])
    labels[3:6], dense[3:6] = labels[0:3], dense[0:3]
    config = MetaLearningConfig(inner_steps=5, inner_lr=0.5, adapt=("over_arch",))
    with torch.inference_mode():
        embedded = model.embed(kjt)
    result = adapt_and_predict(model, dense, embedded.clone(), labels, offsets, supports, config, FEATURES)
    assert result.adapted_loss < result.unadapted_loss
    assert result.adapted_logits.shape == result.labels.shape == (6,)


def test_task_index_pads_and_masks() -> None:
    index = task_index(torch.tensor([0, 5, 9]), torch.tensor([3, 1]))
    assert index.support_index.tolist() == [[0, 1, 2], [5, 0, 0]]
    assert index.support_mask.tolist() == [[True, True, True], [True, False, False]]
    assert index.query_index.tolist() == [[3, 4, 0], [6, 7, 8]]
    assert index.query_mask.tolist() == [[True, True, False], [True, True, True]]
    with pytest.raises(ValueError, match="at least one support row and one query row"):
        task_index(torch.tensor([0, 3]), torch.tensor([3]))


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="algorithm"):
        MetaLearningConfig(algorithm="reptile")
    with pytest.raises(ValueError, match="inner_steps"):
        MetaLearningConfig(inner_steps=0)
    with pytest.raises(TypeError, match="adapt"):
        MetaLearningConfig(adapt="over_arch")
