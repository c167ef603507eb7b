"""Criteo click logs: TSV parsing, preprocessing into memory-mapped Arrow, and a sharded reader.

Criteo 1TB day files (``day_0``..``day_23``) and the Kaggle ``train.txt`` share one format: per line
a 0/1 label, 13 integer features and 26 categorical features written as 32-bit hex strings,
tab-separated, any feature possibly empty. `preprocess` turns such files into a directory of Arrow
IPC stream files (``part-00000.arrow``..., one per input, each one also opens with
``datasets.Dataset.from_file``) plus ``metadata.json``; `CriteoDataset` memory-maps them and yields
`Batch`es. `materialize` in `lightning_dembed.data.synthetic` writes the same format.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
from bisect import bisect_right
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_dembed.data.batch import Batch
from lightning_dembed.data.position import ResumablePasses

__all__ = [
    "CRITEO_1TB_NUM_EMBEDDINGS",
    "CRITEO_NUM_DENSE",
    "CRITEO_SPARSE_FEATURES",
    "ClickDataInfo",
    "ClickDataWriter",
    "CriteoDataset",
    "CriteoTsvReader",
    "criteo_tables",
    "map_categorical",
    "preprocess",
    "preprocess_main",
    "write_fake_criteo_tsv",
]

PathLike = Union[str, Path]
Mapping = Literal["modulo", "hash"]

CRITEO_NUM_DENSE = 13
CRITEO_SPARSE_FEATURES = [f"cat_{i}" for i in range(26)]
# Rows per categorical feature of Criteo 1TB after TorchRec's DLRM preprocessing.
CRITEO_1TB_NUM_EMBEDDINGS = [
    45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10,
    2209, 11267, 128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35,
]
_NUM_FIELDS = 1 + CRITEO_NUM_DENSE + len(CRITEO_SPARSE_FEATURES)
_DENSE_NAMES = [f"int_{i}" for i in range(CRITEO_NUM_DENSE)]
_FIELD_NAMES = ["label", *_DENSE_NAMES, *CRITEO_SPARSE_FEATURES]
# Ids are stored as int32: categoricals are 32-bit and no table needs 2**31 rows.
_MAX_NUM_EMBEDDINGS = 2**31 - 1
_METADATA = "metadata.json"
_TSV_BLOCK_BYTES = 16 << 20
# A 20-digit integer would overflow int64; Criteo's never exceed a few digits.
_INTEGER = r"-?[0-9]{1,18}"
_HEX = r"[0-9a-fA-F]{1,8}"
_HEX_DIGIT = np.full(256, 255, dtype=np.uint8)
_HEX_DIGIT[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX_DIGIT[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX_DIGIT[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def _rank_and_world_size(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    """Explicit values win; otherwise torch.distributed's, when it is initialised; otherwise 0 of 1."""
    if rank is None and world_size is None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return rank, world_size


def _per_feature(num_embeddings_per_feature: Union[int, Sequence[int]]) -> list[int]:
    if isinstance(num_embeddings_per_feature, int):
        num_embeddings_per_feature = [num_embeddings_per_feature] * len(CRITEO_SPARSE_FEATURES)
    sizes = [int(n) for n in num_embeddings_per_feature]
    if len(sizes) != len(CRITEO_SPARSE_FEATURES) or not all(1 <= n <= _MAX_NUM_EMBEDDINGS for n in sizes):
        raise ValueError(
            f"num_embeddings_per_feature must be one int or {len(CRITEO_SPARSE_FEATURES)} ints in "
            f"[1, {_MAX_NUM_EMBEDDINGS}], got {num_embeddings_per_feature}"
        )
    return sizes


