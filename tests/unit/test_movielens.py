"""MovieLens (ml-100k, ml-1m, ml-10m, ml-latest) and interactions with side tables into the task store.

Rows, joins, labels, the store's settings check, and errors naming the file and line.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_dembed.data.batch import TaskBatch
from lightning_dembed.data.datamodules import TaskDataModule
from lightning_dembed.data.task_store import TaskStore, build_task_store
from lightning_dembed.data.movielens import (
    MOVIELENS_GENRES,
    genre_column,
    movielens_format,
    read_interactions,
    read_movielens,
    write_fake_movielens,
)

# Two users, three movies; user 2 rates in a scrambled time order, movie 3 was never rated and
# movie 2 (one genre) is rated by both. Both formats hold the same ratings.
RATINGS = [(1, 1, 5, 100), (2, 2, 3, 205), (1, 2, 4, 110), (2, 1, 1, 201), (2, 3, 4, 203), (1, 3, 2, 120)]
ML100K = {
    "u.data": "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS),
    "u.user": "1|24|M|technician|85711\n2|53|F|other|94043\n",
    "u.item": (
        "1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|"
        "0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
        "2|Café au lait (1993)|01-Jan-1993||http://us.imdb.com/Title?Caf%E9|"
        "0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
        "3|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    ),
}
ML1M = {
    "ratings.dat": "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS),
    "users.dat": "1::M::25::19::85711\n2::F::50::3::94043\n",
    "movies.dat": (
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Café au lait (1993)::Comedy\n"
        "3::Ghost in the Shell: Kôkaku kidôtai (1995)::Animation|Sci-Fi\n"
    ),
}
# The CSV format of ml-latest-small, ml-25m, ml-32m: a header, half stars, a quoted title with a
# comma, "Children" without 's, genres the older sets lack, no user file.
ML_LATEST = {
    "ratings.csv": "userId,movieId,rating,timestamp\n"
    + "".join(f"{u},{i},{r - 0.5 * (t == 205)},{t}\n" for u, i, r, t in RATINGS),
    "movies.csv": (
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '2,"Café au lait, The (1993)",Comedy|IMAX\n'
        "3,Ghost in the Shell (Kôkaku kidôtai) (1995),(no genres listed)\n"
    ),
}

# ml-10m: ml-1m's files with half stars, no users.dat, and a tags.dat.
ML10M = {
    "ratings.dat": "".join(f"{u}::{i}::{r - 0.5 * (t == 205)}::{t}\n" for u, i, r, t in RATINGS),
    "movies.dat": ML1M["movies.dat"],
    "tags.dat": "1::1::pixar::130\n",
}


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    encoding = "utf-8" if "ratings.csv" in files else "latin-1"  # MovieLens' own encodings
    for name, text in files.items():
        (directory / name).write_bytes(text.encode(encoding))
    return directory


@pytest.mark.parametrize("fmt, files", [("ml-100k", ML100K), ("ml-1m", ML1M)], ids=["ml-100k", "ml-1m"])
def test_movielens_directory_reads_ratings_with_user_and_movie_features(
    tmp_path: Path, fmt: str, files: dict[str, str]
) -> None:
    directory = write(tmp_path / fmt, files)
    assert movielens_format(directory) == fmt
    table = read_movielens(directory)
    assert table.num_rows == len(RATINGS)
    rows = table.to_pylist()
    assert [(r["user_id"], r["item_id"], r["rating"], r["timestamp"]) for r in rows] == RATINGS  # file order
    by_user = {r["user_id"]: r for r in rows}
    assert (by_user[1]["gender"], by_user[1]["zip"], by_user[2]["gender"]) == ("M", "85711", "F")
    coded = (24, "technician") if fmt == "ml-100k" else (25, 19)  # ml-1m codes age groups and occupations
    assert (by_user[1]["age"], by_user[1]["occupation"]) == coded
    movie = {r["item_id"]: r for r in rows}
    assert movie[2]["title"] == "Café au lait (1993)"  # latin-1 decoded
    assert (movie[1]["year"], movie[2]["year"]) == (1995, 1993)
    assert movie[1]["genres"] == "Animation|Children's|Comedy"
    assert movie[1]["genre_animation"] == movie[1]["genre_childrens"] == movie[1]["genre_comedy"] == 1.0
    assert movie[1]["genre_action"] == movie[2]["genre_animation"] == 0.0
    assert sum(movie[2][genre_column(g)] for g in MOVIELENS_GENRES) == 1.0
    if fmt == "ml-100k":  # the "unknown" genre has no flag column; its year is unknown
        assert (movie[3]["genres"], movie[3]["year"]) == ("unknown", None)
        assert sum(movie[3][genre_column(g)] for g in MOVIELENS_GENRES) == 0.0
    else:
        assert movie[3]["genre_sci_fi"] == 1.0


def test_csv_movielens_directory_reads_half_stars_and_quoted_titles(tmp_path: Path) -> None:
    directory = write(tmp_path / "ml-latest-small", ML_LATEST)
    assert movielens_format(directory) == "ml-latest"
    table = read_movielens(directory)
    rows = table.to_pylist()
    assert [(r["user_id"], r["item_id"], r["timestamp"]) for r in rows] == [(u, i, t) for u, i, _, t in RATINGS]
    assert [r["rating"] for r in rows] == [r - 0.5 * (t == 205) for _, _, r, t in RATINGS]  # 2.5 stars
    assert "gender" not in table.column_names  # no user file in this format
    movie = {r["item_id"]: r for r in rows}
    assert (movie[2]["title"], movie[2]["year"], movie[3]["year"]) == ("Café au lait, The (1993)", 1993, 1995)
    assert movie[1]["genre_childrens"] == movie[1]["genre_fantasy"] == 1.0  # "Children" is "Children's"
    assert sum(movie[2][genre_column(g)] for g in MOVIELENS_GENRES) == 1.0  # IMAX has no column
    assert (movie[3]["genres"], sum(movie[3][genre_column(g)] for g in MOVIELENS_GENRES)) == (
        "(no genres listed)", 0.0
    )
    # The made-up CSV data set reads the same way, and feeds a task store.
    fake = write_fake_movielens(tmp_path / "fake", "ml-latest", num_users=40, num_items=30)
    ratings = read_movielens(fake).column("rating").to_numpy()
    assert set(np.unique(ratings * 2) % 1) == {0.0} and (ratings % 1 == 0.5).any()
    store = build_task_store(
        fake, None, task_key="user_id", categorical=["user_id", "item_id", "genres", "year"],
        num_embeddings={c: 3000 for c in ("user_id", "item_id", "genres", "year")}, dense=["genre_drama"],
        label_rule="rating >= 4", time_column="timestamp", support_size=10, holdout_fraction=0.0,
    )
    assert store.train.num_tasks == 40
    with pytest.raises(ValueError, match=r"no column\(s\) \['gender'\].*Name only columns the data has"):
        build_task_store(fake, None, task_key="user_id", categorical=["user_id", "gender"],
                         num_embeddings={"user_id": 100, "gender": 4}, label_rule="rating >= 4",
                         time_column="timestamp", support_size=10)


def test_ml10m_directory_reads_half_stars_and_movies_without_users(tmp_path: Path) -> None:
    directory = write(tmp_path / "ml-10M100K", ML10M)
    assert movielens_format(directory) == "ml-10m"
    table = read_movielens(directory)
    assert table.column("rating").type == pa.float64()
    assert table.column("rating").to_pylist() == [5.0, 2.5, 4.0, 1.0, 4.0, 2.0]
    assert "gender" not in table.column_names
    assert table.column("genres").to_pylist()[:2] == ["Animation|Children's|Comedy", "Comedy"]
    assert table.column("year").to_pylist()[:2] == [1995, 1993]
    # A rating that is not in half stars is named with its file and line.
    write(directory, {"ratings.dat": ML10M["ratings.dat"].replace("::4.0::110", "::4.3::110")})
    with pytest.raises(ValueError, match=r"ratings.dat:3: malformed line: field 3 \(rating\) is '4.3', expected 0.5-5"):
        read_movielens(directory)
    fake = read_movielens(write_fake_movielens(tmp_path / "fake", "ml-10m", num_users=30, num_items=20))
    assert set(fake.column("rating").to_pylist()) <= {x / 2 for x in range(1, 11)}


def test_both_formats_give_the_same_table(tmp_path: Path) -> None:
    sizes = dict(num_users=30, num_items=50, seed=3)
    ml100k = read_movielens(write_fake_movielens(tmp_path / "a", "ml-100k", **sizes))
    ml1m = read_movielens(write_fake_movielens(tmp_path / "b", "ml-1m", **sizes))
    assert ml100k.column_names == ml1m.column_names
    assert [genre_column(g) for g in MOVIELENS_GENRES] == ml1m.column_names[-len(MOVIELENS_GENRES) :]
    shared = [c for c in ml1m.column_names if c not in ("age", "occupation")]  # coded differently
    assert ml100k.select(shared).equals(ml1m.select(shared))
    assert 30 * 20 <= ml1m.num_rows <= 30 * 60
    assert ml1m.column("gender").null_count == ml1m.column("title").null_count == 0


@pytest.mark.parametrize("fmt, files", [("ml-100k", ML100K), ("ml-1m", ML1M)], ids=["ml-100k", "ml-1m"])
def test_task_store_from_a_movielens_directory(tmp_path: Path, fmt: str, files: dict[str, str]) -> None:
    directory = write(tmp_path / fmt, files)
    store = build_task_store(
        directory, tmp_path / "store", task_key="user_id", categorical=["user_id", "item_id", "gender"],
        dense=["genre_comedy"], num_embeddings={"user_id": 100, "item_id": 100, "gender": 10},
        label_rule="rating >= 4", time_column="timestamp", support_size=1, min_rows_per_task=3,
        holdout_fraction=0.0,
    )
    assert (store.stats["input_rows"], store.train.num_tasks, store.train.num_rows) == (6, 2, 6)
    assert store.stats["config"]["source"] == str(directory)
    train = store.train
    # Each user's ratings by time; the earliest is the support set; label = rating >= 4.
    expected = sorted(RATINGS, key=lambda r: (r[0], r[3]))
    assert train.column("item_id").tolist() == [r[1] for r in expected]
    assert train.column("label").tolist() == [float(r[2] >= 4) for r in expected]
    assert train.column("genre_comedy").tolist() == [float(r[1] in (1, 2)) for r in expected]
    assert train.offsets.tolist() == [0, 3, 6] and train.support_sizes.tolist() == [1, 1]
    assert len(set(train.column("gender").tolist())) == 2


def test_fake_movielens_store_has_every_user_as_a_task(tmp_path: Path) -> None:
    directory = write_fake_movielens(tmp_path / "ml-1m", "ml-1m", num_users=120, num_items=80)
    table = read_movielens(directory)
    store = build_task_store(
        directory, None, task_key="user_id", categorical=["user_id", "item_id", "occupation", "genres"],
        num_embeddings={c: 1000 for c in ("user_id", "item_id", "occupation", "genres")},
        label_rule="rating >= 4", time_column="timestamp", support_size=10, holdout_fraction=0.2,
    )
    assert store.stats["tasks"] == store.stats["input_tasks"] == 120 and store.stats["dropped_too_small"] == 0
    assert store.train.num_rows + store.cold_start.num_rows == table.num_rows
    assert 10 < store.cold_start.num_tasks < 40
    labels = np.concatenate([store.train.column("label"), store.cold_start.column("label")])
    assert labels.mean() == pytest.approx(np.mean(table.column("rating").to_numpy() >= 4))


def test_format_detection_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="MovieLens directory .*nowhere does not exist"):
        read_movielens(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"none of u.data .ml-100k., ratings.dat .ml-1m, ml-10m. and ratings.csv"):
        read_movielens(tmp_path / "empty")
    write(tmp_path / "download" / "ml-1m", ML1M)
    with pytest.raises(FileNotFoundError, match=r"did you mean .*download/ml-1m\?"):
        read_movielens(tmp_path / "download")
    write(tmp_path / "partial", {"ratings.dat": ML1M["ratings.dat"], "movies.dat": ML1M["movies.dat"]})
    with pytest.raises(FileNotFoundError, match=r"partial/users.dat is missing: an ml-1m directory has .* \(ml-10m: "):
        read_movielens(tmp_path / "partial")
    write(tmp_path / "both", {**ML1M, **ML100K})
    with pytest.raises(ValueError, match=r"holds u.data \(ml-100k\) and ratings.dat \(ml-1m\)"):
        read_movielens(tmp_path / "both")
    write(tmp_path / "ratings-only", {"ratings.csv": ML_LATEST["ratings.csv"]})
    with pytest.raises(FileNotFoundError, match=r"movies.csv is missing: an ml-latest directory has"):
        read_movielens(tmp_path / "ratings-only")


def _replace_line(text: str, line: int, new: str) -> str:
    lines = text.splitlines()
    lines[line - 1] = new
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "files, name, line, bad, message",
    [
        (ML1M, "ratings.dat", 3, "1::2::4", r"expected 4 '::'-separated fields \(user_id item_id rating "
                                             r"timestamp\), got 3: '1::2::4'"),
        (ML1M, "ratings.dat", 2, "2::2::three::205", r"field 3 \(rating\) is 'three', expected an integer"),
        (ML1M, "users.dat", 2, "2::F::50::3", "expected 5 '::'-separated fields"),
        (ML1M, "users.dat", 2, "1::F::50::3::94043", "user_id 1 appears more than once"),
        (ML1M, "movies.dat", 2, "2::Café au lait (1993)", "expected 3 '::'-separated fields"),
        (ML100K, "u.data", 4, "2\t1\t1", r"expected 4 '\\t'-separated fields"),
        (ML100K, "u.data", 1, "1 1 5 100", "got 1"),  # spaces, not tabs
        (ML100K, "u.data", 5, "", "got 1: ''"),  # an empty line
        (ML100K, "u.user", 1, "x|24|M|technician|85711", r"field 1 \(user_id\) is 'x'"),
        (ML100K, "u.item", 3, "3|unknown||||1|0", r"expected 24 '\|'-separated fields, got 7"),
        (ML100K, "u.item", 2, "1|Copy (1995)|||x" + "|0" * 19, "item_id 1 appears more"),
        (ML_LATEST, "ratings.csv", 3, "1,2,4.0", r"expected 4 comma-separated fields \(userId movieId "
                                                 r"rating timestamp\), got 3: '1,2,4.0'"),
        (ML_LATEST, "ratings.csv", 4, "2,1,one,201", r"field 3 \(rating\) is 'one', expected a number"),
        (ML_LATEST, "ratings.csv", 1, "user_id,item_id,rating,timestamp", "the header is 'user_id,item_id,"),
        (ML_LATEST, "movies.csv", 4, "1,Again (1990),Drama", "item_id 1 appears more than once"),
        (ML_LATEST, "ratings.csv", 5, "2,3,,203", r"field 3 \(rating\) is '', expected a number"),
        (ML_LATEST, "ratings.csv", 2, "NA,1,5.0,100", r"field 1 \(userId\) is 'NA', expected an integer"),
        (ML_LATEST, "ratings.csv", 3, "1_0,2,4.0,110", r"field 1 \(userId\) is '1_0'"),
        (ML_LATEST, "ratings.csv", 6, "1,3,nan,120", r"rating 'nan' is not within 0.5-5"),
        (ML_LATEST, "ratings.csv", 4, "2,1,7.5,201", r"rating '7.5' is not within 0.5-5"),
    ],
    ids=["ml1m-fields", "ml1m-rating", "ml1m-user-fields", "ml1m-duplicate-user", "ml1m-movie-fields",
         "ml100k-fields", "ml100k-spaces", "ml100k-empty-line", "ml100k-user-id", "ml100k-item-fields",
         "ml100k-duplicate-item", "csv-fields", "csv-rating", "csv-header", "csv-duplicate-item", "csv-empty",
         "csv-na", "csv-underscore", "csv-nan", "csv-out-of-range"],
)
def test_malformed_line_is_named_with_file_and_line(
    tmp_path: Path, files: dict[str, str], name: str, line: int, bad: str, message: str
) -> None:
    directory = write(tmp_path / "ml", {**files, name: _replace_line(files[name], line, bad)})
    with pytest.raises(ValueError, match=rf"{directory / name}:{line}: .*{message}"):
        read_movielens(directory)


def test_csv_errors_count_lines_as_the_file_has_them(tmp_path: Path) -> None:
    """Blank lines, a title over two lines and bytes that are not UTF-8 do not shift the line named."""
    ratings = ML_LATEST["ratings.csv"].splitlines()
    with_blanks = "\n".join([*ratings[:2], "", *ratings[2:4], "", "2,1,one,201", *ratings[5:]]) + "\n"
    directory = write(tmp_path / "blank", {**ML_LATEST, "ratings.csv": with_blanks})
    with pytest.raises(ValueError, match=r"ratings.csv:7: malformed line: field 3 \(rating\) is 'one'"):
        read_movielens(directory)
    movies = ML_LATEST["movies.csv"] + '4,"Two\nLines (2000)",Drama\n\n1,Again (1990),Drama\n'
    directory = write(tmp_path / "duplicate", {**ML_LATEST, "movies.csv": movies})
    with pytest.raises(ValueError, match=r"movies.csv:8: item_id 1 appears more than once"):
        read_movielens(directory)
    directory = write(tmp_path / "latin1", ML_LATEST)
    (directory / "movies.csv").write_bytes(ML_LATEST["movies.csv"].encode("latin-1"))
    with pytest.raises(ValueError, match=r"movies.csv:3: not UTF-8"):
        read_movielens(directory)


def test_empty_ratings_file_is_an_error(tmp_path: Path) -> None:
    directory = write(tmp_path / "ml", {**ML1M, "ratings.dat": ""})
    with pytest.raises(ValueError, match=rf"{directory / 'ratings.dat'} is empty"):
        read_movielens(directory)


def side_table_fixture(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Clicks (parquet, user 9 without a users row), users (CSV), items (parquet)."""
    clicks = pa.table({
        "user_id": [1, 2, 1, 9, 2, 1, 2, 9],
        "item_id": ["a", "b", "c", "a", "a", "b", "c", "b"],
        "clicked": [1, 0, 0, 1, 1, 1, 0, 0],
        "ts": [3, 1, 1, 5, 2, 2, 3, 4],
    })  # fmt: skip
    pq.write_table(clicks, tmp_path / "clicks.parquet")
    (tmp_path / "users.csv").write_text("user_id,country,age\n1,fr,31\n2,jp,45\n3,us,20\n")
    items = pa.table({"item_id": ["a", "b", "c"], "brand": ["x", "y", "x"], "price": [1.5, 2.0, 9.0]})
    pq.write_table(items, tmp_path / "items.parquet")
    return tmp_path / "clicks.parquet", tmp_path / "users.csv", tmp_path / "items.parquet"


