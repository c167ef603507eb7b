"""A synthetic family of cold-start tasks, with how much users differ as a knob.

Each user has a hidden taste vector over item latent factors, and items of one category share
most of their factors: a user likes some categories and dislikes others. A click depends on a
global part (item and brand popularity, hour, dense context) and on the user's own part (a click
bias and that taste), scaled by ``heterogeneity``. At ``heterogeneity=0`` every user is alike and a
global model is all there is to learn; the larger it is, the more only adaptation on the user's own
support rows recovers, which is what cold-start meta-learning is measured on. Side features carry
part of the user part (``user_segment``: users of a segment share part of their taste) and of the
item part (``category``, ``brand``). Like real interaction logs, items are drawn with a long-tailed
popularity, users have long-tailed row counts (many light users, a few heavy ones) and a share of
the labels is flipped at random.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "ClickModel",
    "SyntheticTaskConfig",
    "generate_interactions",
    "generate_with_click_model",
    "write_interactions",
]

_SEGMENTS, _HOURS, _DEVICES = 8, 24, 4


@dataclass(frozen=True)
class SyntheticTaskConfig:
    """Size and signal of a generated interactions table; every value is fixed by ``seed``.

    The categorical columns are ``user_id``, ``item_id``, ``category`` and ``brand`` (of the
    item, ``num_items // 20`` brands), ``user_segment`` (8 segments; users of a segment share part
    of their taste), ``hour`` (0-23) and ``device`` (4, mostly one per user); the dense columns are
    ``d0..``; then ``label`` (0/1) and ``timestamp`` (seconds, increasing within a user).

    Args:
        num_users: tasks.
        num_items: catalogue size.
        num_categories: item categories; a user's taste is mostly a preference over them.
        min_rows: fewest interactions of a user.
        max_rows: most interactions of a user; counts in between are log-uniform (long-tailed).
        num_dense: dense context features ``d0..``.
        latent_dim: width of the hidden item factors and user tastes.
        heterogeneity: how much users differ: the standard deviation of the per-user part of the
            click logit (taste; plus a per-user click bias of half that). 0: every user alike.
        popularity_skew: Zipf exponent of item popularity (0: items drawn uniformly).
        label_noise: share of labels replaced by a fair coin flip.
        seed: seed of everything.

    Example::

        config = SyntheticTaskConfig(num_users=500, heterogeneity=2.0)
        table = generate_interactions(config)
        table.column_names  # ['user_id', 'item_id', 'category', 'brand', 'user_segment', 'hour',
                            #  'device', 'd0', 'd1', 'd2', 'd3', 'label', 'timestamp']
        config.categorical_columns, config.dense_columns
    """

    num_users: int = 2000
    num_items: int = 2000
    num_categories: int = 10
    min_rows: int = 8
    max_rows: int = 40
    num_dense: int = 4
    latent_dim: int = 8
    heterogeneity: float = 1.0
    popularity_skew: float = 0.8
    label_noise: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_users", "num_items", "num_categories", "min_rows", "latent_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_rows < self.min_rows:
            raise ValueError(f"max_rows ({self.max_rows}) must be >= min_rows ({self.min_rows})")
        if self.num_dense < 0:
            raise ValueError(f"num_dense must be >= 0, got {self.num_dense}")
        for name in ("heterogeneity", "popularity_skew"):
            if not 0.0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"label_noise must be in [0, 1], got {self.label_noise}")

    @property
    def categorical_columns(self) -> tuple[str, ...]:
        return ("user_id", "item_id", "category", "brand", "user_segment", "hour", "device")

    @property
    def dense_columns(self) -> tuple[str, ...]:
        return tuple(f"d{i}" for i in range(self.num_dense))

    @property
    def cardinalities(self) -> dict[str, int]:
        """Distinct values of each categorical column (table sizes that need no hashing)."""
        return {
            "user_id": self.num_users,
            "item_id": self.num_items,
            "category": self.num_categories,
            "brand": max(1, self.num_items // 20),
            "user_segment": _SEGMENTS,
            "hour": _HOURS,
            "device": _DEVICES,
        }


class ClickModel(NamedTuple):
    """The generator's hidden click model, row by row in `generate_interactions`' order.

    What no model trained on the table can know, for measuring how far one is from the best
    possible (the ceilings of ``benchmarks/meta_quality.py``). Each row's click logit, before the
    label noise, is ``global_logit + heterogeneity * (segment_logit + user_bias[row's user] + own
    taste . item_factors)``.

    Attributes:
        global_logit: ``[N]`` the part every user shares (item, brand, hour, dense context).
        segment_logit: ``[N]`` the part of the user's taste that their ``user_segment`` shares, unscaled.
        item_factors: ``[N, latent_dim]`` the row's item factors (a user's taste is a weighting of them).
        logit: ``[N]`` the whole click logit.
        bias_variance: variance of a user's click bias over users, before ``heterogeneity``.
        own_taste_variance: variance of each coordinate of a user's own taste (beyond their
            segment's), before ``heterogeneity``. With ``bias_variance``: a Bayesian user model's prior.
    """

    global_logit: np.ndarray
    segment_logit: np.ndarray
    item_factors: np.ndarray
    logit: np.ndarray
    bias_variance: float
    own_taste_variance: float


def generate_interactions(config: SyntheticTaskConfig) -> pa.Table:
    """One row per interaction, rows of all users interleaved in random order; vectorised."""
    return generate_with_click_model(config)[0]


_BIAS_STD, _SEGMENT_SHARE = 0.5, 0.5  # of a user's click bias; of the taste their segment shares


def generate_with_click_model(config: SyntheticTaskConfig) -> tuple[pa.Table, ClickModel]:
    """``generate_interactions(config)`` and the hidden click model behind it, in the order of its rows."""
    rng = np.random.default_rng(config.seed)
    dim = config.latent_dim
    num_brands = config.cardinalities["brand"]

    # Items: a category and a brand each, factors mostly shared within the category.
    item_category = rng.integers(config.num_categories, size=config.num_items)
    item_brand = rng.integers(num_brands, size=config.num_items)
    centroids = rng.standard_normal((config.num_categories, dim))
    item_factors = (
        0.9 * centroids[item_category] + 0.45 * rng.standard_normal((config.num_items, dim))
    ) / np.sqrt(dim)
    item_bias = rng.normal(0.0, 0.5, size=config.num_items)
    brand_bias = rng.normal(0.0, 0.3, size=num_brands)
    popularity = 1.0 / (1.0 + rng.permutation(config.num_items)) ** config.popularity_skew

    # Users: a segment sharing part of the taste (what a global model can see), the rest their own.
    segment = rng.integers(_SEGMENTS, size=config.num_users)
    segment_taste = rng.standard_normal((_SEGMENTS, dim))
    own_share = np.sqrt(1.0 - _SEGMENT_SHARE**2)
    taste = _SEGMENT_SHARE * segment_taste[segment] + own_share * rng.standard_normal((config.num_users, dim))
    user_bias = rng.normal(0.0, _BIAS_STD, size=config.num_users)
    favourite_device = rng.integers(_DEVICES, size=config.num_users)

    # Log-uniform row counts: many light users, a few heavy ones, as in real logs.
    log_rows = rng.uniform(np.log(config.min_rows), np.log(config.max_rows + 1), size=config.num_users)
    rows_per_user = np.clip(np.exp(log_rows).astype(np.int64), config.min_rows, config.max_rows)
    user = np.repeat(np.arange(config.num_users), rows_per_user)
    n = user.size
    item = rng.choice(config.num_items, size=n, p=popularity / popularity.sum())
    hour = rng.integers(_HOURS, size=n)
    device = np.where(rng.random(n) < 0.8, favourite_device[user], rng.integers(_DEVICES, size=n))
    dense = rng.standard_normal((n, config.num_dense)).astype(np.float32)
    dense_weights = rng.normal(0.0, 0.5, size=config.num_dense)

    # The taste term has unit variance (unit-variance tastes, item factors of squared norm ~1).
    personal = user_bias[user] + np.einsum("nd,nd->n", taste[user], item_factors[item])
    global_logit = (
        -0.5
        + item_bias[item]
        + brand_bias[item_brand[item]]
        + 0.3 * np.sin(2 * np.pi * hour / _HOURS)
        + dense @ dense_weights
    )
    logit = global_logit + config.heterogeneity * personal
    label = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    noisy = rng.random(n) < config.label_noise
    label = np.where(noisy, rng.random(n) < 0.5, label).astype(np.float32)

    # Each user's interactions are spread over time from their own start.
    gaps = rng.exponential(3600.0, size=n)
    first_row = np.repeat(np.cumsum(rows_per_user) - rows_per_user, rows_per_user)
    elapsed = np.cumsum(gaps) - np.cumsum(gaps)[first_row] + gaps[first_row]
    timestamp = (rng.integers(0, 10**7, size=config.num_users)[user] + elapsed).astype(np.int64)

    columns = {
        "user_id": user,
        "item_id": item,
        "category": item_category[item],
        "brand": item_brand[item],
        "user_segment": segment[user],
        "hour": hour,
        "device": device,
    }
    columns.update({f"d{i}": dense[:, i] for i in range(config.num_dense)})
    columns.update({"label": label, "timestamp": timestamp})
    shuffle = rng.permutation(n)
    table = pa.table({name: np.ascontiguousarray(values[shuffle]) for name, values in columns.items()})
    segment_logit = _SEGMENT_SHARE * np.einsum("nd,nd->n", segment_taste[segment[user]], item_factors[item])
    truth = ClickModel(
        global_logit=global_logit[shuffle],
        segment_logit=segment_logit[shuffle],
        item_factors=item_factors[item][shuffle],
        logit=logit[shuffle],
        bias_variance=_BIAS_STD**2,
        own_taste_variance=own_share**2,
    )
    return table, truth


def write_interactions(config: SyntheticTaskConfig, path: Union[str, Path]) -> Path:
    """Generate the interactions and write them as parquet, for the Meta-IO ingestion path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(generate_interactions(config), path)
    return path
