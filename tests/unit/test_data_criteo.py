"""Criteo TSV parsing, preprocessing and the sharded reader, checked against a line-by-line parse."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dembed.data import (
    CRITEO_1TB_NUM_EMBEDDINGS,
    ClickDataset,
    CriteoTsvReader,
    RecDataModule,
    criteo,
    criteo_tables,
    preprocess,
    preprocess_main,
    write_fake_criteo_tsv,
)
from lightning_dembed.data.criteo import CRITEO_SPARSE_FEATURES, map_categorical

SIZES = [1000 + 37 * i for i in range(26)]


def fake_trainer(rank: int, world_size: int) -> SimpleNamespace:
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    return SimpleNamespace(global_rank=rank, world_size=world_size, strategy=cpu)
MASK64 = (1 << 64) - 1


def reference_hash(value: int) -> int:
    """splitmix64's finaliser, written out in Python integers."""
    value ^= value >> 30
    value = (value * 0xBF58476D1CE4E5B9) & MASK64
    value ^= value >> 27
    value = (value * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def reference_parse(path: Path, mapping: str, skip_lines=()) -> dict[str, np.ndarray]:
    """The Criteo rules applied line by line: the spec the vectorised parser must meet."""
    labels, dense, cats = [], [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if number in skip_lines:
            continue
        fields = line.split("\t")
        assert len(fields) == 40
        labels.append(float(fields[0]))
        dense.append([math.log1p(max(int(x), 0)) if x else 0.0 for x in fields[1:14]])
        row = []
        for x, size in zip(fields[14:], SIZES):
            value = int(x, 16) if x else None
            if value is not None and mapping == "hash":
                value = reference_hash(value)
            row.append(0 if value is None else value % size)
        cats.append(row)
    return {"labels": np.array(labels), "dense": np.array(dense), "cats": np.array(cats)}


def read_all(data: ClickDataset) -> dict[str, np.ndarray]:
    batches = list(data)
    return {
        "labels": torch.cat([b.labels for b in batches]).numpy(),
        "dense": torch.cat([b.dense_features for b in batches]).numpy(),
        "cats": np.stack([
            torch.cat([b.sparse_features[feature].values() for b in batches]).numpy()
            for feature in CRITEO_SPARSE_FEATURES
        ], axis=1),
    }


def assert_rows_equal(got: dict, want: dict) -> None:
    np.testing.assert_array_equal(got["labels"], want["labels"])
    np.testing.assert_allclose(got["dense"], want["dense"], rtol=1e-6)
    np.testing.assert_array_equal(got["cats"], want["cats"])


def test_fake_files_have_the_criteo_format(tmp_path: Path) -> None:
    path = tmp_path / "day_0"
    write_fake_criteo_tsv(path, 300, seed=1)
    lines = path.read_text().split("\n")
    assert lines[-1] == "" and len(lines) == 301
    fields = [line.split("\t") for line in lines[:-1]]
    assert {len(f) for f in fields} == {40}
    assert {f[0] for f in fields} == {"0", "1"}
    hexes = [x for f in fields for x in f[14:] if x]
    assert all(len(x) == 8 and int(x, 16) >= 0 for x in hexes)
    assert any(f[2].startswith("-") for f in fields)  # int_1 goes negative, as in Criteo
    assert sum(x == "" for f in fields for x in f[1:]) > 0  # missing values


@pytest.mark.parametrize("mapping", ["modulo", "hash"])
def test_round_trip_tsv_preprocess_dataset_equals_line_by_line_parse(tmp_path: Path, mapping: str) -> None:
    paths = [tmp_path / "day_0", tmp_path / "day_1"]
    write_fake_criteo_tsv(paths[0], 400, seed=1)
    write_fake_criteo_tsv(paths[1], 300, seed=2)
    info = preprocess(paths, tmp_path / "pre", SIZES, mapping=mapping)
    assert info.rows_per_file == (400, 300) and info.num_malformed == 0
    want = [reference_parse(path, mapping) for path in paths]
    want = {key: np.concatenate([w[key] for w in want]) for key in want[0]}
    assert_rows_equal(read_all(ClickDataset(tmp_path / "pre", batch_size=100)), want)
    direct = CriteoTsvReader(paths[1], SIZES, mapping).read_all()
    np.testing.assert_array_equal(direct["cat_3"].to_numpy(), want["cats"][400:, 3])


def test_hex_mapping_is_in_range_and_stable() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2**32, 10_000, dtype=np.uint64)
    for size in (1, 3, 1000, 45833188, 2**31 - 1):
        for mapping in ("modulo", "hash"):
            ids = map_categorical(values, size, mapping)
            assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < size
    np.testing.assert_array_equal(map_categorical(values, 1000), values % 1000)
    assert map_categorical(np.array([0, 1, 0xDEADBEEF]), 2**31 - 1, "hash").tolist() == [
        reference_hash(v) % (2**31 - 1) for v in (0, 1, 0xDEADBEEF)
    ] == [0, 1026503200, 144633073]
    # Values sharing their low digits all collide under modulo, but spread under hash.
    multiples = np.arange(1000, dtype=np.uint64) * 1024
    assert len(np.unique(map_categorical(multiples, 1024, "modulo"))) == 1
    assert len(np.unique(map_categorical(multiples, 1024, "hash"))) > 500
    with pytest.raises(ValueError, match="mapping"):
        map_categorical(values, 10, "crc")


@pytest.mark.parametrize(
    "kind, message",
    [
        (0, "day_0:7: malformed line: 39 tab-separated fields, expected 40"),
        (1, "day_0:7: malformed line: column 2 (int_0) is '1.5', expected an integer"),
        (2, "day_0:7: malformed line: column 15 (cat_0) is 'xyz!', expected a hex string of at most 8 "
            "digits"),
        (3, "day_0:7: malformed line: label is '2', expected 0 or 1"),
    ],
)
def test_malformed_line_error_names_file_line_and_problem(tmp_path: Path, kind: int, message: str) -> None:
    path = tmp_path / "day_0"
    # The kinds cycle in list order; line 7 gets `kind`, later lines the others, and the first one wins.
    write_fake_criteo_tsv(path, 50, malformed_lines=[40, 41, 42][:kind] + [7])
    with pytest.raises(ValueError) as error:
        preprocess([path], tmp_path / "pre", 1000)
    assert str(error.value) == f"{path.parent}/{message}"
    assert not (tmp_path / "pre").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["day_0"]  # no half-written output left behind


@pytest.mark.parametrize(
    "line, problem",
    [
        ("", "line is empty"),
        ("1" + "\t1" * 13 + "\tab" * 26 + "\t5", "41 tab-separated fields"),
        ("1" + "\t1" * 13 + "\t123456789" + "\tab" * 25, "(cat_0) is '123456789'"),
        ("1" + "\t-" + "\t1" * 12 + "\tab" * 26, "(int_0) is '-'"),
        ("\t1" * 13 + "\tab" * 26, "label is ''"),
    ],
)
def test_malformed_line_variants(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "train.txt"
    write_fake_criteo_tsv(path, 5)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + [line] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=rf"train.txt:4: malformed line: .*{re.escape(problem)}"):
        CriteoTsvReader(path, 100).read_all()


def test_line_numbers_and_skipping_across_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(criteo, "_TSV_BLOCK_BYTES", 4096)  # about 16 lines per block
    path = tmp_path / "day_3"
    malformed = [120, 121, 250, 251, 299]  # a short line, a bad integer, a bad hex, a bad label, a short line
    write_fake_criteo_tsv(path, 300, seed=4, malformed_lines=malformed)
    with pytest.raises(ValueError, match="day_3:120: .*39 tab-separated fields"):
        CriteoTsvReader(path, SIZES).read_all()
    lines = path.read_text().splitlines()
    lines[119] = lines[0]  # repair the short line: the bad integer on line 121 comes first now
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"day_3:121: .*\(int_0\) is '1.5'"):
        CriteoTsvReader(path, SIZES).read_all()

    reader = CriteoTsvReader(path, SIZES, skip_malformed=True)
    table = reader.read_all()
    assert reader.num_malformed == 4 and table.num_rows == 296
    want = reference_parse(path, "modulo", skip_lines=malformed[1:])
    np.testing.assert_array_equal(table["label"].to_numpy(), want["labels"])
    np.testing.assert_array_equal(table["cat_25"].to_numpy(), want["cats"][:, 25])


