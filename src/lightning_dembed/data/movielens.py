"""MovieLens as downloaded, and any interactions table with side-feature tables, as one Arrow table.

`read_movielens` reads an unzipped MovieLens directory (the format is told from its files: ml-100k,
ml-1m, ml-10m, or the CSV files of ml-latest-small, ml-latest, ml-20m, ml-25m and ml-32m) into one row per
rating, the user's (where the data set has them) and the movie's features joined on;
`read_interactions` does the same for a parquet/CSV interactions file with side tables joined by
key. Both feed `build_task_store` (which calls `read_interactions` for a directory or
``side_tables``), e.g. users as tasks with ``label_rule="rating >= 4"`` and ``time_column="timestamp"``.

A malformed line stops reading with the file and the 1-based line at fault
(``ratings.dat:7: malformed line: expected 4 '::'-separated fields (...), got 3: '1::2::5'``);
a missing file is named with the format that needs it.
"""

from __future__ import annotations

import csv
import itertools
import re
import warnings
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.parquet as pq

__all__ = [
    "MOVIELENS_GENRES",
    "MovieLensFormat",
    "genre_column",
    "movielens_format",
    "read_interactions",
    "read_movielens",
    "read_table",
    "write_fake_movielens",
]

MovieLensFormat = Literal["ml-100k", "ml-1m", "ml-10m", "ml-latest"]
TableSource = Union[str, Path, pa.Table]

# The genres both formats share (ml-100k also has "unknown"), in their documented order; each
# becomes a 0/1 column genre_<name> (lower case, non-letters as "_"): dense features for a model.
MOVIELENS_GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
_ML100K_GENRES = ("unknown", *MOVIELENS_GENRES)  # u.item's 19 flag columns, in u.genre's order