def criteo_tables(
    num_embeddings_per_feature: Union[int, Sequence[int]], embedding_dim: int
) -> list[EmbeddingBagConfig]:
    """The 26 Criteo tables ``t_cat_0..t_cat_25``, each read by one feature ``cat_i``.

    Example::

        tables = criteo_tables(CRITEO_1TB_NUM_EMBEDDINGS, embedding_dim=128)
        tables[0].name, tables[0].feature_names, tables[0].num_embeddings  # ('t_cat_0', ['cat_0'], 45833188)
    """
    return [
        EmbeddingBagConfig(name=f"t_{feature}", num_embeddings=rows, embedding_dim=embedding_dim,
                           feature_names=[feature])
        for feature, rows in zip(CRITEO_SPARSE_FEATURES, _per_feature(num_embeddings_per_feature))
    ]


def _mix64(x: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser: every input bit moves every output bit, so ``% n`` spreads well.
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def map_categorical(
    values: np.ndarray, num_embeddings: Union[int, np.ndarray], mapping: Mapping = "modulo"
) -> np.ndarray:
    """Map raw categorical values (the hex strings' integers) to row ids in ``[0, num_embeddings)``.

    ``"modulo"`` is ``value % num_embeddings``; ``"hash"`` first mixes the value with a fixed 64-bit
    hash (the same on every machine and run), which spreads values that share low digits.
    ``num_embeddings`` broadcasts against ``values`` (one per row of a ``[26, n]`` array, say).
    """
    if mapping not in ("modulo", "hash"):
        raise ValueError(f"mapping must be 'modulo' or 'hash', got {mapping!r}")
    values = np.asarray(values).astype(np.uint64)
    if mapping == "hash":
        values = _mix64(values)
    return (values % np.asarray(num_embeddings, dtype=np.uint64)).astype(np.int64)


@dataclass(frozen=True)
class ClickDataInfo:
    """What ``metadata.json`` of a preprocessed click data directory says.

    Every part file has the columns ``label`` (int8), ``dense`` (fixed-size list of float32) and one
    int32 column per sparse feature (a fixed-size list of int32 for a multi-hot one).
    """

    feature_names: tuple[str, ...]
    num_embeddings: tuple[int, ...]
    hotness: tuple[int, ...]
    num_dense_features: int
    files: tuple[str, ...] = ()
    rows_per_file: tuple[int, ...] = ()
    num_malformed: int = 0

    @property
    def num_rows(self) -> int:
        return sum(self.rows_per_file)

    def tables(self, embedding_dim: int) -> list[EmbeddingBagConfig]:
        """One table ``t_<feature>`` per feature, sized by ``num_embeddings``."""
        return [
            EmbeddingBagConfig(name=f"t_{name}", num_embeddings=rows, embedding_dim=embedding_dim,
                               feature_names=[name])
            for name, rows in zip(self.feature_names, self.num_embeddings)
        ]

    def schema(self) -> pa.Schema:
        fields = [
            pa.field("label", pa.int8()),
            pa.field("dense", pa.list_(pa.float32(), self.num_dense_features)),
        ]
        for name, hotness in zip(self.feature_names, self.hotness):
            fields.append(pa.field(name, pa.int32() if hotness == 1 else pa.list_(pa.int32(), hotness)))
        return pa.schema(fields)

    @classmethod
    def load(cls, path: PathLike) -> "ClickDataInfo":
        metadata = Path(path) / _METADATA
        if not metadata.is_file():
            raise FileNotFoundError(
                f"{path} is not a preprocessed click data directory (no {_METADATA}); make one with "
                "`lightning-dembed preprocess-criteo --input ... --output ...`"
            )
        fields = json.loads(metadata.read_text())
        return cls(**{key: tuple(value) if isinstance(value, list) else value
                      for key, value in fields.items()})


class ClickDataWriter:
    """Writes a preprocessed click data directory, all or nothing.

    Parts go to a hidden temporary directory next to ``path``, which `commit` renames to ``path``;
    leaving the ``with`` block without committing (an error, say) deletes it.

    Example::

        with ClickDataWriter("out", info) as writer:
            writer.write_part(record_batches)  # one part-NNNNN.arrow file per call
            info = writer.commit()
    """

    def __init__(self, path: PathLike, info: ClickDataInfo) -> None:
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"{self.path} already exists; remove it or choose another output directory")
        self.info = info
        self._schema = info.schema()
        self._tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}"
        self._files: list[str] = []
        self._rows: list[int] = []

    def __enter__(self) -> "ClickDataWriter":
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def write_part(self, record_batches: Iterable[pa.RecordBatch]) -> int:
        """Write one part file; returns its number of rows."""
        name = f"part-{len(self._files):05d}.arrow"
        rows = 0
        # The IPC stream format is what `datasets` memory-maps, so each part is also a HF dataset.
        with pa.OSFile(str(self._tmp / name), "wb") as sink, pa.ipc.new_stream(sink, self._schema) as writer:
            for record_batch in record_batches:
                writer.write_batch(record_batch)
                rows += record_batch.num_rows
        self._files.append(name)
        self._rows.append(rows)
        return rows

    def commit(self, num_malformed: int = 0) -> ClickDataInfo:
        """Write ``metadata.json`` and move the directory into place; returns its metadata."""
        if sum(self._rows) == 0:
            raise ValueError(f"no rows were written for {self.path}")
        info = replace(
            self.info, files=tuple(self._files), rows_per_file=tuple(self._rows), num_malformed=num_malformed,
        )
        (self._tmp / _METADATA).write_text(json.dumps(asdict(info), indent=1))
        os.rename(self._tmp, self.path)
        return info


