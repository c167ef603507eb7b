"""meta_step against plain references: autograd through a Python loop over tasks, and `higher`."""

from __future__ import annotations

import dataclasses
import warnings

import higher
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DenseArch, InteractionArch

from lightning_dembed.meta import (
    InnerLearningRates,
    MetaLearningConfig,
    TaskIndex,
    adapt_and_predict,
    meta_step,
    task_index,
    vmap_refusal,
)
from lightning_dembed.meta.functional import VMAP_REFUSAL_PREFIX, adapted_names

FEATURES = ["user", "item", "category"]
DIM, NUM_DENSE, IDS = 4, 3, 20
# Unequal support and query sizes, so padding and masking are exercised.
SIZES = ((3, 2), (2, 4), (4, 3), (1, 1))


class TinyDLRM(nn.Module):
    """DLRM-like: `embed` is the lookup; forward takes a KJT or its looked-up [R, F, D] tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name=f"t_{f}", num_embeddings=IDS, embedding_dim=DIM, feature_names=[f])
                for f in FEATURES
            ]
        )
        self.dense_arch = DenseArch(NUM_DENSE, [8, DIM])
        self.inter_arch = InteractionArch(len(FEATURES))
        interacted = DIM + (len(FEATURES) + 1) * len(FEATURES) // 2
        # tanh, not ReLU: second-order terms that are not zero, so MAML and FOMAML differ.
        self.over_arch = nn.Sequential(nn.Linear(interacted, 8), nn.Tanh(), nn.Linear(8, 1))

    def embed(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.ebc(features).values().reshape(-1, len(FEATURES), DIM)

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        embedded = self.embed(sparse) if isinstance(sparse, KeyedJaggedTensor) else sparse
        return self.over_arch(self.inter_arch(self.dense_arch(dense), embedded)).squeeze(-1)


class ItemCallingDLRM(TinyDLRM):
    """A forward vmap cannot batch (a Python branch on a tensor value)."""

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        if float(dense.abs().max()) > 1e6:
            raise ValueError("dense features out of range")
        return super().forward(dense, sparse)


def meta_batch(sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = sum(s + q for s, q in sizes)
    offsets = torch.tensor([0] + [s + q for s, q in sizes]).cumsum(0)
    kjt = KeyedJaggedTensor(
        keys=FEATURES,
        values=torch.randint(IDS, (rows * len(FEATURES),), generator=g),
        lengths=torch.ones(rows * len(FEATURES), dtype=torch.int64),
    )
    return (
        torch.randn(rows, NUM_DENSE, generator=g),
        kjt,
        torch.randint(2, (rows,), generator=g).float(),
        offsets,
        torch.tensor([s for s, _ in sizes]),
    )


def reference_query_loss(model, dense, embedded, labels, offsets, supports, config, inner_lrs=None):
    """MAML written out: a Python loop over tasks, torch.autograd.grad with create_graph."""
    positions = [FEATURES.index(f) for f in config.adapt_embeddings]
    adapted = {n: p for n, p in model.named_parameters() if config.adapts(n)}

    def lr(name):
        if inner_lrs is None:
            return config.inner_lr
        return inner_lrs.embedding_offsets if name is None else inner_lrs.rate(name)

    def loss(params, offset, rows):
        e = embedded[rows]
        if positions:
            e = e.index_add(1, torch.tensor(positions), offset.unsqueeze(0).expand(e.shape[0], -1, -1))
        logits = functional_call(model, params, (dense[rows], e))
        return nn.functional.binary_cross_entropy_with_logits(logits, labels[rows])

    losses = []
    for t in range(len(supports)):
        start, mid, end = int(offsets[t]), int(offsets[t] + supports[t]), int(offsets[t + 1])
        params = dict(adapted)
        offset = torch.zeros(len(positions), DIM, requires_grad=True)
        for _ in range(config.inner_steps):
            inputs = list(params.values()) + [offset]
            grads = torch.autograd.grad(
                loss(params, offset, slice(start, mid)),
                inputs,
                create_graph=not config.first_order,
                allow_unused=True,
            )
            params = {n: p - lr(n) * g for (n, p), g in zip(params.items(), grads)}
            if positions:
                offset = offset - lr(None) * grads[-1]
        losses.append(loss(params, offset, slice(mid, end)))
    return torch.stack(losses).mean()


CONFIGS = {
    "maml": MetaLearningConfig(algorithm="maml", inner_lr=0.3),
    "fomaml": MetaLearningConfig(algorithm="fomaml", inner_lr=0.3),
    "maml_2_steps_all_dense": MetaLearningConfig(
        inner_steps=2, inner_lr=0.2, adapt=("over_arch", "dense_arch")
    ),
    "fomaml_3_steps": MetaLearningConfig(algorithm="fomaml", inner_steps=3, inner_lr=0.2),
    "maml_embedding_offsets": MetaLearningConfig(inner_steps=2, adapt_embeddings=("user",)),
    "offsets_only": MetaLearningConfig(inner_steps=2, adapt=(), adapt_embeddings=("item", "user")),
    "meta_sgd": MetaLearningConfig(inner_steps=2, learn_inner_lr=True, adapt_embeddings=("item",)),
    "fomaml_meta_sgd": MetaLearningConfig(
        algorithm="fomaml", inner_steps=2, learn_inner_lr=True, adapt_embeddings=("category",)
    ),
}


def gradients(model_cls, config, compute):
    """(loss, gradients of every parameter, of the inner rates and of the looked-up rows)."""
    torch.manual_seed(0)
    model = model_cls()
    inner_lrs = InnerLearningRates(model, config, embedding_dim=DIM) if config.learn_inner_lr else None
    if inner_lrs is not None:
        with torch.no_grad():  # rates that differ per weight, so a mix-up of names would show
            for p in inner_lrs.parameters():
                p.mul_(torch.rand_like(p) + 0.5)
    dense, kjt, labels, offsets, supports = meta_batch()
    embedded = model.embed(kjt)
    loss = compute(model, dense, embedded, labels, offsets, supports, inner_lrs)
    inputs = (
        list(model.parameters())
        + (list(inner_lrs.parameters()) if inner_lrs is not None else [])
        + [embedded]
    )
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return loss, [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_meta_gradients_match_per_task_autograd(name: str) -> None:
    config = CONFIGS[name]

    def vectorised(model, dense, embedded, labels, offsets, supports, inner_lrs):
        params = dict(model.named_parameters())
        return meta_step(
            model, params, dense, embedded, labels, offsets, supports, config, FEATURES, inner_lrs
        ).query_loss

    def reference(model, dense, embedded, labels, offsets, supports, inner_lrs):
        return reference_query_loss(model, dense, embedded, labels, offsets, supports, config, inner_lrs)

    got_loss, got = gradients(TinyDLRM, config, vectorised)
    want_loss, want = gradients(TinyDLRM, config, reference)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-7)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    # Every original parameter learns, adapted or not, and so do the tables through `embedded`.
    assert all(torch.count_nonzero(g) > 0 for g in got)


def test_maml_matches_higher() -> None:
    config = MetaLearningConfig(inner_steps=2, inner_lr=0.3)

    def with_higher(model, dense, embedded, labels, offsets, supports, inner_lrs):
        losses = []
        for t in range(len(supports)):
            start, mid, end = int(offsets[t]), int(offsets[t] + supports[t]), int(offsets[t + 1])
            inner = torch.optim.SGD(model.over_arch.parameters(), lr=config.inner_lr)
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(config.inner_steps):
                    s = slice(start, mid)
                    diffopt.step(
                        nn.functional.binary_cross_entropy_with_logits(
                            fmodel(dense[s], embedded[s]), labels[s]
                        )
                    )
                q = slice(mid, end)
                losses.append(
                    nn.functional.binary_cross_entropy_with_logits(fmodel(dense[q], embedded[q]), labels[q])
                )
        return torch.stack(losses).mean()

    def vectorised(model, dense, embedded, labels, offsets, supports, inner_lrs):
        params = dict(model.named_parameters())
        return meta_step(
            model, params, dense, embedded, labels, offsets, supports, config, FEATURES
        ).query_loss

    got_loss, got = gradients(TinyDLRM, config, vectorised)
    want_loss, want = gradients(TinyDLRM, config, with_higher)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-7)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_first_and_second_order_differ_only_in_second_order_terms() -> None:
    grads = {}
    for algorithm in ("maml", "fomaml"):
        config = MetaLearningConfig(algorithm=algorithm, inner_lr=0.5)

        def compute(model, dense, embedded, labels, offsets, supports, inner_lrs, config=config):
            params = dict(model.named_parameters())
            return meta_step(
                model, params, dense, embedded, labels, offsets, supports, config, FEATURES
            ).query_loss

        grads[algorithm] = gradients(TinyDLRM, config, compute)[1]
    # The bottom MLP only reaches the query loss through the inner gradients' dependence on it.
    assert not torch.allclose(grads["maml"][3], grads["fomaml"][3])


def test_vectorize_false_loops_over_tasks_and_vmap_failures_are_raised() -> None:
    config = dataclasses.replace(CONFIGS["maml_embedding_offsets"], vectorize=False)

    def compute(model, dense, embedded, labels, offsets, supports, inner_lrs):
        params = dict(model.named_parameters())
        return meta_step(
            model, params, dense, embedded, labels, offsets, supports, config, FEATURES
        ).query_loss

    def reference(model, dense, embedded, labels, offsets, supports, inner_lrs):
        return reference_query_loss(model, dense, embedded, labels, offsets, supports, config)

    got_loss, got = gradients(ItemCallingDLRM, config, compute)
    want_loss, want = gradients(ItemCallingDLRM, config, reference)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-7)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)

    # Vectorised (the default), a forward vmap cannot batch fails as torch reports it: no retry.
    model = ItemCallingDLRM()
    dense, kjt, labels, offsets, supports = meta_batch()
    vectorized = dataclasses.replace(config, vectorize=True)
    with pytest.raises(RuntimeError):
        meta_step(model, dict(model.named_parameters()), dense, model.embed(kjt), labels, offsets, supports,
                  vectorized, FEATURES)


class BranchingDLRM(TinyDLRM):
    """Python control flow on a tensor value, which vmap cannot batch either."""

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        logits = super().forward(dense, sparse)
        return logits if logits.sum() > -1e9 else -logits


class OutOfMemoryDLRM(TinyDLRM):
    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def refusal(model_class: type, config: MetaLearningConfig = CONFIGS["maml_embedding_offsets"]):
    model = model_class()
    dense, kjt, labels, offsets, supports = meta_batch()
    return vmap_refusal(model, dict(model.named_parameters()), dense, model.embed(kjt), labels, offsets,
                        supports, config, FEATURES)


def test_vmap_refusal_answers_only_vmaps_own_refusals() -> None:
    assert refusal(TinyDLRM) is None
    # torch's wording for .item() and for a branch on a tensor value: what the refusal is known by.
    for model_class in (ItemCallingDLRM, BranchingDLRM):
        assert refusal(model_class).startswith(VMAP_REFUSAL_PREFIX)
    # Anything else is raised as it is: an out-of-memory is never taken for "vmap cannot batch this".
    with pytest.raises(torch.OutOfMemoryError):
        refusal(OutOfMemoryDLRM)


def test_meta_step_outputs() -> None:
    torch.manual_seed(0)
    model = TinyDLRM()
    dense, kjt, labels, offsets, supports = meta_batch()
    out = meta_step(
        model,
        dict(model.named_parameters()),
        dense,
        model.embed(kjt),
        labels,
        offsets,
        supports,
        MetaLearningConfig(),
        FEATURES,
    )
    query_rows = torch.cat(
        [torch.arange(int(offsets[t] + supports[t]), int(offsets[t + 1])) for t in range(len(supports))]
    )
    assert torch.equal(out.query_labels, labels[query_rows])
    assert out.query_logits_adapted.shape == query_rows.shape and not out.query_logits_adapted.requires_grad
    with torch.no_grad():
        logits = model(dense, kjt)
    per_task = [
        nn.functional.binary_cross_entropy_with_logits(
            logits[int(offsets[t] + supports[t]) : int(offsets[t + 1])],
            labels[int(offsets[t] + supports[t]) : int(offsets[t + 1])],
        )
        for t in range(len(supports))
    ]
    torch.testing.assert_close(out.query_loss_unadapted, torch.stack(per_task).mean())
    assert not out.support_loss.requires_grad and not out.query_loss_unadapted.requires_grad


def test_plain_loss_weight_adds_the_shared_models_loss_on_every_row() -> None:
    torch.manual_seed(0)
    model = TinyDLRM()
    dense, kjt, labels, offsets, supports = meta_batch()
    embedded = model.embed(kjt)
    args = (model, dict(model.named_parameters()), dense, embedded, labels, offsets, supports)
    pure = meta_step(*args, MetaLearningConfig(), FEATURES)
    assert pure.loss is pure.query_loss
    mixed = meta_step(*args, MetaLearningConfig(plain_loss_weight=0.5), FEATURES)
    plain = nn.functional.binary_cross_entropy_with_logits(model(dense, embedded), labels)
    torch.testing.assert_close(mixed.loss, mixed.query_loss + 0.5 * plain)
    torch.testing.assert_close(mixed.query_loss, pure.query_loss)
    # Every row's embedding gets a first-order gradient, support rows included.
    (grad,) = torch.autograd.grad(mixed.loss - mixed.query_loss, embedded)
    assert bool((grad.abs().sum((1, 2)) > 0).all())


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "grad"])
def test_adapt_and_predict_under_any_grad_mode(mode: str) -> None:
    torch.manual_seed(0)
    model = TinyDLRM()
    dense, kjt, labels, _, _ = meta_batch()
    # Query = support: adapting must lower the loss on those rows.
    offsets, supports = torch.tensor([0, 6, 12]), torch.tensor([3, 3])
    labels[3:6], dense[3:6] = labels[0:3], dense[0:3]
    labels[9:12], dense[9:12] = labels[6:9], dense[6:9]
    embedded = model.embed(kjt).detach()
    embedded[3:6], embedded[9:12] = embedded[0:3], embedded[6:9]
    config = MetaLearningConfig(inner_steps=5, inner_lr=0.5, adapt_embeddings=("user",))
    context = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}[
        mode
    ]
    with context():
        inputs = [t.clone() for t in (dense[:12], embedded[:12], labels[:12], offsets, supports)]
        result = adapt_and_predict(model, dict(model.named_parameters()), *inputs, config, FEATURES)
    with torch.no_grad():
        want = model(dense[:12], embedded[:12])
    assert result.adapted_loss < result.unadapted_loss
    assert result.adapted_logits.shape == result.labels.shape == (6,)
    torch.testing.assert_close(result.unadapted_logits, want[[3, 4, 5, 9, 10, 11]])
    assert not any(
        t.requires_grad for t in (result.adapted_logits, result.adapted_loss, result.unadapted_loss)
    )


def test_task_index_pads_and_masks() -> None:
    index = task_index(torch.tensor([0, 5, 9]), torch.tensor([3, 1]))
    assert isinstance(index, TaskIndex)
    support_index, support_mask, query_index, query_mask = index
    assert support_index.tolist() == [[0, 1, 2], [5, 0, 0]]
    assert support_mask.tolist() == [[True, True, True], [True, False, False]]
    assert query_index.tolist() == [[3, 4, 0], [6, 7, 8]]
    assert query_mask.tolist() == [[True, True, False], [True, True, True]]
    with pytest.raises(ValueError, match="at least one support row and one query row"):
        task_index(torch.tensor([0, 3]), torch.tensor([3]))


def test_adapt_prefixes_match_at_module_boundaries() -> None:
    config = MetaLearningConfig()
    assert config.adapts("over_arch.0.weight") and config.adapts("dlrm.over_arch.model.0.weight")
    assert not config.adapts("over_arch_2.weight") and not config.adapts("dense_arch.model.0.weight")
    assert MetaLearningConfig(adapt=["dlrm.over_arch"]).adapt == ("dlrm.over_arch",)



def test_a_shared_layer_adapts_under_any_of_its_names() -> None:
    # named_parameters() names a shared layer once, after the first module that holds it: a prefix
    # naming the second holder adapts it too (before, only the first holder's name counted).
    torch.manual_seed(0)
    model = TinyDLRM()
    model.towers = nn.ModuleDict({"item": nn.Sequential(model.over_arch)})
    by_second_name = MetaLearningConfig(adapt=("towers.item",), inner_steps=2, inner_lr=0.3)
    by_first_name = MetaLearningConfig(adapt=("over_arch",), inner_steps=2, inner_lr=0.3)
    assert adapted_names(by_second_name, model) == adapted_names(by_first_name, model) == [
        "over_arch.0.weight", "over_arch.0.bias", "over_arch.2.weight", "over_arch.2.bias"]
    dense, kjt, labels, offsets, supports = meta_batch()
    embedded = model.embed(kjt)
    losses = [
        meta_step(model, dict(model.named_parameters()), dense, embedded, labels, offsets, supports, config,
                  FEATURES).query_loss
        for config in (by_second_name, by_first_name)
    ]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (MetaLearningConfig(adapt=("top",)), "'top'"),
        (MetaLearningConfig(adapt_embeddings=("age",)), "'age'"),
        (MetaLearningConfig(learn_inner_lr=True), "inner_lrs"),
    ],
    ids=["unknown_adapt_prefix", "unknown_adapted_feature", "meta_sgd_without_rates"],
)
def test_meta_step_errors_name_the_problem(config: MetaLearningConfig, match: str) -> None:
    model = TinyDLRM()
    dense, kjt, labels, offsets, supports = meta_batch()
    with pytest.raises(ValueError, match=match):
        meta_step(
            model, dict(model.named_parameters()), dense, model.embed(kjt), labels, offsets, supports, config, FEATURES
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"algorithm": "reptile"}, ValueError, "algorithm"),
        ({"inner_steps": 0}, ValueError, "inner_steps"),
        ({"inner_steps": 1.5}, ValueError, "inner_steps"),
        ({"inner_lr": -0.1}, ValueError, "inner_lr"),
        ({"inner_lr": float("nan")}, ValueError, "inner_lr"),
        ({"adapt": "over_arch"}, TypeError, "adapt"),
        ({"adapt_embeddings": ("user", "user")}, ValueError, "adapt_embeddings"),
        ({"learn_inner_lr": "yes"}, TypeError, "learn_inner_lr"),
        ({"plain_loss_weight": -1.0}, ValueError, "plain_loss_weight"),
        ({"vectorize": 1}, TypeError, "vectorize"),
        ({"adapt": ()}, ValueError, "adapt"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict, error: type, field: str) -> None:
    with pytest.raises(error, match=field):
        MetaLearningConfig(**kwargs)


def test_inner_learning_rates_cover_the_adapted_weights() -> None:
    model = TinyDLRM()
    config = MetaLearningConfig(learn_inner_lr=True, inner_lr=0.05, adapt_embeddings=("user", "item"))
    rates = InnerLearningRates(model, config, embedding_dim=DIM)
    adapted = {n: p for n, p in model.named_parameters() if config.adapts(n)}
    assert len(list(rates.rates.parameters())) == len(adapted) == 4
    for name, p in adapted.items():
        assert rates.rate(name).shape == p.shape and bool((rates.rate(name) == 0.05).all())
    assert rates.embedding_offsets.shape == (2, DIM)
    with pytest.raises(KeyError, match="dense_arch"):
        rates.rate("dense_arch.model.0.weight")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.inner_lrs = rates  # owned by the model: trained by its optimizer, saved in its state dict
    assert any(k.startswith("inner_lrs.") for k in model.state_dict())