def test_parquet_interactions_with_side_tables(tmp_path: Path) -> None:
    clicks, users, items = side_table_fixture(tmp_path)
    with pytest.warns(UserWarning, match=r"users.csv: 2 of 8 interaction rows \(1 user_id values, e.g. 9\) have no row"):
        table = read_interactions(clicks, {"user_id": users, "item_id": items})
    assert table.column_names == ["user_id", "item_id", "clicked", "ts", "country", "age", "brand", "price"]
    assert table.select(["user_id", "item_id", "clicked", "ts"]).equals(pq.read_table(clicks))  # order kept
    assert table.column("country").to_pylist() == ["fr", "jp", "fr", None, "jp", "fr", "jp", None]
    assert table.column("price").to_pylist() == [1.5, 2.0, 9.0, 1.5, 1.5, 2.0, 9.0, 2.0]

    with pytest.warns(UserWarning, match="have no row in it"):
        store = build_task_store(
        clicks, tmp_path / "store", task_key="user_id",
        categorical=["user_id", "item_id", "country", "brand"],
        dense=["age", "price"], num_embeddings=dict.fromkeys(["user_id", "item_id", "country", "brand"], 10),
        label="clicked", time_column="ts", support_size=1, min_rows_per_task=2, holdout_fraction=0.0,
        side_tables={"user_id": str(users), "item_id": items},
        )
    assert store.stats["config"]["side_tables"] == {"user_id": str(users), "item_id": str(items)}
    assert (store.train.num_tasks, store.train.num_rows) == (3, 8)
    # user 1's clicks by time: c (ts 1), b (ts 2), a (ts 3); user 9 has no users row: age 0.
    assert store.train.column("price")[:3].tolist() == [9.0, 2.0, 1.5]
    assert store.train.column("label")[:3].tolist() == [0.0, 1.0, 1.0]
    assert store.train.column("age").tolist() == [31.0] * 3 + [45.0] * 3 + [0.0] * 2


