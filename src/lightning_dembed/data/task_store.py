"""The task store: interactions grouped task by task, for meta-learning (G-Meta's Meta-IO).

`build_task_store` turns an interactions table (parquet, CSV, a MovieLens directory or an Arrow
table) into a `TaskStore`: Arrow files, opened memory-mapped as HF ``datasets``, whose rows are
grouped task by task (each task's support rows before its query rows), with the task boundaries
beside them, plus a ``cold_start`` split of held-out tasks. `lightning_dembed.data.task_loader`
reads it as meta-batches.

HF ``datasets`` is imported where a split's rows are made, so that importing this module (and
`lightning_dembed.data`) does not need it.
"""

from __future__ import annotations

import json
import operator
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.parquet as pq

from lightning_dembed._atomic import atomic_directory
from lightning_dembed.data.movielens import decode_dictionaries, is_csv, read_interactions, read_table

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["TaskSplit", "TaskStore", "build_task_store", "parse_label_rule"]

_ROWS_FILE = "rows.arrow"
_TASKS_FILE = "tasks.npz"
_STATS_FILE = "stats.json"
_FORMAT = 2  # bumped whenever the files of a store change
_SPLITS = ("train", "cold_start")
_OPS = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}

# 64-bit FNV-1a (strings) and splitmix64's finaliser (integers): stable across runs and machines,
# unlike Python's hash().
_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def parse_label_rule(rule: str) -> tuple[str, str, float]:
    """Parse a ``"column op number"`` label rule, without eval.

    Example::

        parse_label_rule("rating >= 4")  # ("rating", ">=", 4.0); ops: >= > <= < == !=
    """
    match = re.fullmatch(r"\s*(\w+)\s*(>=|<=|==|!=|>|<)\s*(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*", rule)
    if match is None:
        raise ValueError(
            f"label_rule {rule!r} is not of the form 'column op number' (op one of {list(_OPS)})"
        )
    return match.group(1), match.group(2), float(match.group(3))


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: well-spread uint64 from any int64 (or uint64) values."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _hash_strings(strings: pa.Array) -> np.ndarray:
    """FNV-1a of each string's UTF-8 bytes, vectorised over strings (a loop over byte positions)."""
    strings = strings.cast(pa.large_string())
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int64)[
        strings.offset : strings.offset + len(strings) + 1
    ]
    data = (
        np.frombuffer(strings.buffers()[2], dtype=np.uint8)
        if strings.buffers()[2] is not None
        else np.zeros(0, np.uint8)
    )
    starts, lengths = offsets[:-1], np.diff(offsets)
    hashes = np.full(len(strings), _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(int(lengths.max(initial=0))):
            active = np.flatnonzero(lengths > j)
            hashes[active] = (hashes[active] ^ data[starts[active] + j].astype(np.uint64)) * _FNV_PRIME
    return hashes


def _is_integer(column: pa.ChunkedArray) -> bool:
    return pa.types.is_integer(column.type) or pa.types.is_boolean(column.type)


def _is_string(column: pa.ChunkedArray) -> bool:
    return pa.types.is_string(column.type) or pa.types.is_large_string(column.type)


def _missing_as(column: pa.ChunkedArray) -> Union[int, str]:
    """What a missing categorical value is stored as: 0, or the empty string."""
    return 0 if _is_integer(column) else ""


def _filled(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A categorical column as stored: integers as int64, and a missing value as `_missing_as`."""
    return pc.fill_null(column.cast(pa.int64()) if _is_integer(column) else column, _missing_as(column))


def _integers(column: pa.ChunkedArray) -> np.ndarray:
    return _filled(column).to_numpy().astype(np.int64)


def _string_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """``(dictionary position, stable hash)`` of each row's string; each distinct string hashed once."""
    encoded = pc.dictionary_encode(_filled(column).combine_chunks())
    codes = encoded.indices.to_numpy().astype(np.int64)
    return codes, _hash_strings(encoded.dictionary)[codes]


def _ids(column: pa.ChunkedArray, size: int) -> np.ndarray:
    """A categorical column as ids in ``[0, size)``: integers modulo ``size``, strings hashed."""
    if _is_integer(column):
        return np.mod(_integers(column), size)
    return (_string_codes(column)[1] % np.uint64(size)).astype(np.int64)


def _count(flags: pa.ChunkedArray) -> int:
    """How many of ``flags`` are true (nulls not counted)."""
    return int(pc.sum(flags).as_py() or 0)


def _nan_count(column: pa.ChunkedArray) -> int:
    return _count(pc.is_nan(column)) if pa.types.is_floating(column.type) else 0


def _check_times(times: pa.ChunkedArray, name: str) -> None:
    """A time column orders each task's rows: numbers or timestamps, none missing."""
    if not (_is_integer(times) or pa.types.is_floating(times.type) or pa.types.is_temporal(times.type)):
        raise TypeError(
            f"time_column {name!r} has type {times.type}; it must be numeric or a timestamp (text would sort "
            "alphabetically: '2024-1-10' before '2024-1-2'). Parse it first"
        )
    missing = times.null_count + _nan_count(times)
    if missing:
        raise ValueError(
            f"time_column {name!r} has {missing} missing values (null or NaN); they would sort last in their "
            "task, into the query set. Drop or fill them"
        )


def _shared_rows(
    table: pa.Table, categorical: Sequence[str], num_embeddings: Mapping[str, int], reserved: int
) -> dict[str, dict[str, int]]:
    """Per categorical column: its distinct values, how many of them share a table row with another,
    and its missing values (stored as 0 or "": warned about when that is also a real value).

    Warns for a column whose values are forced together by an undersized table: integers that
    collide at all (ids at or above the rows they have), strings when over a tenth of them collide
    (a hashed column always risks a few: about ``n**2 / (2 * rows)`` of ``n`` values).
    """
    shared = {}
    for c in categorical:
        column = table.column(c)
        filled = _filled(column)
        values = pc.unique(filled.combine_chunks())  # a missing value counts as 0 (or "")
        rows = int(num_embeddings[c]) - reserved
        ids = _ids(pa.chunked_array([values]), rows)
        sharing = int(len(ids) - np.unique(ids).size)  # values beyond the first of each row
        shared[c] = {"distinct_values": len(values), "values_sharing_a_row": sharing, "missing": column.null_count}
        stand_in = _missing_as(column)
        if column.null_count and _count(pc.equal(filled, stand_in)) > column.null_count:  # also a real value
            warnings.warn(
                f"categorical column {c!r}: its {column.null_count} missing values are stored as {stand_in!r}, "
                f"which is also a real value of the column: the model cannot tell them apart. Fill them with a "
                "value of their own first",
                stacklevel=3,
            )
        if not sharing:
            continue
        if _is_integer(column):
            # Modulo a size of at least the span from min(smallest id, 0) to the largest keeps ids apart.
            low, high = (int(v.as_py()) for v in (pc.min(values), pc.max(values)))
            needed = high - min(low, 0) + 1 + reserved
            span = f"its ids span {low}..{high}" if low < 0 else "its largest id + 1"
            fix = f"set num_embeddings for {c!r} to at least {needed} ({span}"
            fix += ", + the reserved row)" if reserved else ")"
            if needed > 100 * len(values):  # sparse ids (hashes, timestamps): a table that size is mostly unused
                fix = (f"its {len(values)} ids are sparse (up to {high}): number them 0..{len(values) - 1} "
                       f"first, or {fix}")
        elif sharing > 0.1 * len(values):
            # Hashing n values into m rows puts about n / (2 m) of them in a shared row.
            fix = f"make num_embeddings for {c!r} ten or more times its {len(values)} distinct values"
        else:
            continue
        warnings.warn(
            f"categorical column {c!r}: {sharing} of its {len(values)} distinct values share a table row "
            f"with another ({rows} rows for them), so the model cannot tell them apart; {fix}",
            stacklevel=3,
        )
    return shared


# MovieLens' CSV data sets (ml-latest, ml-32m) have no user features, which the shipped config lists.
_MISSING_HINT = (
    ". Name only columns the data has (categorical, dense, label, task_key, time_column), or join more "
    "on with side_tables"
)


def _ids_as_written(path: Path, table: pa.Table, ids: Sequence[str]) -> pa.Table:
    """``table`` read from CSV ``path``, its id columns kept as text where the file writes ids two ways.

    Arrow reads "007" and "7" as the integer 7: two users would become one task. An id column Arrow
    took for integers stays so only if every value reads back as the file wrote it.
    """
    guessed = [c for c in dict.fromkeys(ids) if c in table.column_names and pa.types.is_integer(table.column(c).type)]
    if not guessed:
        return table
    options = pyarrow.csv.ConvertOptions(include_columns=guessed, column_types=dict.fromkeys(guessed, pa.string()))
    written = pyarrow.csv.read_csv(path, convert_options=options)
    for c in guessed:
        differs = pc.not_equal(pc.cast(table.column(c), pa.string()), written.column(c))
        if _count(differs):
            example = written.column(c).filter(differs)[0].as_py()
            warnings.warn(
                f"{path}: column {c!r} writes some ids in another form than their number (e.g. {example!r}); "
                "it is read as text, so ids such as '007' and '7' stay apart",
                stacklevel=4,  # the caller of build_task_store
            )
            table = table.set_column(table.schema.get_field_index(c), c, written.column(c))
    return table


def _read(
    source: Union[str, Path, pa.Table],
    columns: list[str],
    side_tables: Optional[Mapping[str, Union[str, Path, pa.Table]]] = None,
    ids: Sequence[str] = (),
) -> pa.Table:
    """The needed columns of the interactions (``ids``: its task key and categorical columns); errors
    name the missing file or columns."""
    if is_csv(source) and Path(source).is_file():
        # Before any join: the ids as the file writes them.
        source = _ids_as_written(Path(source), read_table(source, "interactions file"), ids)
    if side_tables or (not isinstance(source, pa.Table) and Path(source).is_dir()):
        # A MovieLens directory, or side tables to join on: the joined table, then its needed columns.
        source = read_interactions(source, side_tables)
    if isinstance(source, pa.Table):
        table = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"interactions file {path} does not exist (a .parquet or .csv file, or a MovieLens directory)"
            )
        if path.suffix.lower() != ".parquet":
            raise ValueError(f"{path}: interactions must be a .parquet or .csv file (or a pyarrow.Table)")
        names = pq.read_schema(path).names
        missing = sorted(set(columns) - set(names))
        if missing:
            raise ValueError(f"{path} has no column(s) {missing}; its columns are {names}{_MISSING_HINT}")
        return decode_dictionaries(pq.read_table(path, columns=columns, memory_map=True))
    missing = sorted(set(columns) - set(table.column_names))
    if missing:
        raise ValueError(
            f"interactions have no column(s) {missing}; their columns are {table.column_names}{_MISSING_HINT}"
        )
    return decode_dictionaries(table.select(columns))


def _check_size(size: Union[int, float, None], name: str) -> None:
    if size is None and name == "query_size":
        return
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise TypeError(
            f"{name} must be an int (rows) or a float in (0, 1) (fraction of a task's rows), got {size!r}"
        )
    if isinstance(size, int) and size < 1:
        raise ValueError(f"{name} must be >= 1 row, got {size}")
    if isinstance(size, float) and not 0.0 < size < 1.0:
        raise ValueError(f"{name} as a fraction must be in (0, 1), got {size}")


def table_sizes(num_embeddings: Union[int, Mapping[str, int]], categorical: Sequence[str]) -> dict[str, int]:
    """Rows of each categorical column's table: one size for all, or a size named per column."""
    if not isinstance(num_embeddings, Mapping):
        return dict.fromkeys(categorical, num_embeddings)
    unsized = [c for c in categorical if c not in num_embeddings]
    unknown = [c for c in num_embeddings if c not in categorical]
    if unsized or unknown:
        raise ValueError(
            f"num_embeddings names a size per column, so it must name exactly the categorical columns "
            f"{list(categorical)}: missing {unsized}, not categorical {unknown}. Or give one size for all"
        )
    return {c: num_embeddings[c] for c in categorical}


def _split_sizes(counts: np.ndarray, size: Union[int, float]) -> np.ndarray:
    """Rows per task for an int size (the same for every task) or a fraction (at least one row)."""
    if isinstance(size, int):
        return np.full(counts.shape, size, dtype=np.int64)
    return np.maximum(np.floor(counts * size), 1).astype(np.int64)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(start, start + length)`` of several ranges, without a Python loop."""
    ends = np.cumsum(lengths)
    return np.arange(int(ends[-1]) if ends.size else 0) + np.repeat(starts - (ends - lengths), lengths)


@dataclass
class TaskSplit:
    """The tasks of one split over their rows: task ``t`` owns rows ``offsets[t]:offsets[t + 1]``.

    The first ``support_sizes[t]`` rows of a task are its support set, the rest its query set.

    Attributes:
        name: ``"train"`` or ``"cold_start"``.
        rows: the rows, a HF `datasets.Dataset` (memory-mapped when loaded from disk) with the
            ``categorical`` columns as int64 ids, the ``dense`` columns as float32 and ``label``.
        offsets: ``[T + 1]`` int64 task boundaries.
        support_sizes: ``[T]`` int64.
        keys: ``[T]`` int64 task keys (the key itself for integer keys, a stable hash for strings).
        single_class: ``[T]`` bool, tasks whose labels are all one class.
        categorical: the sparse feature names, in `KeyedJaggedTensor` key order.
        dense: the dense feature names, in ``dense_features`` column order.
    """

    name: str
    rows: Dataset
    offsets: np.ndarray
    support_sizes: np.ndarray
    keys: np.ndarray
    single_class: np.ndarray
    categorical: list[str]
    dense: list[str]

    @property
    def num_tasks(self) -> int:
        return int(self.support_sizes.size)

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1] - self.offsets[0])

    def column(self, name: str) -> np.ndarray:
        """A column as a numpy array; a view of the memory-mapped file, not a copy, when on disk."""
        column = self.rows.data.table.column(name)
        # Stored as one record batch, so this is zero-copy; an in-memory table may have more.
        return column.to_numpy() if column.num_chunks <= 1 else column.combine_chunks().to_numpy()

    def task_range(self, start: int, stop: int) -> "TaskSplit":
        """Tasks ``start..stop - 1`` over the same rows (e.g. validation and test halves)."""
        return TaskSplit(
            self.name,
            self.rows,
            self.offsets[start : stop + 1],
            self.support_sizes[start:stop],
            self.keys[start:stop],
            self.single_class[start:stop],
            self.categorical,
            self.dense,
        )


@dataclass
class TaskStore:
    """A task store: the ``train`` and ``cold_start`` `TaskSplit`\\ s and how they were built.

    ``cold_start`` holds the tasks whose key hashes into ``holdout_fraction``: never seen in
    training, for evaluating adaptation to new users. On disk, ``directory`` is a link to a complete
    version ``.<name>.versions/<id>`` beside it (written atomically, see `lightning_dembed._atomic`)::

        stats.json                       # stats, and the arguments of build_task_store
        train/rows.arrow, train/tasks.npz
        cold_start/rows.arrow, cold_start/tasks.npz

    Attributes:
        train: the training tasks.
        cold_start: the held-out tasks.
        stats: ``tasks`` (kept), ``rows`` (stored), ``dropped_too_small``, ``single_class``,
            ``input_rows``, ``input_tasks``, per-split counts and the build arguments (``config``).
        directory: where it lives; None for a store built in memory.

    Example::

        store = build_task_store("ratings.parquet", "stores/ml", task_key="user_id",
                                 categorical=["user_id", "item_id"], label_rule="rating >= 4",
                                 num_embeddings={"user_id": 10**5, "item_id": 10**4},
                                 time_column="timestamp", support_size=0.5)
        store = TaskStore.load("stores/ml")          # later, memory-mapped
        store.stats["dropped_too_small"], store.train.num_tasks, store.cold_start.num_tasks
    """

    train: TaskSplit
    cold_start: TaskSplit
    stats: dict
    directory: Optional[Path] = None

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "TaskStore":
        """Open a store written by `build_task_store` (the rows memory-mapped)."""
        directory = Path(directory)
        if not (directory / _STATS_FILE).is_file():
            raise FileNotFoundError(
                f"{directory} is not a task store (no {_STATS_FILE}); build it with build_task_store"
            )
        stats = json.loads((directory / _STATS_FILE).read_text())
        if stats.get("format") != _FORMAT:
            raise ValueError(
                f"{directory} holds a task store of format {stats.get('format', 1)}; this version reads format "
                f"{_FORMAT}. Rebuild it with build_task_store (delete the folder, or write to another one)"
            )
        from datasets import Dataset  # here: importing lightning_dembed.data does not need HF datasets

        splits = {}
        for name in _SPLITS:
            tasks = np.load(directory / name / _TASKS_FILE)
            splits[name] = TaskSplit(
                name=name,
                rows=Dataset.from_file(str(directory / name / _ROWS_FILE)),
                offsets=tasks["offsets"],
                support_sizes=tasks["support_sizes"],
                keys=tasks["keys"],
                single_class=tasks["single_class"],
                categorical=list(stats["config"]["categorical"]),
                dense=list(stats["config"]["dense"]),
            )
        return cls(train=splits["train"], cold_start=splits["cold_start"], stats=stats, directory=directory)


def build_task_store(
    source: Union[str, Path, pa.Table],
    out_dir: Optional[Union[str, Path]],
    *,
    task_key: str,
    categorical: Sequence[str],
    num_embeddings: Union[int, Mapping[str, int]],
    dense: Sequence[str] = (),
    label: Optional[str] = None,
    label_rule: Optional[str] = None,
    time_column: Optional[str] = None,
    split: Literal["time", "random"] = "time",
    support_size: Union[int, float] = 0.5,
    query_size: Optional[Union[int, float]] = None,
    min_rows_per_task: int = 4,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    reserve_unseen_row: bool = False,
    unseen_task_fraction: float = 0.0,
    holdout_seed: Optional[int] = None,
    side_tables: Optional[Mapping[str, Union[str, Path, pa.Table]]] = None,
) -> TaskStore:
    """Group an interactions table by task into a `TaskStore` (on disk, or in memory).

    The rows are sorted by ``task_key`` and then by ``time_column`` (``split="time"``: support
    rows are each task's earliest, query rows the next ones) or by a seeded random draw
    (``split="random"``), with Arrow's stable sort; all per-task work is vectorised.
    ``support_size`` and ``query_size`` are rows per task (int) or fractions of each task's rows
    (float, at least one row); ``query_size=None`` takes all rows after the support set, and rows
    past ``support_size + query_size`` are left out. Tasks with fewer than ``min_rows_per_task``
    rows, or too few for both sets, are dropped and counted; tasks whose labels are all one class
    are kept and counted (and flagged in `TaskSplit.single_class`). ``holdout_fraction`` of the
    task keys, chosen by a stable hash of the key, form the ``cold_start`` split.

    ``num_embeddings`` sizes the tables: one size for every categorical column, or a size per column
    naming exactly those. Categorical values become ids in ``[0, num_embeddings[column])``: integers modulo the size,
    strings by a stable 64-bit hash modulo the size. Values that end up sharing a row are counted
    per column in the store's ``stats["categorical"]``, and warned about when the table is too
    small for them (any integers, over a tenth of the strings). Missing categorical and dense values
    count as 0 (or the empty string). Labels come from ``label`` (a 0/1 column) or ``label_rule``
    (``"column op number"``, e.g. ``"rating >= 4"``). Refused, with the column named, because they
    would train wrong without a word: missing (null or NaN) labels or ``label_rule`` values, NaN
    or infinite dense values, and with ``split="time"`` a time column that is text (it would sort
    alphabetically) or has missing values (they would sort into the query set).

    Args:
        source: a ``.parquet`` or ``.csv`` file, a `pyarrow.Table` (e.g. `generate_interactions`), or
            an unzipped MovieLens directory, ml-100k, ml-1m, ml-10m or ml-latest (`read_movielens`: ratings
            with the user's and the movie's features).
        out_dir: where to write the store, atomically (`lightning_dembed._atomic`: a link to a
            complete version beside it; a failed build leaves what was there); None keeps it in memory.
        task_key: the column whose values are the tasks (a user id, say).
        categorical: sparse feature columns, in the order of the `KeyedJaggedTensor` keys.
        num_embeddings: table size of every categorical column.
        dense: dense feature columns.
        label: 0/1 label column; give this or ``label_rule``.
        label_rule: ``"column op number"``; rows where it holds are positives.
        time_column: orders each task's rows; needed by ``split="time"``.
        split: ``"time"`` or ``"random"``.
        support_size: support rows per task (int) or fraction of its rows (float).
        query_size: query rows per task (int), fraction (float), or None for the rest.
        min_rows_per_task: smaller tasks are dropped.
        holdout_fraction: share of task keys held out as ``cold_start``.
        holdout_seed: None: which tasks are held out depends on their key alone, the same for any
            ``seed``; an int draws another set per value (to see how much a cold-start score
            depends on which tasks were held out).
        seed: seeds the random split.
        reserve_unseen_row: row 0 of every table is reserved for values never seen in training:
            training values take ids ``[1, num_embeddings)``, and cold-start values absent from the
            training rows (a new user's id, a new item's) take 0, so a new user or item gets one
            learned row instead of an untrained one.
        unseen_task_fraction: with ``reserve_unseen_row``, this share of the training tasks (by a
            stable hash of the key) have their ``task_key`` column's ids replaced by the reserved
            row too, so that it is trained as a new task's row (1.0: the model never sees a task's
            own id and learns the reserved row as every new task's starting point).
        side_tables: key column -> a side-feature table (file or `pyarrow.Table`, one row per key)
            joined onto the interactions before anything else, e.g. ``{"user_id": "users.csv"}``;
            see `read_interactions`.

    Returns:
        The `TaskStore` (memory-mapped from ``out_dir`` when one is given).

    Example::

        table = generate_interactions(SyntheticTaskConfig(num_users=1000))
        store = build_task_store(table, None, task_key="user_id", categorical=["user_id", "item_id"],
                                 num_embeddings={"user_id": 1000, "item_id": 2000}, label="label",
                                 time_column="timestamp", support_size=0.5)
    """
    from datasets import Dataset  # here: importing lightning_dembed.data does not need HF datasets

    categorical, dense = list(categorical), list(dense)
    if (label is None) == (label_rule is None):
        raise ValueError("give exactly one of label (a 0/1 column) and label_rule (e.g. 'rating >= 4')")
    if split not in ("time", "random"):
        raise ValueError(f"split must be 'time' or 'random', got {split!r}")
    if split == "time" and time_column is None:
        raise ValueError("split='time' needs time_column; or use split='random'")
    if not 0.0 <= unseen_task_fraction <= 1.0:
        raise ValueError(f"unseen_task_fraction must be in [0, 1], got {unseen_task_fraction}")
    if unseen_task_fraction and not reserve_unseen_row:
        raise ValueError("unseen_task_fraction needs reserve_unseen_row=True (the row those tasks' ids take)")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    _check_size(support_size, "support_size")
    _check_size(query_size, "query_size")
    if not categorical:
        raise ValueError("categorical names no column: a task store needs at least one sparse feature")
    num_embeddings = table_sizes(num_embeddings, categorical)
    smallest = 1 + int(reserve_unseen_row)  # the reserved row, and one for the values seen
    bad_sizes = {c: num_embeddings[c] for c in categorical if int(num_embeddings[c]) < smallest}
    if bad_sizes:
        raise ValueError(f"num_embeddings must be >= {smallest}, got {bad_sizes}")
    rule = parse_label_rule(label_rule) if label_rule is not None else None
    label_source = label if rule is None else rule[0]
    needed = list(
        dict.fromkeys([task_key, *categorical, *dense, label_source, *([time_column] if time_column else [])])
    )
    table = _read(source, needed, side_tables, ids=[task_key, *categorical])
    input_rows = table.num_rows
    if input_rows == 0:
        raise ValueError("the interactions table has no rows")
    for c in [task_key, *categorical]:
        if not (_is_integer(table.column(c)) or _is_string(table.column(c))):
            floats = pa.types.is_floating(table.column(c).type)
            raise TypeError(
                f"column {c!r} has type {table.column(c).type}; task keys and categorical values must be "
                "integers or strings"
                + (" (pandas stores an integer column with missing values as floats: convert it with "
                   ".astype('Int64') first)" if floats else "")
            )
    for c in dense:
        if pa.types.is_decimal(table.column(c).type):  # a number all the same; dense values are float32
            table = table.set_column(table.schema.get_field_index(c), c, table.column(c).cast(pa.float64()))
        if not (_is_integer(table.column(c)) or pa.types.is_floating(table.column(c).type)):
            raise TypeError(f"dense column {c!r} has type {table.column(c).type}; it must be numeric")
        # Missing values are stored as 0; NaN and infinities would poison every gradient they reach.
        if pa.types.is_floating(table.column(c).type) and (bad := _count(pc.invert(pc.is_finite(table.column(c))))):
            raise ValueError(f"dense column {c!r} has {bad} NaN or infinite values; drop or fill them")
    if split == "time":
        _check_times(table.column(time_column), time_column)

    label_column = table.column(label_source)
    missing_labels = label_column.null_count + _nan_count(label_column)
    if missing_labels:
        # A NaN compares false (or true, for !=) in a label_rule: it would silently become a label.
        raise ValueError(f"label column {label_source!r} has {missing_labels} missing values (null or NaN)")
    if rule is None:
        try:
            labels = label_column.to_numpy(zero_copy_only=False).astype(np.float32)
        except ValueError as error:  # text that is not a number ("yes")
            raise ValueError(f"label column {label!r} must hold 0/1 values: {error}") from error
        if not np.isin(labels, (0.0, 1.0)).all():
            raise ValueError(f"label column {label!r} must hold 0/1 values; use label_rule to derive them")
    else:
        if not (pa.types.is_integer(label_column.type) or pa.types.is_floating(label_column.type)):
            raise TypeError(f"label_rule column {rule[0]!r} has type {label_column.type}; it must be numeric")
        labels = _OPS[rule[1]](label_column.to_numpy(zero_copy_only=False), rule[2]).astype(np.float32)

    # Group rows by task, ordered by time (or at random) within a task: one stable Arrow sort.
    key_column = table.column(task_key)
    if key_column.null_count:
        raise ValueError(f"task_key column {task_key!r} has {key_column.null_count} missing values")
    if _is_integer(key_column):
        group = key = _integers(key_column)
    else:
        group, hashes = _string_codes(key_column)
        key = hashes.view(np.int64)
    secondary = (
        table.column(time_column)
        if split == "time"
        else pa.array(np.random.default_rng(seed).random(input_rows))
    )
    order = pc.sort_indices(
        pa.table({"group": group, "secondary": secondary}),
        sort_keys=[("group", "ascending"), ("secondary", "ascending")],
    ).to_numpy()
    sorted_group = group[order]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    counts = np.diff(np.r_[starts, input_rows]).astype(np.int64)

    support = _split_sizes(counts, support_size)
    query = counts - support if query_size is None else _split_sizes(counts, query_size)
    kept = (counts >= max(min_rows_per_task, 2)) & (query >= 1) & (support + query <= counts)
    used = support + query
    task_keys = key[order[starts]]
    salted = task_keys
    if holdout_seed is not None:
        with np.errstate(over="ignore"):
            salted = task_keys.astype(np.uint64) + _mix(np.array([holdout_seed]))[0]
    held_out = (_mix(salted) >> np.uint64(11)).astype(np.float64) * 2.0**-53 < holdout_fraction

    # Class balance over the rows stored (support + query), which may be fewer than the task's.
    position = np.arange(input_rows) - np.repeat(starts, counts)
    stored_labels = np.where(position < np.repeat(used, counts), labels[order], 0.0)
    stored_positives = np.add.reduceat(stored_labels, starts)
    single_class = (stored_positives == 0) | (stored_positives == used)

    stats: dict = {
        "input_rows": int(input_rows),
        "input_tasks": int(starts.size),
        "tasks": int(kept.sum()),
        "rows": int(used[kept].sum()),
        "dropped_too_small": int((~kept).sum()),
        "single_class": int((single_class & kept).sum()),
        "categorical": _shared_rows(table, categorical, num_embeddings, int(reserve_unseen_row)),
    }
    splits = {}
    # Training tasks trained as unseen ones (another hash than the holdout's), and the ids training saw.
    as_unseen = (_mix(_mix(task_keys)) >> np.uint64(11)).astype(np.float64) * 2.0**-53 < unseen_task_fraction
    seen: dict[str, np.ndarray] = {}
    for name, chosen in (("train", kept & ~held_out), ("cold_start", kept & held_out)):
        rows = order[_ranges(starts[chosen], used[chosen])]
        picked = table.take(rows)
        reserved = int(reserve_unseen_row)
        columns = {
            c: reserved + _ids(picked.column(c), int(num_embeddings[c]) - reserved) for c in categorical
        }
        if reserve_unseen_row:
            _reserve_unseen(columns, seen, name, np.repeat(as_unseen[chosen], used[chosen]), task_key)
        for c in dense:
            values = pc.fill_null(picked.column(c).cast(pa.float32()), 0.0)
            columns[c] = values.to_numpy(zero_copy_only=False).astype(np.float32)
        columns["label"] = labels[rows]
        sizes = used[chosen]
        splits[name] = TaskSplit(
            name=name,
            rows=Dataset(pa.table(columns)),
            offsets=np.r_[0, np.cumsum(sizes)].astype(np.int64),
            support_sizes=support[chosen],
            keys=task_keys[chosen].astype(np.int64),
            single_class=single_class[chosen],
            categorical=categorical,
            dense=dense,
        )
        stats[name] = {
            "tasks": int(chosen.sum()),
            "rows": int(sizes.sum()),
            "single_class": int(single_class[chosen].sum()),
        }
    stats["format"] = _FORMAT
    stats["config"] = {
        "task_key": task_key,
        "categorical": categorical,
        "dense": dense,
        "num_embeddings": {c: int(num_embeddings[c]) for c in categorical},
        "label": label,
        "label_rule": label_rule,
        "time_column": time_column,
        "split": split,
        "support_size": support_size,
        "query_size": query_size,
        "min_rows_per_task": min_rows_per_task,
        "holdout_fraction": holdout_fraction,
        "reserve_unseen_row": reserve_unseen_row,
        "unseen_task_fraction": unseen_task_fraction,
        "holdout_seed": holdout_seed,
        "seed": seed,
        "source": str(source) if not isinstance(source, pa.Table) else "pyarrow.Table",
        "side_tables": {
            k: str(v) if not isinstance(v, pa.Table) else "pyarrow.Table" for k, v in side_tables.items()
        }
        if side_tables
        else None,
    }
    store = TaskStore(train=splits["train"], cold_start=splits["cold_start"], stats=stats)
    if out_dir is None:
        return store
    return _write(store, Path(out_dir))


def _reserve_unseen(
    columns: dict[str, np.ndarray], seen: dict[str, np.ndarray], split: str, as_unseen: np.ndarray, task_key: str
) -> None:
    """Give row 0 to the ids training does not see (in place); training's ids are recorded in ``seen``."""
    if split == "train":
        if task_key in columns:
            columns[task_key][as_unseen] = 0
        seen.update({c: np.unique(ids) for c, ids in columns.items()})
        return
    for c, ids in columns.items():
        ids[~np.isin(ids, seen[c])] = 0


def _write(store: TaskStore, out_dir: Path) -> TaskStore:
    with atomic_directory(out_dir) as staging:
        for split in (store.train, store.cold_start):
            (staging / split.name).mkdir()
            table = split.rows.data.table.combine_chunks()
            # One record batch per column (HF's save_to_disk writes 1,000-row batches): TaskSplit.column()
            # is then a zero-copy view of the memory map in every DataLoader worker.
            with (
                pa.OSFile(str(staging / split.name / _ROWS_FILE), "wb") as sink,
                pa.ipc.new_stream(sink, table.schema) as w,
            ):
                w.write_table(table)
            np.savez(
                staging / split.name / _TASKS_FILE,
                offsets=split.offsets,
                support_sizes=split.support_sizes,
                keys=split.keys,
                single_class=split.single_class,
            )
        (staging / _STATS_FILE).write_text(json.dumps(store.stats, indent=1))
    return TaskStore.load(out_dir)