def _parse_labels(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    ok = pc.is_in(strings, value_set=pa.array(["0", "1"])).to_numpy(zero_copy_only=False)
    return pc.equal(strings, "1").fill_null(False).to_numpy(zero_copy_only=False), ok


def _parse_integers(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Dense values as ``log(max(x, 0) + 1)`` (missing: 0), and which strings were integers."""
    ok = pc.match_substring_regex(strings, f"^{_INTEGER}$").fill_null(True).to_numpy(zero_copy_only=False)
    integers = pc.cast(pc.if_else(pa.array(ok), strings, "0"), pa.int64()).fill_null(0).to_numpy()
    return np.log1p(np.maximum(integers, 0)).astype(np.float32), ok


def _parse_hex(strings: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integers of 1-8 digit hex strings, which strings were such, and which were missing."""
    missing = strings.is_null().to_numpy(zero_copy_only=False)
    length = pc.binary_length(strings).fill_null(0).to_numpy()
    ok = missing | ((length >= 1) & (length <= 8))
    # Padded with zeros to exactly 8 bytes (missing or too long ones replaced first), the strings
    # are an [n, 8] byte matrix.
    padded = pc.ascii_lpad(pc.if_else(pa.array(ok & ~missing), strings, "0"), 8, "0")
    first = int(np.frombuffer(padded.buffers()[1], np.int32, count=1, offset=4 * padded.offset)[0])
    data = np.frombuffer(padded.buffers()[2], np.uint8, count=8 * len(padded), offset=first)
    digits = _HEX_DIGIT[data].reshape(-1, 8)
    ok &= (digits != 255).all(axis=1)
    # Two digits make a byte; four bytes read big-endian make the 32-bit value.
    values = ((digits[:, 0::2] << 4) | digits[:, 1::2]).view(">u4").ravel()
    return values, ok, missing


def _describe(fields: list[Optional[str]]) -> str:
    """Says what is wrong with one line's fields, checked one at a time (used for the first bad line only)."""
    if all(field is None for field in fields):
        return "line is empty"
    if fields[0] not in ("0", "1"):
        return f"label is {fields[0] or ''!r}, expected 0 or 1"
    for column, (name, field) in enumerate(zip(_FIELD_NAMES, fields), start=1):
        if field is None or name == "label":
            continue
        if name.startswith("int_") and not re.fullmatch(_INTEGER, field):
            return f"column {column} ({name}) is {field!r}, expected an integer"
        if name.startswith("cat_") and not re.fullmatch(_HEX, field):
            return f"column {column} ({name}) is {field!r}, expected a hex string of at most 8 digits"
    return "unreadable line"


class CriteoTsvReader:
    """Streams one Criteo TSV file as Arrow record batches in the preprocessed layout.

    Categorical values become ids with `map_categorical` (missing: id 0); integer features become
    ``log(max(x, 0) + 1)`` (missing: 0). A malformed line (not 40 fields, a label other than 0/1, a
    non-integer integer feature, a categorical that is not 1-8 hex digits) raises ``ValueError``
    naming the file, the 1-based line and the problem; with ``skip_malformed`` it is dropped and
    counted in `num_malformed`. Parsing is vectorised per block of about 16 MiB.

    Args:
        path: the TSV file.
        num_embeddings_per_feature: table rows, one for all 26 features or one each.
        mapping: ``"modulo"`` or ``"hash"``, see `map_categorical`.
        skip_malformed: drop malformed lines instead of raising.

    Example::

        reader = CriteoTsvReader("day_0", 1_000_000, mapping="hash", skip_malformed=True)
        table = reader.read_all()  # label, dense [13], cat_0..cat_25
        reader.num_malformed  # lines dropped
    """

    def __init__(
        self,
        path: PathLike,
        num_embeddings_per_feature: Union[int, Sequence[int]],
        mapping: Mapping = "modulo",
        skip_malformed: bool = False,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"Criteo file {self.path} does not exist")
        if self.path.stat().st_size == 0:
            raise ValueError(f"Criteo file {self.path} is empty")
        if mapping not in ("modulo", "hash"):
            raise ValueError(f"mapping must be 'modulo' or 'hash', got {mapping!r}")
        self.num_embeddings = _per_feature(num_embeddings_per_feature)
        self.mapping = mapping
        self.skip_malformed = skip_malformed
        self.num_malformed = 0
        self.info = ClickDataInfo(
            feature_names=tuple(CRITEO_SPARSE_FEATURES), num_embeddings=tuple(self.num_embeddings),
            hotness=(1,) * len(CRITEO_SPARSE_FEATURES), num_dense_features=CRITEO_NUM_DENSE,
        )

    def read_all(self) -> pa.Table:
        return pa.Table.from_batches(list(self), schema=self.info.schema())

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        self.num_malformed = 0
        wrong_width: list[tuple[int, int]] = []  # (line, fields) of lines pyarrow rejected

        def on_invalid_row(row: pa_csv.InvalidRow) -> str:
            wrong_width.append((row.number, row.actual_columns))
            return "skip"

        reader = pa_csv.open_csv(
            self.path,
            # Single-threaded parsing is what makes pyarrow report line numbers.
            read_options=pa_csv.ReadOptions(
                use_threads=False, block_size=_TSV_BLOCK_BYTES, column_names=_FIELD_NAMES,
            ),
            parse_options=pa_csv.ParseOptions(
                delimiter="\t", quote_char=False, ignore_empty_lines=False,
                invalid_row_handler=on_invalid_row,
            ),
            convert_options=pa_csv.ConvertOptions(
                column_types={name: pa.string() for name in _FIELD_NAMES}, strings_can_be_null=True,
                null_values=[""],
            ),
        )
        rows_before = 0
        for block in reader:
            if block.num_rows == 0:
                continue
            record_batch, bad = self._convert(block)
            if not self.skip_malformed:
                self._raise_first(block, bad, rows_before, wrong_width)
            else:
                record_batch = record_batch.filter(pa.array(~bad))
                self.num_malformed += int(bad.sum())
            rows_before += block.num_rows
            if record_batch.num_rows:
                yield record_batch
        if wrong_width and not self.skip_malformed:
            self._raise(*wrong_width[0])
        self.num_malformed += len(wrong_width)

    def _convert(self, block: pa.RecordBatch) -> tuple[pa.RecordBatch, np.ndarray]:
        n = block.num_rows
        labels, label_ok = _parse_labels(block.column(0))
        dense, dense_ok = _parse_integers(pa.concat_arrays(block.columns[1:1 + CRITEO_NUM_DENSE]))
        values, cat_ok, missing = _parse_hex(pa.concat_arrays(block.columns[1 + CRITEO_NUM_DENSE:]))
        ids = map_categorical(values.reshape(-1, n), np.array(self.num_embeddings)[:, None], self.mapping)
        ids[missing.reshape(-1, n)] = 0
        bad = ~(label_ok & dense_ok.reshape(-1, n).all(0) & cat_ok.reshape(-1, n).all(0))
        columns = [
            pa.array(labels.astype(np.int8)),
            pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1, n).T.ravel()), CRITEO_NUM_DENSE),
            *(pa.array(row) for row in ids.astype(np.int32)),
        ]
        return pa.RecordBatch.from_arrays(columns, schema=self.info.schema()), bad

    def _raise_first(
        self, block: pa.RecordBatch, bad: np.ndarray, rows_before: int, wrong_width: list[tuple[int, int]]
    ) -> None:
        # No line was dropped before this block (it would have raised), so up to the first dropped
        # line the block's row i sits on line rows_before + i + 1.
        first_bad = int(np.argmax(bad)) if bad.any() else None
        bad_line = rows_before + first_bad + 1 if first_bad is not None else math.inf
        if wrong_width and wrong_width[0][0] <= min(bad_line, rows_before + block.num_rows + 1):
            self._raise(*wrong_width[0])
        if first_bad is not None:
            fields = [column[first_bad].as_py() for column in block.columns]
            raise ValueError(f"{self.path}:{bad_line}: malformed line: {_describe(fields)}")

    def _raise(self, line: int, num_fields: int) -> None:
        raise ValueError(
            f"{self.path}:{line}: malformed line: {num_fields} tab-separated fields, expected {_NUM_FIELDS}"
        )