def test_side_table_errors(tmp_path: Path) -> None:
    clicks, users, items = side_table_fixture(tmp_path)
    with pytest.raises(FileNotFoundError, match="side table .*missing.csv does not exist"):
        read_interactions(clicks, {"user_id": tmp_path / "missing.csv"})
    with pytest.raises(ValueError, match=r"no key column 'user_id' to join on in side table .*items.parquet"):
        read_interactions(clicks, {"user_id": items})
    with pytest.raises(ValueError, match=r"no key column 'item' to join on in the interactions"):
        read_interactions(clicks, {"item": items})
    pq.write_table(pa.table({"item_id": ["a", "b", "a"], "brand": ["x", "y", "z"]}), tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match="item_id 'a' appears more than once"):
        read_interactions(clicks, {"item_id": tmp_path / "dup.parquet"})
    with pytest.raises(ValueError, match=r"both have column\(s\) \['clicked'\]"):
        read_interactions(clicks, {"user_id": pa.table({"user_id": [1], "clicked": [0]})})
    with pytest.raises(TypeError, match="join key 'user_id' is int64 in the interactions but string .*convert one"):
        read_interactions(clicks, {"user_id": pa.table({"user_id": ["1"], "x": [0]})})
    narrow = pa.table({"user_id": pa.array([1], pa.int32()), "x": [7]})
    with pytest.warns(UserWarning, match=r"side table: 5 of 8 interaction rows \(2 user_id values, e.g. 2\) have no"):
        joined = read_interactions(clicks, {"user_id": narrow})
    assert joined.column("x").to_pylist()[:2] == [7, None]  # integer keys of other widths match
    (tmp_path / "bad.csv").write_text("user_id,country\n1,fr\n2,jp,extra\n")
    with pytest.raises(ValueError, match=r"bad.csv: .*Expected 2 columns, got 3"):
        read_interactions(clicks, {"user_id": tmp_path / "bad.csv"})