# Files of each format: (file name, separator, field names); the ratings file comes first.
_FILES: dict[str, tuple[tuple[str, str, tuple[str, ...]], ...]] = {
    "ml-100k": (
        ("u.data", "\t", ("user_id", "item_id", "rating", "timestamp")),
        ("u.user", "|", ("user_id", "age", "gender", "occupation", "zip")),
        ("u.item", "|", ("item_id", "title", "release_date", "video_release_date", "imdb_url",
                         *_ML100K_GENRES)),
    ),
    "ml-1m": (
        ("ratings.dat", "::", ("user_id", "item_id", "rating", "timestamp")),
        ("users.dat", "::", ("user_id", "gender", "age", "occupation", "zip")),
        ("movies.dat", "::", ("item_id", "title", "genres")),
    ),
    # ml-10m (unzipped as ml-10M100K/): ml-1m's layout with half-star ratings, no user file, and a
    # tags.dat (not read) that tells it from an ml-1m directory missing its users.dat.
    "ml-10m": (
        ("ratings.dat", "::", ("user_id", "item_id", "rating", "timestamp")),
        ("movies.dat", "::", ("item_id", "title", "genres")),
        ("tags.dat", "::", ("user_id", "item_id", "tag", "timestamp")),
    ),
}
# The CSV format GroupLens has shipped since ml-20m (ml-latest-small, ml-latest, ml-25m, ml-32m...):
# UTF-8 with a header, quoted titles, half-star ratings, no user file. Columns as read, then named as above.
_CSV_FILES: dict[str, dict[str, pa.DataType]] = {
    "ratings.csv": {
        "userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()
    },
    "movies.csv": {"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()},
}
_CSV_NAMES = {"userId": "user_id", "movieId": "item_id"}
# How a directory's format is told: by its ratings file (then ml-1m's ratings.dat with tags.dat and
# no users.dat is ml-10m's).
_RATINGS_FILES = {"ml-100k": "u.data", "ml-1m": "ratings.dat", "ml-latest": "ratings.csv"}
_FORMATS: tuple[MovieLensFormat, ...] = ("ml-100k", "ml-1m", "ml-10m", "ml-latest")
_INTEGER_FIELDS = {"user_id", "item_id", "rating", "timestamp", "age", *_ML100K_GENRES}
_HALF_STARS = frozenset({"rating"})  # ml-10m's ratings: 0.5-5 in half stars
_ML1M_INTEGER_FIELDS = {"occupation"}  # ml-1m codes occupations 0-20; ml-100k names them


def genre_column(genre: str) -> str:
    """A genre's 0/1 column: lower case, apostrophes dropped, other non-letters as ``_``.

    ``"Children's"`` -> ``"genre_childrens"``, ``"Sci-Fi"`` -> ``"genre_sci_fi"``.
    """
    return "genre_" + re.sub(r"[^a-z]+", "_", genre.lower().replace("'", "")).strip("_")


def movielens_format(directory: Union[str, Path]) -> MovieLensFormat:
    """The MovieLens format of a directory: ``"ml-100k"`` (has ``u.data``), ``"ml-1m"`` (``ratings.dat``
    and ``users.dat``), ``"ml-10m"`` (``ratings.dat`` and ``tags.dat``, no ``users.dat``) or
    ``"ml-latest"`` (``ratings.csv``: ml-latest-small, ml-latest, ml-20m, ml-25m, ml-32m).

    Raises:
        FileNotFoundError: the directory does not exist, holds neither ratings file, or lacks a
            file its format needs (the message names it).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"MovieLens directory {directory} does not exist")
    found = [fmt for fmt, ratings in _RATINGS_FILES.items() if (directory / ratings).is_file()]
    if not found:
        # Unzipping ml-1m.zip makes an ml-1m/ folder: name it when the user points at its parent.
        nested = sorted(
            str(d) for d in directory.iterdir()
            if d.is_dir() and any((d / ratings).is_file() for ratings in _RATINGS_FILES.values())
        )
        hint = f"; did you mean {' or '.join(nested)}?" if nested else ""
        raise FileNotFoundError(
            f"{directory} is not a MovieLens directory: it has none of u.data (ml-100k), ratings.dat "
            f"(ml-1m, ml-10m) and ratings.csv (ml-latest, ml-25m, ml-32m){hint}"
        )
    if len(found) > 1:
        held = " and ".join(f"{_RATINGS_FILES[fmt]} ({fmt})" for fmt in found)
        raise ValueError(f"{directory} holds {held}; point at one data set")
    fmt = found[0]
    if fmt == "ml-1m" and not (directory / "users.dat").is_file() and (directory / "tags.dat").is_file():
        fmt = "ml-10m"
    names = list(_CSV_FILES) if fmt == "ml-latest" else [f[0] for f in _FILES[fmt]]
    for name in names[1:]:
        if not (directory / name).is_file():
            expected = ", ".join(names)
            also = " (ml-10m: ratings.dat, movies.dat, tags.dat)" if fmt == "ml-1m" else ""
            raise FileNotFoundError(f"{directory / name} is missing: an {fmt} directory has {expected}{also}")
    return fmt  # type: ignore[return-value]


# How a numeric field of the older formats is checked and converted: (pattern, what it must be, type).
_INTEGER_FIELD = (r"^\s*[+-]?\d+\s*$", "an integer", pa.int64())
_HALF_STAR_FIELD = (r"^\s*(0\.5|[1-4](\.[05])?|5(\.0)?)\s*$", "0.5-5 in half stars", pa.float64())


def _read_fields(
    path: Path, separator: str, names: Sequence[str], integers: set[str], half_stars: frozenset[str] = frozenset()
) -> pa.Table:
    """A separated text file without header (latin-1) as a table; the first bad line is an error.

    Each line is read as one string by Arrow's CSV reader (no quoting, empty lines kept so that
    row ``i`` is line ``i + 1``), then split on ``separator`` (``::`` included) and converted,
    all vectorised; a line with another field count, a non-integer where an integer belongs, or
    (``half_stars``) a rating that is not 0.5-5 in halves, raises with ``path:line``.
    """
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty")
    lines = pyarrow.csv.read_csv(
        path,
        read_options=pyarrow.csv.ReadOptions(column_names=["line"], encoding="latin-1"),
        # \x1f (ASCII unit separator) is in no MovieLens file: each line stays one field.
        parse_options=pyarrow.csv.ParseOptions(delimiter="\x1f", quote_char=False, ignore_empty_lines=False),
        convert_options=pyarrow.csv.ConvertOptions(column_types={"line": pa.string()}),
    ).column("line").combine_chunks()
    fields = pc.split_pattern(lines, separator)
    counts = pc.list_value_length(fields).to_numpy()
    bad = np.flatnonzero(counts != len(names))
    if bad.size:
        i = int(bad[0])
        described = f"{separator!r}-separated fields" + (f" ({' '.join(names)})" if len(names) <= 6 else "")
        raise ValueError(
            f"{path}:{i + 1}: malformed line: expected {len(names)} {described}, got {counts[i]}: "
            f"{lines[i].as_py()!r}"
        )
    columns = {}
    for j, name in enumerate(names):
        column = pc.list_element(fields, j)
        parsed = _HALF_STAR_FIELD if name in half_stars else _INTEGER_FIELD if name in integers else None
        if parsed is not None:
            pattern, expected, data_type = parsed
            wrong = np.flatnonzero(~pc.match_substring_regex(column, pattern).to_numpy(zero_copy_only=False))
            if wrong.size:
                i = int(wrong[0])
                raise ValueError(
                    f"{path}:{i + 1}: malformed line: field {j + 1} ({name}) is {column[i].as_py()!r}, "
                    f"expected {expected}: {lines[i].as_py()!r}"
                )
            column = pc.utf8_trim_whitespace(column).cast(data_type)
        columns[name] = column
    return pa.table(columns)


def _read_csv(path: Path) -> pa.Table:
    """A MovieLens CSV file (``_CSV_FILES``) with its header checked; the first bad line is an error."""
    types = _CSV_FILES[path.name]
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty")
    # No null markers: an empty or "NA" field is an error, as it is in the older formats.
    options = pyarrow.csv.ConvertOptions(column_types=types, null_values=[], strings_can_be_null=False)
    try:
        table = pyarrow.csv.read_csv(path, convert_options=options)
    except pa.ArrowInvalid as error:  # Arrow's message has the bad row but not its line: find it
        raise ValueError(_first_bad_csv_line(path, types) or f"{path}: {error}") from error
    if table.column_names != list(types):
        raise ValueError(
            f"{path}:1: the header is {','.join(table.column_names)!r}; a MovieLens {path.name} starts with "
            f"{','.join(types)!r}"
        )
    if "rating" in types:
        rating = table.column("rating").to_numpy()
        outside = np.flatnonzero(~((rating >= 0.5) & (rating <= 5.0)))  # NaN is outside too
        if outside.size:
            line, row = _csv_line(path, int(outside[0]))
            rating_field = row[list(types).index("rating")]
            raise ValueError(f"{path}:{line}: rating {rating_field!r} is not within 0.5-5: {','.join(row)!r}")
    return table.rename_columns([_CSV_NAMES.get(name, name) for name in table.column_names])


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line, fields)`` of each row after the header, blank lines skipped as Arrow skips them."""
    with path.open(newline="", encoding="utf-8", errors="replace") as lines:
        rows = csv.reader(lines)
        next(rows, None)
        for row in rows:
            if row:
                yield rows.line_num, row