def test_skip_malformed_counts_and_records_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = [tmp_path / "day_0", tmp_path / "day_1"]
    write_fake_criteo_tsv(paths[0], 100, malformed_lines=[2, 5, 9])
    write_fake_criteo_tsv(paths[1], 100, malformed_lines=[1])
    argv = ["--input", *map(str, paths), "--output", str(tmp_path / "pre"), "--num-embeddings", "500",
            "--mapping", "hash", "--skip-malformed"]
    assert preprocess_main(argv) == 0
    assert "wrote 196 rows in 2 files" in capsys.readouterr().out
    info = ClickDataset(tmp_path / "pre", batch_size=10).info
    assert info.num_malformed == 4 and info.rows_per_file == (97, 99) and info.num_embeddings == (500,) * 26
    with pytest.raises(SystemExit) as exit_:
        preprocess_main(argv)  # the output directory exists now
    assert exit_.value.code == 1
    assert "preprocess-criteo: error: " in (err := capsys.readouterr().err) and "pre already exists" in err


def test_a_killed_preprocessing_leaves_nothing_the_next_run_keeps(tmp_path: Path) -> None:
    from lightning_dembed import _atomic

    write_fake_criteo_tsv(tmp_path / "day_0", 20)
    (_atomic.new_version(tmp_path / "pre") / "part-00000.arrow").write_bytes(b"half a file")  # then killed
    assert not (tmp_path / "pre").exists()
    info = preprocess([tmp_path / "day_0"], tmp_path / "pre", 100)
    assert len(list(ClickDataset(tmp_path / "pre", batch_size=20))) == 1 and info.num_rows == 20
    assert len(list(_atomic.versions_dir(tmp_path / "pre").iterdir())) == 1


