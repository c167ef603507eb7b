"""Meta-IO: task store building (grouping, splits, drops, flags, holdout) and task-consistent batching."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dembed.data.batch import TaskBatch
from lightning_dembed.data.task_loader import MetaBatchDataset, QueryRowDataset
from lightning_dembed.data.task_store import TaskStore, build_task_store, parse_label_rule
from lightning_dembed.data.tasks import (
    SyntheticTaskConfig,
    generate_interactions,
    generate_with_click_model,
    write_interactions,
)


def interactions(num_tasks: int = 40, seed: int = 0, string_keys: bool = False) -> pa.Table:
    """Rows of tasks of 1..12 rows, interleaved; ``row`` is each row's position."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 13, size=num_tasks)
    user = np.repeat(np.arange(num_tasks), sizes)
    n = user.size
    shuffle = rng.permutation(n)
    columns = {
        "user": np.array([f"user-{u}" for u in user]) if string_keys else user * 7 + 3,
        "item": rng.integers(0, 1000, size=n),
        "rating": rng.integers(1, 6, size=n),
        "ts": rng.permutation(n) * 10,
    }
    return pa.table({**{k: v[shuffle] for k, v in columns.items()}, "row": np.arange(n, dtype=np.float64)})


def build(table: pa.Table, out_dir=None, **kwargs) -> TaskStore:
    args = dict(
        task_key="user",
        categorical=["user", "item"],
        num_embeddings={"user": 10**6, "item": 1024},
        dense=["row"],
        label_rule="rating >= 4",
        time_column="ts",
        holdout_fraction=0.0,
    )
    args.update(kwargs)
    return build_task_store(table, out_dir, **args)


def test_one_table_size_sizes_every_categorical_column() -> None:
    one_size = build(interactions(), num_embeddings=64)
    per_column = build(interactions(), num_embeddings={"user": 64, "item": 64})
    assert one_size.stats == per_column.stats
    assert one_size.train.rows["item"] == per_column.train.rows["item"]
    assert max(one_size.train.rows["item"]) < 64


def task_rows(split, t: int) -> np.ndarray:
    """Input row ids of task t of a split, in stored order."""
    return split.column("row")[split.offsets[t] : split.offsets[t + 1]].astype(np.int64)