def _csv_line(path: Path, index: int) -> tuple[int, list[str]]:
    """The line and fields of the ``index``-th row (0-based, after the header) of a CSV file."""
    return next(itertools.islice(_csv_rows(path), index, None))


# What Arrow reads as an integer or a float64 (``nan`` and ``inf`` included).
_INTEGER = re.compile(r"\s*[+-]?\d+\s*")
_FLOAT = re.compile(r"\s*[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|nan|inf|infinity)\s*", re.IGNORECASE)


def _first_bad_csv_line(path: Path, types: Mapping[str, pa.DataType]) -> Optional[str]:
    """``path:line: why`` for the first line Arrow cannot read as ``types``: not UTF-8, or a bad field."""
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return f"{path}:{number}: not UTF-8, which MovieLens' CSV files are: {raw!r}"
    for line, row in _csv_rows(path):
        if len(row) != len(types):
            return (
                f"{path}:{line}: malformed line: expected {len(types)} comma-separated fields "
                f"({' '.join(types)}), got {len(row)}: {','.join(row)!r}"
            )
        for j, ((name, kind), value) in enumerate(zip(types.items(), row)):
            pattern = _INTEGER if pa.types.is_integer(kind) else _FLOAT if pa.types.is_floating(kind) else None
            if pattern is not None and not pattern.fullmatch(value):
                return (
                    f"{path}:{line}: malformed line: field {j + 1} ({name}) is {value!r}, expected "
                    f"{'an integer' if pattern is _INTEGER else 'a number'}: {','.join(row)!r}"
                )
    return None


