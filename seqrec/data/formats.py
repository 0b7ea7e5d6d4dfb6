"""Reading interaction logs into columns, one reader per input format.

Every reader is columnar (pyarrow + numpy): no Python object per interaction, so tens of
millions of rows read in seconds. Errors name the file, the physical line and the reason;
locating the line happens only on the error path. Compressed files (`.gz`, `.bz2`, `.xz`,
`.zst`, `.lz4`, a one-file `.zip`) are read as what they hold (`seqrec.data.inputs`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from seqrec.data.inputs import (
    DECOMPRESSION_ERRORS, arrow_source, compression_of, content_name, corrupt_compressed, open_input, read_head,
)
from seqrec.errors import InputError

FORMATS = ("pairs", "lines", "movielens", "csv", "tsv", "jsonl", "parquet")

USER_COLUMN_NAMES = ("user_id", "user", "userId", "userid", "reviewerID", "uid", "session_id")
# Amazon's 2023 reviews name both; parent_asin groups an item's variants and is the one its
# recommendation benchmarks use.
ITEM_COLUMN_NAMES = ("item_id", "item", "itemId", "itemid", "movieId", "movie_id", "parent_asin", "asin", "iid", "product_id")
TIME_COLUMN_NAMES = ("timestamp", "time", "ts", "unixReviewTime", "datetime", "date", "event_time")

_INTEGER = r"^[+-]?[0-9]+$"
# A byte that never occurs in text logs: reading with it as the delimiter yields one column per line.
_WHOLE_LINE_DELIMITER = "\x1f"
_BLOCK_SIZE = 16 << 20


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns of a CSV/TSV/JSON-lines/Parquet file hold the user, the item and (optionally)
    the time; `names` names the columns of a CSV/TSV without a header line."""

    user: str | None = None
    item: str | None = None
    time: str | None = None
    separator: str | None = None
    names: tuple[str, ...] | None = None


@dataclass
class InteractionLog:
    """One row per interaction, in file order.

    Users and items are codes into `user_ids` / `item_ids`, the file's own ids sorted
    (numerically for integer ids, lexicographically for strings), so code order is id order.
    """

    path: Path
    format: str
    users: np.ndarray
    user_ids: np.ndarray
    items: np.ndarray
    item_ids: np.ndarray
    timestamps: np.ndarray | None

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def from_columns(cls, path: Path, fmt: str, users, items, timestamps) -> "InteractionLog":
        user_codes, user_ids = factorize(users)
        item_codes, item_ids = factorize(items)
        return cls(path, fmt, user_codes, user_ids, item_codes, item_ids, timestamps)


