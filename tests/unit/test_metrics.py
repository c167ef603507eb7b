"""NormalizedEntropy and BinnedAUROC: against hand computations, torchmetrics, and across shards."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import BinaryAUROC

from lightning_dembed.metrics import BinnedAUROC, NormalizedEntropy


def test_normalized_entropy_is_log_loss_over_the_entropy_of_the_ctr_by_hand() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    probabilities = [1 / (1 + math.exp(-x)) for x in logits.tolist()]
    log_loss = -sum(math.log(p) if y else math.log(1 - p) for p, y in zip(probabilities, labels.tolist())) / 4
    ctr = 0.25
    entropy = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
    ne = NormalizedEntropy()
    ne.update(logits, labels)
    assert ne.compute().item() == pytest.approx(log_loss / entropy, rel=1e-6)


def test_normalized_entropy_of_predicting_the_base_rate_is_one() -> None:
    labels = (torch.arange(1000) % 10 == 0).float()  # CTR 0.1
    ne = NormalizedEntropy()
    ne.update(torch.full((1000,), math.log(0.1 / 0.9)), labels)
    assert ne.compute().item() == pytest.approx(1.0, rel=1e-6)


def merged(metric_class: type, shards: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """What ranks holding ``shards`` compute together: each updates its own, the states are merged (summed)."""
    ranks = []
    for shard in shards:
        rank = metric_class()
        rank.update(*shard)
        ranks.append(rank)
    for other in ranks[1:]:
        ranks[0].merge_state(other)  # what the sum reduction of a sync does
    return ranks[0].compute()


def test_both_metrics_over_two_shards_equal_the_metric_over_all_examples() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5000, generator=generator) - 1.0
    labels = torch.bernoulli(torch.sigmoid(logits + torch.randn(5000, generator=generator))).long()
    shards = [(logits[:1200], labels[:1200]), (logits[1200:], labels[1200:])]  # uneven, as ranks' last batches
    whole = NormalizedEntropy()
    whole.update(logits, labels)
    assert merged(NormalizedEntropy, shards).item() == pytest.approx(whole.compute().item(), rel=1e-6)
    probability_shards = [(torch.sigmoid(x), y) for x, y in shards]
    whole_auc = BinnedAUROC()
    whole_auc.update(torch.sigmoid(logits), labels)
    assert merged(BinnedAUROC, probability_shards).item() == pytest.approx(whole_auc.compute().item(), rel=1e-6)


@pytest.mark.parametrize("num_bins", [10, 1000])
def test_binned_auroc_is_torchmetrics_binned_auroc(num_bins: int) -> None:
    generator = torch.Generator().manual_seed(1)
    preds = torch.rand(20_000, generator=generator) ** 3  # skewed to small probabilities, as click rates are
    labels = torch.bernoulli(preds, generator=generator).long()
    preds[:10] = torch.tensor([0.0, 1.0, 0.5, 0.5, 1.0, 0.0, 0.25, 0.75, 1.0, 0.0])  # bin edges and ends
    ours, reference = BinnedAUROC(num_bins), BinaryAUROC(thresholds=num_bins)
    for chunk in range(0, 20_000, 3000):
        ours.update(preds[chunk:chunk + 3000], labels[chunk:chunk + 3000])
        reference.update(preds[chunk:chunk + 3000], labels[chunk:chunk + 3000])
    assert ours.compute().item() == pytest.approx(reference.compute().item(), abs=1e-6)
    exact = BinaryAUROC()
    exact.update(preds, labels)
    assert ours.compute().item() == pytest.approx(exact.compute().item(), abs=1.0 / num_bins)