def _unique_key(table: pa.Table, key: str, where: str, line_of: Optional[Callable[[int], int]]) -> None:
    """A side table must hold each key once, or the join would repeat interactions."""
    keys = table.column(key).combine_chunks()
    if pc.count_distinct(keys).as_py() == len(keys):
        return
    codes = pc.index_in(keys, value_set=pc.unique(keys)).to_numpy(zero_copy_only=False)
    repeated = np.ones(len(keys), dtype=bool)
    repeated[np.unique(codes, return_index=True)[1]] = False
    i = int(np.flatnonzero(repeated)[0])
    at = where if line_of is None else f"{where}:{line_of(i)}"
    raise ValueError(
        f"{at}: {key} {keys[i].as_py()!r} appears more than once; a side table holds one row per {key}"
    )


def read_movielens(directory: Union[str, Path]) -> pa.Table:
    """One row per rating of a MovieLens directory, with the user's and the movie's features.

    Columns (every format): ``user_id``, ``item_id``, ``timestamp`` (seconds), int64, and
    ``rating`` (1-5, int64; 0.5-5 in half stars, float64, in ``ml-10m`` and ``ml-latest``); the movie's ``title``,
    ``year`` (from the title, null when it has none), ``genres`` (``|``-joined names, e.g.
    ``"Animation|Children's|Comedy"``) and one float32 0/1 column per genre of `MOVIELENS_GENRES`
    (``genre_action`` ... ``genre_western``, see `genre_column`; the genres only newer data sets
    list, such as ``IMAX``, are in ``genres`` alone). ml-100k and ml-1m also have the user's
    ``gender`` (``"M"``/``"F"``), ``age`` (years in ml-100k, an age-group code in ml-1m),
    ``occupation`` (a name in ml-100k, a code 0-20 in ml-1m) and ``zip``, after ``timestamp``;
    ``ml-10m`` and ``ml-latest`` have no user features. Rows are in the ratings file's order; a rating whose user
    or movie is missing from its file has nulls there.

    Movie ids of the newer data sets are sparse (up to 193609 in ml-latest-small): size the
    ``item_id`` table above the largest one (`build_task_store` warns when ids share a row).

    Example::

        table = read_movielens("data/ml-1m")
        store = build_task_store(table, "stores/ml-1m", task_key="user_id", label_rule="rating >= 4", ...)
    """
    directory = Path(directory)
    fmt = movielens_format(directory)
    if fmt == "ml-latest":
        ratings, items = (_read_csv(directory / name) for name in _CSV_FILES)
        movies = directory / "movies.csv"
        _unique_key(items, "item_id", str(movies), line_of=lambda i: _csv_line(movies, i)[0])
        return _left_join(ratings, _item_features(items, items.column("genres")), "item_id")
    if fmt == "ml-10m":
        (ratings_file, separator, ratings_names), (items_file, _, items_names), _ = _FILES[fmt]
        ratings = _read_fields(directory / ratings_file, separator, ratings_names, _INTEGER_FIELDS, _HALF_STARS)
        items = _read_fields(directory / items_file, separator, items_names, _INTEGER_FIELDS)
        _unique_key(items, "item_id", str(directory / items_file), line_of=lambda i: i + 1)
        return _left_join(ratings, _item_features(items, items.column("genres")), "item_id")
    integers = _INTEGER_FIELDS | (_ML1M_INTEGER_FIELDS if fmt == "ml-1m" else set())
    _, (users_file, *_), (items_file, *_) = _FILES[fmt]
    ratings, users, items = (
        _read_fields(directory / name, separator, names, integers) for name, separator, names in _FILES[fmt]
    )
    _unique_key(users, "user_id", str(directory / users_file), line_of=lambda i: i + 1)
    _unique_key(items, "item_id", str(directory / items_file), line_of=lambda i: i + 1)

    if fmt == "ml-100k":
        flags = [items.column(g) for g in _ML100K_GENRES]
        names = np.array(_ML100K_GENRES, dtype=object)
        marked = np.stack([f.to_numpy() for f in flags], axis=1) != 0
        genres = pa.array(["|".join(names[row]) for row in marked], pa.string())
    else:
        genres = items.column("genres")
    user_features = users.select(["user_id", "gender", "age", "occupation", "zip"])
    return _left_join(_left_join(ratings, user_features, "user_id"), _item_features(items, genres), "item_id")


