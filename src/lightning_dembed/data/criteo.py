"""Criteo click logs: TSV parsing and preprocessing into the click-data format.

Criteo 1TB day files (``day_0``..``day_23``) and the Kaggle ``train.txt`` share one format: per line
a 0/1 label, 13 integer features and 26 categorical features written as 32-bit hex strings,
tab-separated, any feature possibly empty. `CriteoTsvReader` parses one such file; `preprocess`
turns several into a click data directory (`lightning_dembed.data.click_format`: one Arrow part
file per input, plus ``metadata.json``), which `ClickDataset` memory-maps.
"""

from __future__ import annotations

import argparse
import io
import math
import re
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from lightning_dembed.data.click_format import ClickDataInfo, ClickDataWriter, PathLike

__all__ = [
    "CRITEO_1TB_NUM_EMBEDDINGS",
    "CRITEO_NUM_DENSE",
    "CRITEO_SPARSE_FEATURES",
    "CriteoTsvReader",
    "criteo_tables",
    "map_categorical",
    "preprocess",
    "preprocess_main",
    "write_fake_criteo_tsv",
]

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
_TSV_BLOCK_BYTES = 16 << 20
# A 20-digit integer would overflow int64; Criteo's never exceed a few digits.
_INTEGER = r"-?[0-9]{1,18}"
_HEX = r"[0-9a-fA-F]{1,8}"
_HEX_DIGIT = np.full(256, 255, dtype=np.uint8)
_HEX_DIGIT[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX_DIGIT[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX_DIGIT[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


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
    """Convert Criteo TSV files into a click data directory that `ClickDataset` memory-maps.

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