def preprocess(
    tsv_paths: Sequence[PathLike],
    out_dir: PathLike,
    num_embeddings_per_feature: Union[int, Sequence[int]],
    mapping: Mapping = "modulo",
    skip_malformed: bool = False,
) -> ClickDataInfo:
    """Convert Criteo TSV files into a preprocessed directory that `CriteoDataset` memory-maps.

    Each input becomes one part file, in order. All inputs are checked before any is read (missing:
    ``FileNotFoundError``; empty: ``ValueError``); ``out_dir`` must not exist and appears only once
    complete. Returns the metadata, whose ``num_malformed`` counts the lines skipped.

    Example::

        info = preprocess(["day_0", "day_1"], "criteo_pre", num_embeddings_per_feature=10_000_000)
        info.num_rows, info.num_malformed
    """
    if not tsv_paths:
        raise ValueError("preprocess needs at least one TSV file")
    readers = [
        CriteoTsvReader(path, num_embeddings_per_feature, mapping, skip_malformed) for path in tsv_paths
    ]
    with ClickDataWriter(out_dir, readers[0].info) as writer:
        rows = [writer.write_part(reader) for reader in readers]
        if sum(rows) == 0:
            raise ValueError(
                f"no valid lines in {[str(path) for path in tsv_paths]}: every line is malformed"
            )
        return writer.commit(num_malformed=sum(reader.num_malformed for reader in readers))