def _item_features(items: pa.Table, genres: pa.Array) -> pa.Table:
    """``item_id``, ``title``, the ``year`` in the title, ``genres`` and a 0/1 column per known genre."""
    item_features = {"item_id": items.column("item_id"), "title": items.column("title")}
    year = pc.struct_field(pc.extract_regex(items.column("title"), r"\((?P<year>\d{4})\)\s*$"), "year")
    item_features["year"] = year.cast(pa.int64())
    item_features["genres"] = genres
    for genre in MOVIELENS_GENRES:
        spelled = "Children('s)?" if genre == "Children's" else re.escape(genre)  # ml-latest: "Children"
        listed = pc.match_substring_regex(genres, rf"(^|\|){spelled}(\||$)")
        item_features[genre_column(genre)] = listed.cast(pa.float32())
    return pa.table(item_features)


def _left_join(table: pa.Table, side: pa.Table, key: str) -> pa.Table:
    """``table`` with ``side``'s columns for each row's ``key`` (nulls when absent), rows in order."""
    # Arrow's hash join does not keep row order: the time sort of build_task_store breaks ties by it.
    order = "__row__"
    joined = table.append_column(order, pa.array(np.arange(table.num_rows))).join(
        side, keys=key, join_type="left outer", use_threads=False
    )
    joined = joined.sort_by(order).drop_columns([order])
    return joined.select([*table.column_names, *(c for c in side.column_names if c != key)])


def is_csv(source: TableSource) -> bool:
    """Whether ``source`` names a CSV file (by its suffix, in any case)."""
    return not isinstance(source, pa.Table) and Path(source).suffix.lower() == ".csv"


def decode_dictionaries(table: pa.Table) -> pa.Table:
    """``table`` with its dictionary-encoded columns (pandas' Categorical) as their values."""
    for i, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type):
            table = table.set_column(i, field.name, table.column(i).cast(field.type.value_type))
    return table


def read_table(source: TableSource, what: str, text_columns: Sequence[str] = ()) -> pa.Table:
    """A parquet or CSV file (or a table as is), dictionary columns decoded; errors name ``what`` and the file.

    ``text_columns`` of a CSV file are read as written ("007" stays "007"), not as numbers.
    """
    if isinstance(source, pa.Table):
        return decode_dictionaries(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.suffix.lower() == ".parquet":
        return decode_dictionaries(pq.read_table(path))
    if is_csv(path):
        options = pyarrow.csv.ConvertOptions(column_types=dict.fromkeys(text_columns, pa.string()))
        try:
            return pyarrow.csv.read_csv(path, convert_options=options)
        except pa.ArrowInvalid as error:  # Arrow's message has the bad row, not the file
            raise ValueError(f"{path}: {error}") from error
    raise ValueError(f"{what} {path} must be a .parquet or .csv file (or a pyarrow.Table)")


def _is_text(data_type: pa.DataType) -> bool:
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)