def test_missing_empty_and_unusable_inputs_fail_at_start(tmp_path: Path) -> None:
    good, empty, missing = tmp_path / "day_0", tmp_path / "day_1", tmp_path / "day_2"
    write_fake_criteo_tsv(good, 20)
    empty.touch()
    with pytest.raises(FileNotFoundError, match="day_2 does not exist"):
        preprocess([good, missing], tmp_path / "pre", 100)
    with pytest.raises(ValueError, match="day_1 is empty"):
        preprocess([good, empty], tmp_path / "pre", 100)
    with pytest.raises(ValueError, match="at least one"):
        preprocess([], tmp_path / "pre", 100)
    all_bad = tmp_path / "bad"
    all_bad.write_text("x\ty\n\n")
    with pytest.raises(ValueError, match="no valid lines"):
        preprocess([all_bad], tmp_path / "pre", 100, skip_malformed=True)
    with pytest.raises(ValueError, match="26 ints"):
        preprocess([good], tmp_path / "pre", [100, 200])
    assert not (tmp_path / "pre").exists()
    preprocess([good], tmp_path / "pre", 100)
    with pytest.raises(FileExistsError, match="pre already exists"):
        preprocess([good], tmp_path / "pre", 100)
    with pytest.raises(FileNotFoundError, match="preprocess-criteo"):
        ClickDataset(tmp_path / "nowhere", batch_size=4)
    with pytest.raises(ValueError, match="no full batch of 64 rows"):
        ClickDataset(tmp_path / "pre", batch_size=64)