class CriteoDataset(ResumablePasses, IterableDataset):
    """Batches from a preprocessed click data directory (Criteo, or `materialize`'s synthetic data).

    The rows ``row_range`` (default: all) are cut into ``world_size`` equal contiguous slices, one
    per rank; each rank reads whole batches from the start of its slice, the same number on every
    rank (so no rank waits on a collective the others never reach). The rows left over at the end of
    each slice are dropped: at most ``batch_size - 1`` per rank, plus ``(stop - start) % world_size``.
    With ``shuffle``, each pass reads the batches in an order drawn from ``(seed, pass number)``;
    rows inside a batch stay together, so reads remain sequential. Files are memory-mapped, so a
    batch costs one copy of its rows.

    Args:
        path: the directory `preprocess` (or `materialize`) wrote.
        batch_size: rows per batch (per rank).
        row_range: ``(start, stop)`` global rows to read; default all.
        num_batches: batches per rank; default as many as the slice holds. More is an error.
        shuffle: read batches in a seeded random order, new every pass.
        seed: seeds the order.
        rank: this process's rank; with ``world_size`` left out, taken from ``torch.distributed``
            when it is initialised, else 0.
        world_size: number of ranks.

    Example::

        data = CriteoDataset("criteo_pre", batch_size=4096, shuffle=True, rank=0, world_size=2)
        batch = next(iter(data))
        batch.dense_features.shape, batch.sparse_features.keys()[:2]  # ([4096, 13], ['cat_0', 'cat_1'])
    """

    def __init__(
        self,
        path: PathLike,
        batch_size: int,
        row_range: Optional[tuple[int, int]] = None,
        num_batches: Optional[int] = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.path = Path(path)
        self.info = ClickDataInfo.load(self.path)
        start, stop = row_range if row_range is not None else (0, self.info.num_rows)
        if not 0 <= start <= stop <= self.info.num_rows:
            raise ValueError(
                f"row_range {row_range} is not inside the {self.info.num_rows} rows of {self.path}"
            )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = _rank_and_world_size(rank, world_size)
        rows_per_rank = (stop - start) // self.world_size
        available = rows_per_rank // batch_size
        if num_batches is not None and num_batches > available:
            raise ValueError(
                f"{num_batches} batches per rank requested from rows [{start}, {stop}) of {self.path}, but "
                f"{self.world_size} ranks with batch_size {batch_size} have only {available} each"
            )
        self.num_batches = available if num_batches is None else num_batches
        if self.num_batches < 1:
            raise ValueError(
                f"rows [{start}, {stop}) of {self.path} hold no full batch of {batch_size} rows for each of "
                f"{self.world_size} ranks"
            )
        self._first_row = start + self.rank * rows_per_rank
        self._file_starts = np.cumsum((0, *self.info.rows_per_file)).tolist()

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        order = np.arange(self.num_batches)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        order = order[self._take_start_batch():]
        self.epoch += 1
        worker = get_worker_info()
        first, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for index in order[first::step]:
            yield self._batch(self._first_row + int(index) * self.batch_size)

    @cached_property
    def _tables(self) -> list[pa.Table]:
        # Opened lazily, so that only paths travel to DataLoader workers; zero-copy from the mapping.
        return [
            pa.ipc.open_stream(pa.memory_map(str(self.path / name))).read_all() for name in self.info.files
        ]

    @cached_property
    def _lengths(self) -> torch.Tensor:
        return torch.from_numpy(np.repeat(np.array(self.info.hotness, dtype=np.int32), self.batch_size))

    def _rows(self, start: int) -> pa.Table:
        stop = start + self.batch_size
        pieces = []
        file = bisect_right(self._file_starts, start) - 1
        while start < stop:
            offset = start - self._file_starts[file]
            piece = self._tables[file].slice(offset, stop - start)
            pieces.append(piece)
            start += piece.num_rows
            file += 1
        return pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces)

    def _batch(self, start: int) -> Batch:
        rows = self._rows(start)
        # A copy: the mapped buffers are read-only, torch tensors are not.
        dense = pc.list_flatten(rows["dense"]).to_numpy().reshape(self.batch_size, -1).copy()
        sparse_columns = []
        for name, hotness in zip(self.info.feature_names, self.info.hotness):
            column = rows[name]
            sparse_columns.append((column if hotness == 1 else pc.list_flatten(column)).to_numpy())
        sparse = KeyedJaggedTensor(
            keys=list(self.info.feature_names),
            values=torch.from_numpy(np.concatenate(sparse_columns, dtype=np.int64)),
            lengths=self._lengths,
            stride=self.batch_size,
        )
        labels = torch.from_numpy(rows["label"].to_numpy().astype(np.float32))
        return Batch(dense_features=torch.from_numpy(dense), sparse_features=sparse, labels=labels)


