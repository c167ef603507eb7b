"""Synthetic interactions in which tasks (users) really differ, so per-task adaptation pays.

Each user has a hidden taste vector over item latent factors; a click depends on a global part
(item popularity, dense context) and on that taste. A global model learns the first; only
adaptation on a user's own support rows recovers the second, which is what cold-start
meta-learning is measured on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["SyntheticTaskConfig", "generate_interactions"]


@dataclass(frozen=True)
class SyntheticTaskConfig:
    """Size and signal of a generated interactions table.

    Args:
        num_users: tasks.
        num_items: catalogue size.
        num_categories: item categories (a coarse feature).
        min_rows, max_rows: interactions per user, uniform in this range.
        num_dense: dense context features ``d0..``.
        latent_dim: width of the hidden item factors and user tastes.
        taste_strength: weight of the per-user part of the click logit.
        seed: everything is fixed by it.

    Example::

        table = generate_interactions(SyntheticTaskConfig(num_users=500))
        table.column_names  # ['user_id', 'item_id', 'category', 'd0', ..., 'label', 'timestamp']
    """

    num_users: int = 2000
    num_items: int = 2000
    num_categories: int = 20
    min_rows: int = 8
    max_rows: int = 40
    num_dense: int = 4
    latent_dim: int = 8
    taste_strength: float = 2.0
    seed: int = 0


def generate_interactions(config: SyntheticTaskConfig) -> pa.Table:
    """One row per interaction, users in random order of time; vectorised (no loop over rows)."""
    rng = np.random.default_rng(config.seed)
    rows_per_user = rng.integers(config.min_rows, config.max_rows + 1, size=config.num_users)
    user = np.repeat(np.arange(config.num_users), rows_per_user)
    n = user.size
    popularity = rng.zipf(1.3, size=n) - 1
    item = np.minimum(popularity, config.num_items - 1)
    category = (item * 7919) % config.num_categories
    dense = rng.standard_normal((n, config.num_dense)).astype(np.float32)

    item_bias = rng.normal(0.0, 0.5, size=config.num_items)
    item_factors = rng.standard_normal((config.num_items, config.latent_dim)) / np.sqrt(config.latent_dim)
    tastes = rng.standard_normal((config.num_users, config.latent_dim))
    dense_weights = rng.normal(0.0, 0.5, size=config.num_dense)
    logit = (
        item_bias[item]
        + dense @ dense_weights
        + config.taste_strength * np.einsum("nd,nd->n", tastes[user], item_factors[item])
    )
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    timestamp = rng.integers(0, 10**6, size=n)
    columns = {"user_id": user, "item_id": item, "category": category}
    columns.update({f"d{i}": dense[:, i] for i in range(config.num_dense)})
    columns.update({"label": label, "timestamp": timestamp})
    return pa.table(columns)


def write_interactions(config: SyntheticTaskConfig, path: Union[str, Path]) -> Path:
    """Generate and write as parquet (the Meta-IO ingestion path reads it back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(generate_interactions(config), path)
    return path