def test_grouping_and_time_split() -> None:
    table = interactions()
    user, ts = table.column("user").to_numpy(), table.column("ts").to_numpy()
    with pytest.warns(UserWarning, match="'item'"):  # 1000 items on 100 rows
        store = build(table, support_size=0.5, min_rows_per_task=2, num_embeddings={"user": 10**6, "item": 100})
    split = store.train
    seen = []
    for t in range(split.num_tasks):
        rows = task_rows(split, t)
        assert len(set(user[rows])) == 1 and split.keys[t] == user[rows[0]]
        # All of the task's input rows, earliest first; the support set is the earliest half.
        assert sorted(rows) == sorted(np.flatnonzero(user == user[rows[0]]))
        assert np.all(np.diff(ts[rows]) > 0)
        assert split.support_sizes[t] == max(1, len(rows) // 2)
        seen.extend(rows)
    assert len(seen) == len(set(seen)) == split.num_rows == store.stats["rows"]
    # Categorical ids: integers modulo the table size.
    assert np.array_equal(
        split.column("item"), table.column("item").to_numpy()[split.column("row").astype(int)] % 100
    )


def test_random_split_is_seeded_and_not_time_ordered() -> None:
    table = interactions()
    ts = table.column("ts").to_numpy()
    a, b, c = (build(table, split="random", time_column=None, seed=s).train for s in (0, 0, 1))
    assert np.array_equal(a.column("row"), b.column("row"))
    assert not np.array_equal(a.column("row"), c.column("row"))
    assert any(np.any(np.diff(ts[task_rows(a, t)]) < 0) for t in range(a.num_tasks))
    assert np.array_equal(np.sort(a.column("row")), np.sort(c.column("row")))


def test_small_tasks_are_dropped_and_counted() -> None:
    table = interactions()
    counts = np.bincount(table.column("user").to_numpy())
    counts = counts[counts > 0]
    store = build(table, min_rows_per_task=5)
    assert store.stats["input_tasks"] == counts.size
    assert store.stats["dropped_too_small"] == int((counts < 5).sum()) > 0
    assert store.stats["tasks"] == store.train.num_tasks == int((counts >= 5).sum())
    # Fixed sizes: 3 support + 2 query rows, the rest of a task left out; smaller tasks dropped.
    fixed = build(table, support_size=3, query_size=2, min_rows_per_task=1)
    assert fixed.stats["dropped_too_small"] == int((counts < 5).sum())
    assert (fixed.train.support_sizes == 3).all() and (np.diff(fixed.train.offsets) == 5).all()
    assert fixed.stats["rows"] == 5 * fixed.stats["tasks"]


def test_single_class_tasks_are_kept_and_flagged() -> None:
    table = interactions()
    store = build(table, min_rows_per_task=2)
    labels = store.train.column("label")
    for t in range(store.train.num_tasks):
        task = labels[store.train.offsets[t] : store.train.offsets[t + 1]]
        assert store.train.single_class[t] == (task.min() == task.max())
    assert store.stats["single_class"] == int(store.train.single_class.sum()) > 0


def test_label_rule() -> None:
    table = interactions()
    store = build(table, label_rule="rating >= 4")
    rating = table.column("rating").to_numpy()[store.train.column("row").astype(int)]
    assert np.array_equal(store.train.column("label"), (rating >= 4).astype(np.float32))
    assert parse_label_rule(" rating<2.5 ") == ("rating", "<", 2.5)
    for bad in ("rating >= four", "__import__('os') == 1", "rating => 4"):
        with pytest.raises(ValueError, match="column op number"):
            parse_label_rule(bad)
    with pytest.raises(ValueError, match="0/1"):
        build(table, label="rating", label_rule=None)


def test_cold_start_holdout_is_disjoint_and_stable() -> None:
    table = interactions(num_tasks=400)
    store = build(table, holdout_fraction=0.25, min_rows_per_task=2)
    train, cold = set(store.train.keys), set(store.cold_start.keys)
    assert train.isdisjoint(cold) and 0.15 < len(cold) / (len(train) + len(cold)) < 0.35
    assert store.stats["cold_start"]["tasks"] == len(cold)
    # Held out by the key alone: another seed or a different slice of the data holds out the same users.
    again = build(table.slice(0, table.num_rows // 2), holdout_fraction=0.25, min_rows_per_task=2, seed=7)
    assert set(again.cold_start.keys) <= cold and set(again.train.keys) <= train
    # A holdout seed draws another set of users per value, of the same share, the same every time.
    drawn = {h: set(build(table, holdout_fraction=0.25, min_rows_per_task=2, holdout_seed=h).cold_start.keys)
             for h in (0, 1)}
    assert drawn[0] != drawn[1] and drawn[0] != cold and 0.15 < len(drawn[1]) / len(train | cold) < 0.35
    assert drawn[1] == set(build(table, holdout_fraction=0.25, min_rows_per_task=2, holdout_seed=1).cold_start.keys)


@pytest.mark.parametrize("unseen_task_fraction", [0.0, 0.3, 1.0])
def test_ids_never_seen_in_training_share_the_reserved_row(unseen_task_fraction: float) -> None:
    table = interactions(num_tasks=400)
    store = build(table, holdout_fraction=0.25, min_rows_per_task=2, reserve_unseen_row=True,
                  unseen_task_fraction=unseen_task_fraction)
    train, cold = store.train, store.cold_start
    train_users, cold_items = train.column("user"), cold.column("item")
    # Every cold-start user is new: all on row 0. Seen items keep their row, unseen ones take 0.
    assert (cold.column("user") == 0).all()
    seen_items = set(train.column("item").tolist())
    assert all((i == 0) == (i not in seen_items) for i in cold_items.tolist())
    assert 1 <= train.column("item").min()
    # A share of the training users are trained as new ones, on row 0, task by task.
    per_task = [set(train_users[a:b].tolist()) for a, b in zip(train.offsets[:-1], train.offsets[1:])]
    as_new = np.mean([users == {0} for users in per_task])
    assert all(users == {0} or 0 not in users for users in per_task)
    assert as_new == pytest.approx(unseen_task_fraction, abs=0.1)
    assert store.stats["config"]["reserve_unseen_row"] is True
    with pytest.raises(ValueError, match="reserve_unseen_row"):
        build(table, unseen_task_fraction=0.5)


def test_string_keys_from_csv_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "interactions.csv"
    pyarrow.csv.write_csv(interactions(string_keys=True), path)
    store = build(
        str(path), tmp_path / "store", min_rows_per_task=2, num_embeddings={"user": 1000, "item": 1000}
    )
    stats = json.loads((tmp_path / "store" / "stats.json").read_text())
    assert stats["tasks"] == store.train.num_tasks == store.stats["tasks"]
    loaded = TaskStore.load(tmp_path / "store")
    assert np.array_equal(loaded.train.column("user"), store.train.column("user"))
    assert (store.train.column("user") < 1000).all()

    # String ids are a stable hash (64-bit FNV-1a of the UTF-8 bytes) modulo the table size.
    def fnv(text: str) -> int:
        h = 0xCBF29CE484222325
        for byte in text.encode():
            h = ((h ^ byte) * 0x100000001B3) % 2**64
        return h

    first = task_rows(store.train, 0)
    user = interactions(string_keys=True).column("user").to_numpy()[first[0]]
    assert store.train.column("user")[0] == fnv(user) % 1000


def test_bad_input_names_the_column_or_file(tmp_path: Path) -> None:
    table = interactions()
    with pytest.raises(ValueError, match="'price'"):
        build(table, dense=["row", "price"])
    with pytest.raises(ValueError, match="'stars'"):
        build(table, label_rule="stars >= 4")
    with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
        build(str(tmp_path / "nowhere.parquet"))
    pa.parquet.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="'clock'"):
        build(tmp_path / "t.parquet", time_column="clock")
    with pytest.raises(ValueError, match="num_embeddings.*'item'"):
        build(table, num_embeddings={"user": 10})
    with pytest.raises(ValueError, match=r"num_embeddings.*not categorical \['rating'\]"):
        build(table, num_embeddings={"user": 10, "item": 10, "rating": 10})
    with pytest.raises(ValueError, match="time_column"):
        build(table, time_column=None)
    with pytest.raises(ValueError, match="support_size"):
        build(table, support_size=1.5)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv: Empty CSV file"):
        build(tmp_path / "empty.csv")


def test_values_that_would_silently_train_wrong_are_refused() -> None:
    table = interactions()

    def with_column(name: str, values: list) -> pa.Table:
        column = pa.array(values + [values[-1]] * (table.num_rows - len(values)))
        return table.set_column(table.schema.get_field_index(name), name, column)

    ratings = [float("nan"), 5.0] + [4.0] * 3
    with pytest.raises(ValueError, match=r"label column 'rating' has 1 missing values \(null or NaN\)"):
        build(with_column("rating", ratings))  # NaN >= 4 is False: it would have been a negative
    with pytest.raises(TypeError, match=r"time_column 'ts' has type string; .*'2024-1-10' before '2024-1-2'"):
        build(with_column("ts", ["2024-1-10", "2024-1-2"]))
    with pytest.raises(ValueError, match=r"time_column 'ts' has 2 missing values .*into the query set"):
        build(with_column("ts", [None, float("nan"), 3.0]))
    build(with_column("ts", [None, 2, 3]), split="random")  # times unused, at random
    with pytest.raises(ValueError, match=r"dense column 'row' has 2 NaN or infinite values"):
        build(with_column("row", [float("inf"), float("nan"), None, 1.0]))
    with pytest.raises(ValueError, match=r"label column 'liked' must hold 0/1 values: .*'yes'"):
        build(table.append_column("liked", pa.array(["yes"] * table.num_rows)), label="liked", label_rule=None)


def test_csv_ids_stay_as_written(tmp_path: Path) -> None:
    rows = ["user,item,rating,ts,row"] + [f"{u},{i},5,{t},{t}" for t, (u, i) in enumerate(
        [("007", "0042"), ("007", "42"), ("7", "42"), ("7", "0042")] * 2)]
    (tmp_path / "padded.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match="writes some ids in another form") as said:
        stats = build(tmp_path / "padded.csv", support_size=1)
    assert [str(w.message).split(": ", 1)[1][:40] for w in said] == [
        "column 'user' writes some ids in another", "column 'item' writes some ids in another"]
    assert stats.stats["input_tasks"] == 2  # "007" and "7": Arrow alone would read both as 7
    assert stats.stats["categorical"]["item"]["distinct_values"] == 2
    # Joined after the ids are read as written, the side table's keys read as written too: "0042"
    # has no row there (counted), "42" has brand 1.
    (tmp_path / "items.csv").write_text("item,brand\n42,1\n")
    with pytest.warns(UserWarning) as said:
        joined = build(tmp_path / "padded.csv", support_size=1, side_tables={"item": tmp_path / "items.csv"},
                       categorical=["user", "item", "brand"], num_embeddings={"user": 10**6, "item": 1024, "brand": 8})
    assert [str(w.message).split(": ", 1)[1][:20] for w in said] == [
        "column 'user' writes", "column 'item' writes", "4 of 8 interaction r"]
    assert joined.stats["categorical"]["brand"] == {"distinct_values": 2, "values_sharing_a_row": 0, "missing": 4}
    plain = ["user,item,rating,ts,row"] + [f"{u},{u + 1},5,{t},{t}" for t, u in enumerate([3, 3, 8, 8])]
    (tmp_path / "plain.csv").write_text("\n".join(plain) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ids written as their numbers stay integers, without a word
        assert build(tmp_path / "plain.csv", support_size=1).stats["input_tasks"] == 2


def collect(data, **loader_kwargs) -> list[TaskBatch]:
    return list(DataLoader(data, batch_size=None, **loader_kwargs))


def test_meta_batches_hold_whole_tasks_and_ranks_get_disjoint_tasks() -> None:
    store = build(interactions(num_tasks=200), min_rows_per_task=2)
    split = store.train
    by_key = {int(k): t for t, k in enumerate(split.keys)}
    ranks = [MetaBatchDataset(split, tasks_per_batch=8, rank=r, world_size=2, seed=3) for r in (0, 1)]
    keys_per_rank = []
    for data in ranks:
        batches = collect(data)
        assert len(batches) == len(data) == split.num_tasks // 16
        keys = []
        for batch in batches:
            assert batch.num_tasks == 8 and batch.sparse_features.stride() == batch.num_rows
            ids = batch.sparse_features.to_dict()
            for t, key in enumerate(batch.task_keys.tolist()):
                rows = slice(int(batch.task_offsets[t]), int(batch.task_offsets[t + 1]))
                task = by_key[key]
                stored = slice(int(split.offsets[task]), int(split.offsets[task + 1]))
                # The task's every row, in store order (support first), in this one batch.
                assert torch.equal(
                    batch.dense_features[rows, 0], torch.from_numpy(split.column("row")[stored])
                )
                assert torch.equal(batch.labels[rows], torch.from_numpy(split.column("label")[stored]))
                assert torch.equal(ids["item"].values()[rows], torch.from_numpy(split.column("item")[stored]))
                assert int(batch.support_sizes[t]) == split.support_sizes[task]
            keys.extend(batch.task_keys.tolist())
        assert len(keys) == len(set(keys))
        keys_per_rank.append(set(keys))
    assert keys_per_rank[0].isdisjoint(keys_per_rank[1])
    # One storage per meta-batch: a DataLoader worker passes it as one shared-memory block.
    batch = ranks[0].batch(ranks[0].plan()[0])
    tensors = [
        batch.dense_features,
        batch.labels,
        batch.task_offsets,
        batch.support_sizes,
        batch.task_keys,
        batch.sparse_features.values(),
        batch.sparse_features.lengths(),
    ]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("tasks_per_batch", [1, 4, 7])
def test_evaluation_scores_every_task_once_with_as_many_steps_on_every_rank(
    world_size: int, tasks_per_batch: int
) -> None:
    split = build(interactions(num_tasks=122), min_rows_per_task=2, holdout_fraction=0.5).cold_start
    ranks = [
        MetaBatchDataset(split, tasks_per_batch, shuffle=False, rank=r, world_size=world_size, drop_last=False)
        for r in range(world_size)
    ]
    plans = [data.plan() for data in ranks]
    assert len({len(plan) for plan in plans}) == 1 and all(len(p) == len(d) for p, d in zip(plans, ranks))
    sizes = [len(batch) for plan in plans for batch in plan]
    assert min(sizes) >= 1 and max(sizes) <= max(tasks_per_batch, 2)
    scored = sorted(int(t) for plan in plans for batch in plan for t in batch)
    assert scored == list(range(split.num_tasks))
    rows = [QueryRowDataset(split, 50, query_only=True, shuffle=False, rank=r, world_size=world_size,
                            drop_last=False) for r in range(world_size)]
    batches = [collect(data) for data in rows]
    assert len({len(b) for b in batches}) == 1
    query_rows = int((split.offsets[1:] - split.offsets[:-1] - split.support_sizes).sum())
    assert sum(int(b.labels.numel()) for per_rank in batches for b in per_rank) == query_rows


def test_epochs_reshuffle_and_workers_yield_the_same_batches() -> None:
    split = build(interactions(num_tasks=200), min_rows_per_task=2).train
    data = MetaBatchDataset(split, tasks_per_batch=8, seed=1)
    first, second = collect(data), collect(data)
    assert [b.task_keys.tolist() for b in first] != [b.task_keys.tolist() for b in second]
    data.set_epoch(0)
    # Two background workers, prefetching: the same meta-batches in the same order.
    workers = collect(data, num_workers=2, prefetch_factor=2)
    assert [b.task_keys.tolist() for b in workers] == [b.task_keys.tolist() for b in first]
    assert all(torch.equal(a.dense_features, b.dense_features) for a, b in zip(workers, first))
    with pytest.raises(ValueError, match="tasks_per_batch"):
        MetaBatchDataset(split, tasks_per_batch=split.num_tasks + 1)


def test_click_model_is_the_one_behind_each_generated_row() -> None:
    config = SyntheticTaskConfig(num_users=500, heterogeneity=2.0, seed=5)
    table, truth = generate_with_click_model(config)
    assert table.equals(generate_interactions(config))
    assert truth.logit.shape == truth.global_logit.shape == (table.num_rows,)
    assert truth.item_factors.shape == (table.num_rows, config.latent_dim)
    # Row by row: rows of one item carry that item's factors, and clicks follow the logit.
    items = table["item_id"].to_numpy()
    first = {item: row for row, item in reversed(list(enumerate(items)))}
    np.testing.assert_array_equal(truth.item_factors, truth.item_factors[[first[i] for i in items]])
    labels = table["label"].to_numpy()
    assert labels[truth.logit > 1].mean() > 0.6 > 0.4 > labels[truth.logit < -1].mean()
    _, alike = generate_with_click_model(dataclasses.replace(config, heterogeneity=0.0))
    np.testing.assert_array_equal(alike.logit, alike.global_logit)
    assert truth.bias_variance + config.latent_dim * truth.own_taste_variance > 0


@pytest.mark.parametrize("heterogeneity", [0.0, 2.0])
def test_synthetic_tasks_are_deterministic_and_adaptation_pays_as_users_differ(
    tmp_path: Path, heterogeneity: float
) -> None:
    config = SyntheticTaskConfig(num_users=3000, heterogeneity=heterogeneity, seed=5)
    table = generate_interactions(config)
    assert table.equals(generate_interactions(config))
    assert not table.equals(generate_interactions(dataclasses.replace(config, seed=6)))
    assert table.column_names == [*config.categorical_columns, *config.dense_columns, "label", "timestamp"]
    assert pa.parquet.read_table(write_interactions(config, tmp_path / "i.parquet")).equals(table)

    store = build_task_store(
        table,
        None,
        task_key="user_id",
        categorical=config.categorical_columns,
        num_embeddings=config.cardinalities,
        dense=config.dense_columns,
        label="label",
        time_column="timestamp",
        holdout_fraction=0.0,
    )
    split = store.train
    # A per-user adaptation as simple as it gets (category click rates on the support rows, shrunk
    # to the global rate) beats the global per-category rate on the query rows.
    task = np.repeat(np.arange(split.num_tasks), np.diff(split.offsets))
    support = np.arange(split.num_rows) < np.repeat(
        split.offsets[:-1] + split.support_sizes, np.diff(split.offsets)
    )
    category, label = split.column("category"), split.column("label")
    k = config.num_categories
    global_rate = np.bincount(category[support], label[support], k) / np.bincount(
        category[support], minlength=k
    )
    cell = task * k + category
    clicks = np.bincount(cell[support], label[support], split.num_tasks * k)
    shows = np.bincount(cell[support], minlength=split.num_tasks * k)
    user_rate = (clicks + 2 * global_rate[np.arange(clicks.size) % k]) / (shows + 2)

    def log_loss(p: np.ndarray) -> float:
        y = label[~support]
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    ratio = log_loss(user_rate[cell[~support]]) / log_loss(global_rate[category[~support]])
    # Users alike: the per-user rates only add noise. Users differing: they pay.
    assert ratio > 1.0 if heterogeneity == 0 else ratio < 0.95
    rows_per_user = np.diff(split.offsets)
    assert np.median(rows_per_user) < rows_per_user.mean()  # long-tailed: many light users


def test_synthetic_task_config_checks_its_knobs() -> None:
    with pytest.raises(ValueError, match="heterogeneity"):
        SyntheticTaskConfig(heterogeneity=-1.0)
    with pytest.raises(ValueError, match="label_noise"):
        SyntheticTaskConfig(label_noise=1.5)


# -- sources, query rows, one worker, rank arguments, empty splits ----------------------------------


def test_parquet_csv_and_table_sources_build_the_same_store(tmp_path: Path) -> None:
    table = interactions()
    pa.parquet.write_table(table, tmp_path / "t.parquet")
    pyarrow.csv.write_csv(table, tmp_path / "t.csv")
    want = build(table, min_rows_per_task=2).train
    for name in ("t.parquet", "t.csv"):
        got = build(tmp_path / name, tmp_path / f"store-{name}", min_rows_per_task=2).train
        for field in ("offsets", "support_sizes", "keys", "single_class"):
            assert np.array_equal(getattr(got, field), getattr(want, field)), (name, field)
        for column in ("user", "item", "row", "label"):
            assert np.array_equal(got.column(column), want.column(column)), (name, column)
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        build(tmp_path / "nowhere.csv")


def test_query_only_rows_are_the_query_sets() -> None:
    split = build(interactions(num_tasks=200), min_rows_per_task=2).train
    support, query = set(), set()
    for t in range(split.num_tasks):
        rows = task_rows(split, t).tolist()
        support.update(rows[: split.support_sizes[t]])
        query.update(rows[split.support_sizes[t]:])

    def rows_of(data: QueryRowDataset, **loader_kwargs) -> list[int]:
        # dense=["row"]: the first dense feature is each row's input position.
        return [int(r) for b in collect(data, **loader_kwargs) for r in b.dense_features[:, 0].tolist()]

    def make(query_only: bool) -> QueryRowDataset:
        return QueryRowDataset(split, batch_size=16, query_only=query_only, seed=2, rank=0, world_size=1)

    seen = rows_of(make(True))
    assert len(seen) == len(set(seen)) == len(make(True)) * 16
    assert set(seen) <= query and len(query) - len(seen) < 16  # all but a last partial batch
    assert rows_of(make(True), num_workers=1) == seen  # the same batches from a background worker
    everything = set(rows_of(make(False)))
    assert everything & support and everything & query


def test_meta_batches_from_one_worker_and_rank_arguments() -> None:
    split = build(interactions(num_tasks=200), min_rows_per_task=2).train

    def make() -> MetaBatchDataset:
        return MetaBatchDataset(split, tasks_per_batch=8, seed=4, rank=1, world_size=2)

    in_process, in_worker = collect(make()), collect(make(), num_workers=1)
    assert len(in_process) == len(in_worker) == len(make()) > 0
    for a, b in zip(in_process, in_worker):
        assert torch.equal(a.task_keys, b.task_keys) and torch.equal(a.dense_features, b.dense_features)
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
    with pytest.raises(ValueError, match="both"):
        MetaBatchDataset(split, tasks_per_batch=8, rank=1)
    with pytest.raises(ValueError, match="rank"):
        MetaBatchDataset(split, tasks_per_batch=8, rank=2, world_size=2)


def test_an_empty_split_round_trips(tmp_path: Path) -> None:
    store = build(interactions(), tmp_path / "store", holdout_fraction=0.0, min_rows_per_task=2)
    loaded = TaskStore.load(tmp_path / "store")
    assert loaded.cold_start.num_tasks == 0 and loaded.cold_start.num_rows == 0
    assert loaded.train.num_tasks == store.train.num_tasks == store.stats["tasks"]
    with pytest.raises(FileNotFoundError, match="not a task store"):
        TaskStore.load(tmp_path)


def test_a_failed_rebuild_keeps_the_store_and_a_rebuild_replaces_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "store"
    first = build(interactions(seed=0), out, min_rows_per_task=2)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(args[0]))

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left on device: .*tasks.npz"):
        build(interactions(seed=1), out, min_rows_per_task=2)
    monkeypatch.undo()
    assert TaskStore.load(out).stats == first.stats
    second = build(interactions(seed=1), out, min_rows_per_task=2)
    assert TaskStore.load(out).stats == second.stats != first.stats
    assert [p.name for p in sorted(tmp_path.iterdir())] == [".store.versions", "store"]
    assert len(list((tmp_path / ".store.versions").iterdir())) == 1


def test_task_data_module_refuses_a_store_built_with_other_settings(tmp_path: Path) -> None:
    from lightning_dembed.data import TaskDataModule

    store_dir = tmp_path / "store"
    TaskDataModule(store_dir=str(store_dir), num_users=300).prepare_data()
    TaskDataModule(store_dir=str(store_dir), num_users=300).prepare_data()  # same settings: reused
    with pytest.raises(ValueError, match=r"300users.*400users.*Set data.store_dir"):
        TaskDataModule(store_dir=str(store_dir), num_users=400).prepare_data()
    with pytest.raises(ValueError, match=r"holdout_fraction: store has 0.2, config asks 0.5"):
        TaskDataModule(store_dir=str(store_dir), num_users=300, holdout_fraction=0.5).prepare_data()
    # A store of an older layout is named as such, not met with a missing-file error.
    stats = json.loads((store_dir / "stats.json").read_text())
    del stats["format"]
    (store_dir / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match=r"format 1; this version reads format 2"):
        TaskStore.load(store_dir)


def test_task_data_module_plain_training_with_cold_start_tasks_and_generator_settings(tmp_path: Path) -> None:
    from lightning_dembed.data import TaskDataModule

    data = TaskDataModule(store_dir=str(tmp_path / "store"), num_users=300, as_tasks=False,
                          eval_as_tasks=True, synthetic={"heterogeneity": 0.0, "label_noise": 0.0})
    data.prepare_data()
    data.setup("fit")
    assert isinstance(data._datasets["train"], QueryRowDataset)
    assert all(isinstance(data._datasets[split], MetaBatchDataset) for split in ("val", "test"))
    # Validation and test: the two disjoint halves of the cold-start users.
    val = {int(k) for b in data._datasets["val"] for k in b.task_keys}
    test = {int(k) for b in data._datasets["test"] for k in b.task_keys}
    assert val and test and val.isdisjoint(test)
    # The generator's settings name the interactions file, so a store records what generated it.
    assert list(tmp_path.glob("store_interactions_*_heterogeneity0.0_label_noise0.0.parquet"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_pass_resumes_at_a_saved_epoch_and_batch(num_workers: int) -> None:
    store = build(interactions(num_tasks=60))
    for make in (lambda: MetaBatchDataset(store.train, tasks_per_batch=4, rank=0, world_size=1),
                 lambda: QueryRowDataset(store.train, batch_size=16, rank=0, world_size=1)):
        reference = make()
        epochs = [collect(reference, num_workers=0) for _ in range(2)]
        resumed = make()
        resumed.set_position(epoch=1, batch=2)  # mid-way through the second epoch
        kwargs = {"num_workers": num_workers, "persistent_workers": num_workers > 0}
        batches = collect(resumed, **kwargs)
        expected = epochs[1][2:]
        assert len(batches) == len(expected) > 0
        for got, want in zip(batches, expected):
            assert torch.equal(got.labels, want.labels) and torch.equal(got.dense_features, want.dense_features)


def test_values_forced_into_one_row_are_counted_and_warned_about() -> None:
    table = interactions(num_tasks=60)  # items 0..999
    largest = max(table.column("item").to_pylist())
    with pytest.warns(UserWarning, match=rf"'item'.*at least {largest + 1} \(its largest id \+ 1\)"):
        undersized = build(table, num_embeddings={"user": 10**6, "item": 500})
    counts = undersized.stats["categorical"]["item"]
    distinct = len(set(table.column("item").to_pylist()))
    assert counts["distinct_values"] == distinct
    assert counts["values_sharing_a_row"] == distinct - len({i % 500 for i in table.column("item").to_pylist()})
    assert undersized.stats["categorical"]["user"]["values_sharing_a_row"] == 0

    # A hashed string column is warned about only when many of its values collide.
    words = pa.table({"user": [1, 1, 1, 1, 2, 2, 2, 2], "word": list("abcdefgh"), "rating": [5, 1] * 4,
                      "ts": list(range(8))})
    args = dict(categorical=["word"], dense=[], min_rows_per_task=2)
    with pytest.warns(UserWarning, match="'word'.*ten or more times its 8 distinct values"):
        build(words, num_embeddings={"word": 2}, **args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        roomy = build(words, num_embeddings={"word": 10**6}, **args)
        build(table, num_embeddings={"user": 10**6, "item": 1000})
        build(table, num_embeddings={"user": 10**6, "item": largest + 2}, reserve_unseen_row=True)
    with pytest.warns(UserWarning, match=rf"at least {largest + 2} \(its largest id \+ 1, \+ the reserved row\)"):
        build(table, num_embeddings={"user": 10**6, "item": 500}, reserve_unseen_row=True)
    assert roomy.stats["categorical"]["word"] == {"distinct_values": 8, "values_sharing_a_row": 0, "missing": 0}

    # Negative ids need the span down to the smallest; a missing value is stored as 0 and counts as it.
    signed = pa.table({"user": [1] * 4 + [2] * 4, "item": pa.array([-5, 0, 1, 2, None, 10, 3, 4]),
                       "rating": [5, 1] * 4, "ts": list(range(8))})
    with pytest.warns(UserWarning) as said:
        counted = build(signed, categorical=["item"], num_embeddings={"item": 10}, dense=[], min_rows_per_task=2)
    messages = [str(w.message) for w in said]
    assert any("'item': its 1 missing values are stored as 0, which is also a real value" in m for m in messages)
    assert any(re.search(r"'item'.*at least 16 \(its ids span -5..10\)", m) for m in messages)
    assert counted.stats["categorical"]["item"] == {"distinct_values": 7, "values_sharing_a_row": 1, "missing": 1}

    # Sparse ids (hashes): numbering them first, not a table of 2**40 rows, is the fix to name first.
    hashed = pa.table({"user": [1] * 4 + [2] * 4, "item": [2**40 + 7 * i for i in range(8)], "rating": [5, 1] * 4,
                       "ts": list(range(8))})
    with pytest.warns(UserWarning, match=r"its 8 ids are sparse \(up to 1099511627825\): number them 0..7 first"):
        build(hashed, categorical=["item"], num_embeddings={"item": 7}, dense=[], min_rows_per_task=2)