def write_fake_criteo_tsv(
    path: PathLike, num_lines: int, seed: int = 0, malformed_lines: Sequence[int] = ()
) -> None:
    """Write ``num_lines`` lines of made-up data in the exact Criteo TSV format, for tests and demos.

    About 10 % of integer and 5 % of categorical fields are empty, ``int_1`` is sometimes negative
    (as in Criteo), categorical values repeat with a skew, and labels depend on them, so a model can
    learn something. The 1-based lines in ``malformed_lines`` are broken in turn in four ways: a
    missing last field, a non-integer ``int_0`` (``1.5``), a non-hex ``cat_0`` (``xyz!``), a label
    of ``2``.
    """
    rng = np.random.default_rng(seed)
    vocab_sizes = np.minimum(CRITEO_1TB_NUM_EMBEDDINGS, 1000)
    columns: dict[str, pa.Array] = {}
    logits = np.full(num_lines, -1.0)
    dense = rng.geometric(0.05, size=(CRITEO_NUM_DENSE, num_lines)) - 1
    dense[1] -= rng.integers(0, 3, num_lines) * (rng.random(num_lines) < 0.1)
    for name, values in zip(_DENSE_NAMES, dense):
        columns[name] = pa.array(values, mask=rng.random(num_lines) < 0.1)
    for name, size in zip(CRITEO_SPARSE_FEATURES, vocab_sizes):
        vocab = np.array([f"{value:08x}" for value in rng.integers(0, 2**32, size)])
        index = (size * rng.random(num_lines) ** 3).astype(np.int64)  # small indices far more frequent
        logits += rng.standard_normal(size)[index] * (1.5 / math.sqrt(len(CRITEO_SPARSE_FEATURES)))
        columns[name] = pa.array(vocab[index], mask=rng.random(num_lines) < 0.05)
    labels = (rng.random(num_lines) < 1 / (1 + np.exp(-logits))).astype(np.int8)
    table = pa.table({"label": labels, **columns})
    buffer = io.BytesIO()
    options = pa_csv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    pa_csv.write_csv(table, buffer, options)
    lines = buffer.getvalue().split(b"\n")[:-1]
    for kind, line_number in enumerate(malformed_lines):
        fields = lines[line_number - 1].split(b"\t")
        if kind % 4 == 0:
            fields = fields[:-1]
        elif kind % 4 == 1:
            fields[1] = b"1.5"
        elif kind % 4 == 2:
            fields[1 + CRITEO_NUM_DENSE] = b"xyz!"
        else:
            fields[0] = b"2"
        lines[line_number - 1] = b"\t".join(fields)
    Path(path).write_bytes(b"\n".join(lines) + b"\n")