def factorize(values: np.ndarray | pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Codes (int64) and the sorted unique values; Python objects only for unique string ids."""
    if isinstance(values, np.ndarray):
        low, high = (int(values.min()), int(values.max())) if len(values) else (0, -1)
        if high - low < 4 * len(values) + 1024:
            # Dense id ranges (the common case) map through a lookup table in O(n), no sort.
            present = np.zeros(high - low + 1, dtype=bool)
            present[values - low] = True
            code_of = np.cumsum(present) - 1
            return code_of[values - low], np.flatnonzero(present) + low
        uniques, codes = np.unique(values, return_inverse=True)
        return codes.astype(np.int64, copy=False), uniques
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    encoded = pc.dictionary_encode(values)
    order = pc.array_sort_indices(encoded.dictionary).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    codes = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    return codes, encoded.dictionary.take(pa.array(order)).to_numpy(zero_copy_only=False).astype(str)


def check_readable(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():
        raise InputError(path, "not a regular file")
    try:
        with open(path, "rb") as handle:
            first = handle.read(1)
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if not first:
        raise InputError(path, "file is empty: no interactions")
    return path


def read_log(path: str | os.PathLike, fmt: str | None = None, columns: ColumnSpec = ColumnSpec()) -> InteractionLog:
    path = check_readable(path)
    try:
        fmt = fmt or detect_format(path)
        if fmt not in FORMATS:
            raise InputError(path, f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if fmt == "parquet" and compression_of(path) is not None:
            raise InputError(path, "a Parquet file compresses its own pages; pass it unpacked")
        if fmt == "pairs":
            tokens = _read_token_rows(path, width=(2, 2), names=("user", "item"))
            log = InteractionLog.from_columns(path, fmt, tokens.column(0), tokens.column(1), None)
        elif fmt == "lines":
            log = _read_lines(path)
        elif fmt == "movielens":
            log = _read_movielens(path)
        else:
            log = _read_table(path, fmt, columns)
    except DECOMPRESSION_ERRORS as exc:
        raise corrupt_compressed(path, exc) from exc
    if len(log) == 0:
        raise InputError(path, "no interactions found")
    return log


def detect_format(path: Path) -> str:
    """Guess the format from the name and the first lines; ambiguous files must be named with --format."""
    name = content_name(path)
    suffix = Path(name).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    head = read_head(path).decode("utf-8", errors="replace")
    lines = [line for line in head.splitlines()[:50] if line.strip()]
    if not lines:
        raise InputError(path, "file has no data lines")
    if name in ("u.data", "ratings.dat") or "::" in lines[0]:
        return "movielens"
    if suffix in (".jsonl", ".ndjson", ".json") or lines[0].lstrip().startswith("{"):
        return "jsonl"
    rows = [line.split() for line in lines]
    # A first line of integers means no header: an integer format, classified by field counts
    # (a bad token further down is then reported with its line by the reader, not guessed about here).
    if all(re.match(_INTEGER, token) for token in rows[0]):
        widths = {len(row) for row in rows}
        if widths == {2}:
            return "pairs"
        if widths == {4} and "\t" in lines[0]:
            return "movielens"
        if len(widths) > 1 and min(widths) >= 2:
            return "lines"
        raise InputError(path, f"cannot tell the format of rows with {sorted(widths)} integer fields; pass --format")
    if suffix == ".csv" or ("," in lines[0] and "\t" not in lines[0]):
        return "csv"
    if suffix == ".tsv" or "\t" in lines[0]:
        return "tsv"
    raise InputError(path, "cannot tell the format (no header with separators, not integer ids); pass --format")


class _TokenRows:
    """Whitespace- or pattern-split lines as a list array, with each row's physical line number."""

    def __init__(self, path: Path, lists: pa.ListArray, line_numbers: np.ndarray, names: tuple[str, ...]):
        self.path = path
        self.lists = lists
        self.line_numbers = line_numbers
        self.names = names
        self.offsets = lists.offsets.to_numpy()
        self.flat = _to_int64(path, lists.flatten(), self.offsets, line_numbers, names)

    def column(self, index: int) -> np.ndarray:
        return self.flat[self.offsets[:-1] + index]


def _read_whole_lines(path: Path) -> tuple[pa.Array, np.ndarray]:
    """Every non-blank line as a string, plus its 1-based line number."""
    try:
        with arrow_source(path) as source:
            table = _read_whole_line_table(source)
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        line, reason = _scan_for_unreadable_line(path)
        raise InputError(path, reason or f"unreadable ({exc})", line) from exc
    column = table.column("line").combine_chunks()
    nonblank = pc.not_equal(pc.utf8_trim_whitespace(column), "").to_numpy(zero_copy_only=False)
    line_numbers = np.flatnonzero(nonblank) + 1
    return column.filter(pa.array(nonblank)), line_numbers


def _read_whole_line_table(source) -> pa.Table:
    return pacsv.read_csv(
        source,
        read_options=pacsv.ReadOptions(column_names=["line"], block_size=_BLOCK_SIZE),
        parse_options=pacsv.ParseOptions(
            delimiter=_WHOLE_LINE_DELIMITER, quote_char=False, escape_char=False, ignore_empty_lines=False
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={"line": pa.string()}, strings_can_be_null=False, quoted_strings_can_be_null=False
        ),
    )


def _scan_for_unreadable_line(path: Path) -> tuple[int | None, str | None]:
    with open_input(path) as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                return number, "line is not valid UTF-8 text"
            if _WHOLE_LINE_DELIMITER in text:
                return number, "line contains a control character (0x1f)"
    return None, None


def _read_token_rows(
    path: Path, width: tuple[int, int | None], names: tuple[str, ...], pattern: str | None = None
) -> _TokenRows:
    lines, line_numbers = _read_whole_lines(path)
    lists = pc.utf8_split_whitespace(lines) if pattern is None else pc.split_pattern(pc.utf8_trim_whitespace(lines), pattern)
    lengths = pc.list_value_length(lists).to_numpy()
    low, high = width
    bad = (lengths < low) | ((lengths > high) if high is not None else False)
    if bad.any():
        row = int(np.argmax(bad))
        expected = f"{low}" if low == high else (f"at least {low}" if high is None else f"{low} to {high}")
        raise InputError(
            path, f"malformed row: expected {expected} fields ({' '.join(names)}), got {lengths[row]}", int(line_numbers[row])
        )
    return _TokenRows(path, lists, line_numbers, names)


def _to_int64(path: Path, flat: pa.Array, offsets: np.ndarray, line_numbers: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    try:
        return pc.cast(flat, pa.int64()).to_numpy()
    except pa.ArrowInvalid:
        is_integer = pc.match_substring_regex(flat, _INTEGER).to_numpy(zero_copy_only=False)
        position = int(np.argmax(~is_integer))
        row = int(np.searchsorted(offsets, position, side="right") - 1)
        field = names[min(position - offsets[row], len(names) - 1)]
        raise InputError(
            path, f"{field} id {flat[position].as_py()!r} is not an integer", int(line_numbers[row])
        ) from None


def _read_lines(path: Path) -> InteractionLog:
    tokens = _read_token_rows(path, width=(2, None), names=("user", "item"))
    lengths = np.diff(tokens.offsets)
    is_item = np.ones(len(tokens.flat), dtype=bool)
    is_item[tokens.offsets[:-1]] = False
    users = np.repeat(tokens.column(0), lengths - 1)
    return InteractionLog.from_columns(path, "lines", users, tokens.flat[is_item], None)


def _read_movielens(path: Path) -> InteractionLog:
    with open_input(path) as handle:
        first = handle.readline()
    pattern = "::" if b"::" in first else None
    tokens = _read_token_rows(path, width=(4, 4), names=("user", "item", "rating", "timestamp"), pattern=pattern)
    return InteractionLog.from_columns(path, "movielens", tokens.column(0), tokens.column(1), tokens.column(3))


def _read_table(path: Path, fmt: str, spec: ColumnSpec) -> InteractionLog:
    if spec.names is not None and fmt not in ("csv", "tsv"):
        raise InputError(path, f"column names (--columns) are for a csv/tsv without a header; {fmt} names its own")
    if fmt == "parquet":
        table, where = _read_parquet(path), "row"
        user, item, time = _pick_columns(path, table.column_names, spec)
    elif fmt == "jsonl":
        (table, (user, item, time)), where = _read_json_lines(path, spec), "record"
    else:
        table, where = _read_delimited(path, fmt, spec), "line" if spec.names is None else "record"
        user, item, time = _pick_columns(path, table.column_names, spec)
    wanted = [name for name in (user, item, time) if name is not None]
    table = table.select(wanted)
    for name in wanted:
        _reject_nulls(path, table.column(name), name, where)
    users = _id_column(table.column(user))
    items = _id_column(table.column(item))
    times = _time_column(path, table.column(time), time) if time is not None else None
    return InteractionLog.from_columns(path, fmt, users, items, times)


def _pick_columns(path: Path, names: list[str], spec: ColumnSpec) -> tuple[str, str, str | None]:
    user = _pick_column(path, names, spec.user, USER_COLUMN_NAMES, "user", "--user-col")
    item = _pick_column(path, names, spec.item, ITEM_COLUMN_NAMES, "item", "--item-col")
    time = _pick_column(path, names, spec.time, TIME_COLUMN_NAMES, "time", "--time-col", required=False)
    return user, item, time


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(path, f"not a readable Parquet file ({exc})") from exc


def _read_json_lines(path: Path, spec: ColumnSpec) -> tuple[pa.Table, tuple[str, str, str | None]]:
    """One JSON object per line (Amazon reviews: reviewerID, asin, unixReviewTime, ...).

    Only the chosen fields are converted, typed as in the first record, so other fields whose
    shape changes between records (Amazon's `style`, `image`) do not matter.
    """
    first_line, first = _first_json_record(path)
    columns = _pick_columns(path, list(first), spec)
    schema = pa.schema(
        [(name, _json_field_type(path, first_line, name, first[name], name == columns[2])) for name in columns if name is not None]
    )
    try:
        with arrow_source(path) as source:
            table = pajson.read_json(
                source,
                read_options=pajson.ReadOptions(block_size=_BLOCK_SIZE),
                parse_options=pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
            )
    except pa.ArrowInvalid as exc:
        line, reason = _scan_json_lines(path, schema)
        raise InputError(path, reason or f"cannot be parsed as JSON lines ({exc})", line) from exc
    return table, columns


def _first_json_record(path: Path) -> tuple[int, dict]:
    with open_input(path) as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                return number, _json_object(path, number, raw)
    raise InputError(path, "no JSON records")


def _json_object(path: Path, number: int, raw: bytes) -> dict:
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})", number) from None
    if not isinstance(record, dict):
        raise InputError(path, f"expected one JSON object per line, got a {type(record).__name__}", number)
    return record