def _warn_of_unmatched_keys(table: pa.Table, side: pa.Table, key: str, where: str) -> None:
    """Rows whose key the side table lacks get its columns missing: say how many."""
    unmatched = pc.invert(pc.is_in(table.column(key), value_set=side.column(key).combine_chunks()))
    rows = int(pc.sum(unmatched).as_py() or 0)
    if not rows:
        return
    keys = pc.unique(table.column(key).filter(unmatched).combine_chunks())
    columns = [c for c in side.column_names if c != key]
    warnings.warn(
        f"{where}: {rows} of {table.num_rows} interaction rows ({len(keys)} {key} values, e.g. "
        f"{keys[0].as_py()!r}) have no row in it, so their {columns} are missing (a task store reads them "
        "as 0 or '')",
        stacklevel=3,
    )


def read_interactions(
    source: TableSource, side_tables: Optional[Mapping[str, TableSource]] = None
) -> pa.Table:
    """Interactions with side features joined on: ``source``'s rows, each side table's columns beside.

    Args:
        source: a MovieLens directory (`read_movielens`), a ``.parquet`` or ``.csv`` file, or a
            `pyarrow.Table`.
        side_tables: key column -> table (file or `pyarrow.Table`) with one row per key, e.g.
            ``{"user_id": "users.parquet", "item_id": "items.csv"}``; joined left in turn (rows
            without a match get nulls, which `build_task_store` reads as 0 or ""). The key must be
            a column of the interactions and of the side table; other column names must not clash.

    Returns:
        The rows of ``source`` in their order, with the side tables' columns appended.

    Example::

        table = read_interactions("clicks.parquet", {"user_id": "users.csv", "item_id": "items.parquet"})
    """
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        table = read_movielens(source)
    else:
        table = read_table(source, "interactions file")
    for key, side_source in (side_tables or {}).items():
        where = "side table" if isinstance(side_source, pa.Table) else f"side table {side_source}"
        # Text keys in the interactions (ids such as "007"): a CSV side table's keys as written too.
        text_key = key in table.column_names and _is_text(table.column(key).type)
        side = read_table(side_source, "side table", text_columns=[key] if text_key else ())
        for name, columns in (("the interactions", table.column_names), (where, side.column_names)):
            if key not in columns:
                raise ValueError(f"no key column {key!r} to join on in {name}; its columns: {columns}")
        clashes = sorted((set(side.column_names) - {key}) & set(table.column_names))
        if clashes:
            raise ValueError(
                f"{where} and the interactions both have column(s) {clashes}; rename them in one"
            )
        left, right = table.column(key).type, side.column(key).type
        if left != right:
            if not (pa.types.is_integer(left) and pa.types.is_integer(right)) and not (_is_text(left) and _is_text(right)):
                raise TypeError(
                    f"join key {key!r} is {left} in the interactions but {right} in {where}: convert one to the "
                    "other's type first (ids written as text, such as '007', match only text)"
                )
            side = side.set_column(side.column_names.index(key), key, side.column(key).cast(left))
        if side.column(key).null_count:
            raise ValueError(f"{where} has {side.column(key).null_count} missing {key!r} values")
        _unique_key(side, key, where, line_of=None)
        _warn_of_unmatched_keys(table, side, key, where)
        table = _left_join(table, side, key)
    return table