def preprocess_main(argv: Optional[Sequence[str]] = None) -> int:
    """``lightning-dembed preprocess-criteo``: command-line front of `preprocess`.

    Returns 0 on success; bad input exits with status 1 and a one-line error.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-dembed preprocess-criteo",
        description="Convert Criteo TSV files (day_0..day_23, or Kaggle train.txt) into memory-mapped "
        "Arrow files.",
    )
    parser.add_argument("--input", nargs="+", required=True, help="TSV files, in order")
    parser.add_argument("--output", required=True, help="output directory (must not exist)")
    parser.add_argument(
        "--num-embeddings", nargs="+", type=int, required=True,
        help=f"table rows: one value for all {len(CRITEO_SPARSE_FEATURES)} features, or one per feature",
    )
    parser.add_argument("--mapping", choices=["modulo", "hash"], default="modulo",
                        help="how hex values become row ids (default: modulo)")
    parser.add_argument("--skip-malformed", action="store_true",
                        help="skip and count malformed lines instead of failing")
    args = parser.parse_args(argv)
    sizes = args.num_embeddings[0] if len(args.num_embeddings) == 1 else args.num_embeddings
    try:
        info = preprocess(args.input, args.output, sizes, args.mapping, args.skip_malformed)
    except (OSError, ValueError) as error:
        # The message names the file, line and fix; a traceback would only bury it.
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(f"wrote {info.num_rows} rows in {len(info.files)} files to {args.output}; "
          f"{info.num_malformed} malformed lines skipped")
    return 0