_JSON_ID_TYPES = {str: pa.string(), int: pa.int64()}


def _json_field_type(path: Path, number: int, name: str, value, is_time: bool) -> pa.DataType:
    kind = type(value)
    if kind in _JSON_ID_TYPES:
        return _JSON_ID_TYPES[kind]
    if is_time and kind is float:
        return pa.float64()
    what = "a time (number or ISO-8601 string)" if is_time else "an id (string or integer)"
    raise InputError(path, f"field {name!r} is {json.dumps(value)[:40]}, not {what}", number)


def _scan_json_lines(path: Path, schema: pa.Schema) -> tuple[int | None, str | None]:
    """Error path only: the first line that is not a JSON object or whose chosen field changes type."""
    expected = {field.name: field.type for field in schema}
    with open_input(path) as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = _json_object(path, number, raw)
            except InputError as exc:
                return exc.line, exc.reason
            for name, kind in expected.items():
                value = record.get(name)
                if value is None:
                    continue
                if isinstance(value, bool) or not (
                    (kind == pa.string() and isinstance(value, str))
                    or (kind == pa.int64() and isinstance(value, int))
                    or (kind == pa.float64() and isinstance(value, (int, float)))
                ):
                    return number, f"field {name!r} is {json.dumps(value)[:40]}, but {kind} in the first record"
    return None, None