def write_fake_movielens(
    directory: Union[str, Path],
    format: MovieLensFormat = "ml-1m",
    num_users: int = 300,
    num_items: int = 200,
    min_ratings: int = 20,
    max_ratings: int = 60,
    seed: int = 0,
) -> Path:
    """Write made-up ratings in the exact files of ``format``, for tests and demos; returns ``directory``.

    Users rate ``min_ratings..max_ratings`` movies each (at least 20, as in MovieLens), popular
    movies more often; a rating follows the user's own taste for the movie's genres plus the
    movie's quality, so adapting to a user's first ratings pays. Titles carry a year and some
    latin-1 characters (``Café``), as the real ``u.item`` and ``movies.dat`` do; ``"ml-10m"``
    writes half-star ratings, no user file and a ``tags.dat``; ``"ml-latest"`` writes UTF-8 CSV
    files with headers, half-star ratings and quoted titles that hold a comma.
    """
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {list(_FORMATS)}, got {format!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    num_genres = len(MOVIELENS_GENRES)
    item_genres = rng.random((num_items, num_genres)) < 2.0 / num_genres
    item_genres[np.arange(num_items), rng.integers(0, num_genres, num_items)] = True
    quality = rng.normal(0.0, 0.5, num_items)
    taste = rng.normal(0.0, 1.0, (num_users, num_genres))
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
    popularity /= popularity.sum()

    ratings = []
    for user in range(num_users):
        count = int(rng.integers(min_ratings, max_ratings + 1))
        items = rng.choice(num_items, size=min(count, num_items), replace=False, p=popularity)
        affinity = (item_genres[items] * taste[user]).sum(1) / item_genres[items].sum(1)
        liking = 3.2 + affinity + quality[items] + rng.normal(0, 0.5, items.size)
        if format in ("ml-10m", "ml-latest"):  # half stars
            stars = [float(s) for s in np.clip(np.rint(liking * 2) / 2, 0.5, 5)]
        else:
            stars = [int(s) for s in np.clip(np.rint(liking), 1, 5)]
        times = 874_724_710 + user * 1000 + np.sort(rng.choice(10**6, items.size, replace=False))
        ratings += [(user + 1, item + 1, s, int(t)) for item, s, t in zip(items, stars, times)]
    ratings = [ratings[i] for i in rng.permutation(len(ratings))]  # files are not sorted by user and time

    genders = rng.choice(["M", "F"], num_users)
    zips = [f"{z:05d}" for z in rng.integers(0, 100_000, num_users)]
    titles = [f"{'Café ' if i % 7 == 0 else ''}Movie {i + 1} ({1930 + i % 70})" for i in range(num_items)]
    encoding = "latin-1"  # the older formats' own; ml-latest is UTF-8, quotes titles with a comma
    if format == "ml-latest":
        encoding = "utf-8"
        named = [f'"{t[:-7]}, The {t[-6:]}"' if i % 5 == 0 else t for i, t in enumerate(titles)]
        genre_names = np.array([g.replace("Children's", "Children") for g in MOVIELENS_GENRES])
        files = {
            "ratings.csv": [
                "userId,movieId,rating,timestamp", *(f"{u},{i},{r},{t}" for u, i, r, t in ratings)
            ],
            "movies.csv": [
                "movieId,title,genres",
                *(f"{i + 1},{named[i]}," + "|".join(genre_names[item_genres[i]]) for i in range(num_items)),
            ],
        }
    elif format == "ml-100k":
        occupations = rng.choice(["student", "engineer", "writer", "other", "technician"], num_users)
        ages = rng.integers(7, 74, num_users)
        files = {
            "u.data": ["\t".join(map(str, r)) for r in ratings],
            "u.user": [
                f"{u + 1}|{ages[u]}|{genders[u]}|{occupations[u]}|{zips[u]}" for u in range(num_users)
            ],
            "u.item": [
                f"{i + 1}|{titles[i]}|01-Jan-{1930 + i % 70}||http://us.imdb.com/M/title-exact?M{i + 1}|0|"
                + "|".join(str(int(f)) for f in item_genres[i])
                for i in range(num_items)
            ],
        }
    elif format == "ml-10m":
        files = {
            "ratings.dat": ["::".join(map(str, r)) for r in ratings],
            "movies.dat": [
                f"{i + 1}::{titles[i]}::" + "|".join(np.array(MOVIELENS_GENRES)[item_genres[i]])
                for i in range(num_items)
            ],
            "tags.dat": [f"{u}::{i}::good {i}::{t}" for u, i, _, t in ratings[:num_users]],
        }
    else:
        groups = rng.choice([1, 18, 25, 35, 45, 50, 56], num_users)
        occupations = rng.integers(0, 21, num_users)
        files = {
            "ratings.dat": ["::".join(map(str, r)) for r in ratings],
            "users.dat": [
                f"{u + 1}::{genders[u]}::{groups[u]}::{occupations[u]}::{zips[u]}" for u in range(num_users)
            ],
            "movies.dat": [
                f"{i + 1}::{titles[i]}::" + "|".join(np.array(MOVIELENS_GENRES)[item_genres[i]])
                for i in range(num_items)
            ],
        }
    for name, lines in files.items():
        (directory / name).write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return directory