@pytest.fixture
def preprocessed(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    paths = [tmp_path / "day_0", tmp_path / "day_1"]
    write_fake_criteo_tsv(paths[0], 600, seed=5)
    write_fake_criteo_tsv(paths[1], 400, seed=6)
    preprocess(paths, tmp_path / "pre", SIZES)
    rows = [reference_parse(path, "modulo") for path in paths]
    return tmp_path / "pre", {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}


def test_ranks_read_disjoint_contiguous_slices_of_equal_length(preprocessed) -> None:
    path, want = preprocessed
    # 1000 rows over 3 ranks: 333 each, 5 batches of 64 (13 rows dropped per rank, 1 at the end)
    for rank in range(3):
        data = ClickDataset(path, batch_size=64, rank=rank, world_size=3)
        assert len(data) == 5
        start = 333 * rank  # rank 1 crosses from day_0 into day_1
        assert_rows_equal(read_all(data), {key: value[start:start + 320] for key, value in want.items()})
    data = ClickDataset(path, batch_size=50, row_range=(900, 1000), rank=1, world_size=2)
    assert_rows_equal(read_all(data), {key: value[950:1000] for key, value in want.items()})
    assert len(ClickDataset(path, batch_size=64, num_batches=2)) == 2
    with pytest.raises(ValueError, match="only 15 each"):
        ClickDataset(path, batch_size=64, num_batches=16)
    with pytest.raises(ValueError, match="not inside"):
        ClickDataset(path, batch_size=64, row_range=(0, 1001))


def test_shuffle_reorders_whole_batches_every_pass(preprocessed) -> None:
    path, want = preprocessed
    data = ClickDataset(path, batch_size=100, shuffle=True, seed=3)
    passes = [[b.labels for b in data] for _ in range(2)]
    in_order = [tuple(batch) for batch in want["labels"].reshape(10, 100).tolist()]
    orders = [[in_order.index(tuple(batch.tolist())) for batch in batches] for batches in passes]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(10))  # every batch once, whole
    assert orders[0] != list(range(10)) and orders[0] != orders[1]
    again = ClickDataset(path, batch_size=100, shuffle=True, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(passes[0], (b.labels for b in again)))


def test_dataloader_workers_keep_the_order(preprocessed) -> None:
    path, want = preprocessed
    data = ClickDataset(path, batch_size=100)
    got = torch.cat([b.labels for b in DataLoader(data, batch_size=None, num_workers=2)])
    np.testing.assert_array_equal(got.numpy(), want["labels"])


def test_criteo_tables() -> None:
    tables = criteo_tables(CRITEO_1TB_NUM_EMBEDDINGS, embedding_dim=128)
    assert len(tables) == 26 and len(CRITEO_1TB_NUM_EMBEDDINGS) == 26
    first = tables[0]
    assert (first.name, first.feature_names, first.num_embeddings) == ("t_cat_0", ["cat_0"], 45833188)
    assert tables[25].num_embeddings == 35 and all(t.embedding_dim == 128 for t in tables)
    assert {t.num_embeddings for t in criteo_tables(1000, 16)} == {1000}


def test_datamodule_preprocesses_a_raw_directory_once_and_splits_by_rows(tmp_path: Path) -> None:
    write_fake_criteo_tsv(tmp_path / "day_0", 600, seed=1, malformed_lines=[10])
    write_fake_criteo_tsv(tmp_path / "day_1", 401, seed=2)
    data = RecDataModule(
        source="criteo", criteo_dir=str(tmp_path), criteo_num_embeddings=1000, embedding_dim=16,
        global_batch_size=64, train_batches=None, val_batches=2, test_batches=1, skip_malformed=True,
    )
    assert [t.name for t in data.tables()][:2] == ["t_cat_0", "t_cat_1"] and data.num_dense_features == 13
    data.prepare_data()
    data.prepare_data()  # already there: nothing to do
    assert (tmp_path / "preprocessed" / "metadata.json").is_file()
    lengths = {}
    for rank in range(2):
        data.trainer = fake_trainer(rank, world_size=2)
        data.setup("fit")
        loaders = (data.train_dataloader(), data.val_dataloader(), data.test_dataloader())
        lengths[rank] = [len(loader) for loader in loaders]
        assert next(iter(loaders[0])).labels.shape == (32,)
    # 1000 rows: test the last 64, validation the 128 before, training 808 (12 batches of 32 per rank)
    assert lengths == {0: [12, 2, 1], 1: [12, 2, 1]}
    preprocessed = RecDataModule(source="criteo", criteo_dir=str(tmp_path / "preprocessed"), embedding_dim=16)
    assert preprocessed.tables()[0].num_embeddings == 1000
    with pytest.raises(ValueError, match="criteo_num_embeddings"):
        RecDataModule(source="criteo", criteo_dir=str(tmp_path / "raw"), embedding_dim=16).tables()
    with pytest.raises(ValueError, match="embedding_dim"):
        RecDataModule(source="criteo", criteo_dir=str(tmp_path))