def _read_delimited(path: Path, fmt: str, spec: ColumnSpec) -> pa.Table:
    delimiter = spec.separator or ("," if fmt == "csv" else "\t")
    if len(delimiter) != 1:
        raise InputError(path, f"separator must be one character, got {delimiter!r}")
    try:
        with arrow_source(path) as source:
            return pacsv.read_csv(
                source,
                read_options=pacsv.ReadOptions(
                    block_size=_BLOCK_SIZE, column_names=list(spec.names) if spec.names is not None else None
                ),
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                # An empty id is missing, not a user or item named "".
                convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
            )
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        line, reason = _scan_delimited(path, delimiter, spec.names)
        raise InputError(path, reason or f"cannot be parsed as {fmt} ({exc})", line) from exc


def _scan_delimited(path: Path, delimiter: str, names: tuple[str, ...] | None) -> tuple[int | None, str | None]:
    """Error path only: find the first row whose field count differs from the header's."""
    try:
        with open_input(path) as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header, like = (next(reader, []), "the header") if names is None else (names, "--columns")
            for row in reader:
                if row and len(row) != len(header):
                    return reader.line_num, f"malformed row: expected {len(header)} fields like {like}, got {len(row)}"
    except UnicodeDecodeError:
        line, reason = _scan_for_unreadable_line(path)
        return line, reason
    return None, None


def _pick_column(
    path: Path, names: list[str], chosen: str | None, candidates: tuple[str, ...], role: str, flag: str, required: bool = True
) -> str | None:
    if chosen is not None:
        if chosen not in names:
            raise InputError(path, f"{role} column {chosen!r} not found; columns are {names}")
        return chosen
    for candidate in candidates:
        if candidate in names:
            return candidate
    if required:
        raise InputError(
            path,
            f"missing {role} column: none of {list(candidates)}; columns are {names}; name it with {flag}"
            " (a csv/tsv without a header line: name its columns with --columns)",
        )
    return None


def _reject_nulls(path: Path, column: pa.ChunkedArray, name: str, where: str) -> None:
    """`where`: how rows map to the file: "line" (after a header line), "record" (one per line) or "row"."""
    if column.null_count == 0:
        return
    row = int(np.argmax(pc.is_null(column).to_numpy(zero_copy_only=False)))
    if where == "row":
        raise InputError(path, f"row {row}: empty value in column {name!r}")
    if where == "record":
        raise InputError(path, f"missing or null {name!r}", _physical_line_of_row(path, row, header=False))
    raise InputError(path, f"empty value in column {name!r}", _physical_line_of_row(path, row))


def _physical_line_of_row(path: Path, row: int, header: bool = True) -> int | None:
    """Error path only: the 1-based line of data row `row` (after the header, skipping blank lines)."""
    with open_input(path) as handle:
        seen = -1
        for number, raw in enumerate(handle, start=1):
            if (header and number == 1) or not raw.strip():
                continue
            seen += 1
            if seen == row:
                return number
    return None


def _id_column(column: pa.ChunkedArray) -> np.ndarray | pa.ChunkedArray:
    if pa.types.is_integer(column.type):
        return column.to_numpy().astype(np.int64, copy=False)
    return pc.cast(column, pa.string())


def _time_column(path: Path, column: pa.ChunkedArray, name: str) -> np.ndarray:
    kind = column.type
    if pa.types.is_integer(kind):
        return column.to_numpy().astype(np.int64, copy=False)
    if pa.types.is_floating(kind):
        return column.to_numpy().astype(np.float64, copy=False)
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        return pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64()).to_numpy()
    try:
        return pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(path, f"time column {name!r} is neither numeric nor an ISO-8601 date ({exc})") from exc