def test_side_tables_as_users_write_them(tmp_path: Path) -> None:
    # Keys written as text ("007") match a CSV side table's keys as written; a pandas Categorical
    # (dictionary) column, large_string keys and upper-case suffixes are read as their values.
    clicks = pa.table({"user": ["007", "7", "007"], "item": pa.array(["a", "b", "a"], pa.large_string()),
                       "kind": pa.array(["x", "y", "x"]).dictionary_encode()})
    (tmp_path / "users.CSV").write_text("user,age\n007,30\n7,40\n")
    pq.write_table(pa.table({"item": ["a", "b"], "price": [1.0, 2.0]}), tmp_path / "items.Parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key matches
        joined = read_interactions(clicks, {"user": tmp_path / "users.CSV", "item": tmp_path / "items.Parquet"})
    assert joined.column("age").to_pylist() == [30, 40, 30]
    assert joined.column("price").to_pylist() == [1.0, 2.0, 1.0]
    store = build_task_store(
        joined.append_column("clicked", pa.array([1, 0, 1])).append_column("ts", pa.array([1, 2, 3])),
        tmp_path / "store", task_key="user", categorical=["user", "item", "kind"], dense=["age", "price"],
        num_embeddings=dict.fromkeys(["user", "item", "kind"], 16), label="clicked", time_column="ts",
        support_size=1, min_rows_per_task=1,
        holdout_fraction=0.0,
    )
    assert store.stats["categorical"]["kind"]["distinct_values"] == 2
    floats = pa.table({"user": [1.0, None, 2.0], "clicked": [1, 0, 1], "ts": [1, 2, 3]})
    with pytest.raises(TypeError, match=r"column 'user' has type double.*\.astype\('Int64'\)"):
        build_task_store(floats, None, task_key="user", categorical=["user"], num_embeddings={"user": 16}, label="clicked",
                         time_column="ts", support_size=1, min_rows_per_task=1, holdout_fraction=0.0)


def test_task_datamodule_on_a_movielens_directory(tmp_path: Path) -> None:
    directory = write_fake_movielens(tmp_path / "ml-100k", "ml-100k", num_users=80, num_items=60)
    settings = dict(
        store_dir=str(tmp_path / "store"), interactions=str(directory),
        categorical=("user_id", "item_id", "genres"),
        dense=tuple(genre_column(g) for g in MOVIELENS_GENRES), label=None, label_rule="rating >= 4",
        support_size=10, holdout_fraction=0.2, tasks_per_batch=4, num_embeddings=512,
    )
    data = TaskDataModule(**settings)
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert isinstance(batch, TaskBatch) and batch.support_sizes.tolist() == [10] * 4
    assert batch.dense_features.shape[1] == data.num_dense_features == len(MOVIELENS_GENRES)
    TaskDataModule(**settings).prepare_data()  # same settings: the store is reused
    other = write_fake_movielens(tmp_path / "other", "ml-1m", num_users=80, num_items=60)
    with pytest.raises(ValueError, match="source: store has .*ml-100k.*config asks .*other"):
        TaskDataModule(**{**settings, "interactions": str(other)}).prepare_data()
    users = tmp_path / "extra_users.csv"
    users.write_text("user_id,segment\n1,a\n2,b\n")
    with pytest.raises(ValueError, match="side_tables: store has None, config asks"):
        TaskDataModule(**{**settings, "side_tables": {"user_id": str(users)}}).prepare_data()
    absent = {**settings, "interactions": str(tmp_path / "ml-1m"), "store_dir": str(tmp_path / "store2")}
    with pytest.raises(FileNotFoundError, match="ml-1m does not exist .* or a MovieLens directory"):
        TaskDataModule(**absent).prepare_data()  # the config's default path, not overridden


def test_task_datamodule_sizes_each_table_by_name(tmp_path: Path) -> None:
    directory = write_fake_movielens(tmp_path / "ml-latest", "ml-latest", num_users=40, num_items=30)
    sizes = {"user_id": 64, "item_id": 5000, "genres": 512}
    settings = dict(
        store_dir=str(tmp_path / "store"), interactions=str(directory),
        categorical=["user_id", "item_id", "genres"], dense=[], label=None, label_rule="rating >= 4",
        support_size=5, holdout_fraction=0.2, tasks_per_batch=4, num_embeddings=sizes,
    )
    data = TaskDataModule(**settings)
    assert {t.feature_names[0]: t.num_embeddings for t in data.tables()} == sizes
    data.prepare_data()
    assert TaskStore.load(tmp_path / "store").stats["config"]["num_embeddings"] == sizes
    with pytest.raises(ValueError, match=r"missing \['genres'\], not categorical \['title'\]"):
        TaskDataModule(**{**settings, "num_embeddings": {"user_id": 64, "item_id": 5000, "title": 9}})
