"""Logs with named columns: CSV/TSV (a header line, or names from --columns), JSON lines and
Parquet. The user, item and time columns are named by the caller or found among common names;
string ids are kept as strings. Errors name the physical line (the row for Parquet).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from seqrec.data.inputs import ARROW_BLOCK_SIZE, arrow_source, first_undecodable_line, open_input
from seqrec.errors import InputError

USER_COLUMN_NAMES = ("user_id", "user", "userId", "userid", "reviewerID", "uid", "session_id")

# Amazon's 2023 reviews name both; parent_asin groups an item's variants and is the one its
# recommendation benchmarks use.
ITEM_COLUMN_NAMES = ("item_id", "item", "itemId", "itemid", "movieId", "movie_id", "parent_asin", "asin", "iid", "product_id")

TIME_COLUMN_NAMES = ("timestamp", "time", "ts", "unixReviewTime", "datetime", "date", "event_time")


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns of a CSV/TSV/JSON-lines/Parquet file hold the user, the item and (optionally)
    the time; `names` names the columns of a CSV/TSV without a header line."""

    user: str | None = None
    item: str | None = None
    time: str | None = None
    separator: str | None = None
    names: tuple[str, ...] | None = None


# An id column: integers as numpy, strings as Arrow (no Python object per row).
IdColumn = np.ndarray | pa.ChunkedArray


def read_table(path: Path, fmt: str, spec: ColumnSpec) -> tuple[IdColumn, IdColumn, np.ndarray | None]:
    """The user, item and time (None: file order) columns of a named-column log."""
    if spec.names is not None and fmt not in ("csv", "tsv"):
        raise InputError(path, f"column names (--columns) are for a csv/tsv without a header; {fmt} names its own")
    # How a row is found in the file for an error: "row" (Parquet), "line" (after a header line)
    # or "record" (one per non-blank line).
    if fmt == "parquet":
        table, where = _read_parquet(path), "row"
        user, item, time = _pick_columns(path, table.column_names, spec)
    elif fmt == "jsonl":
        table, (user, item, time) = _read_json_lines(path, spec)
        where = "record"
    else:
        table = _read_delimited(path, fmt, spec)
        where = "line" if spec.names is None else "record"
        user, item, time = _pick_columns(path, table.column_names, spec)
    wanted = [name for name in (user, item, time) if name is not None]
    table = table.select(wanted)
    for name in wanted:
        _reject_nulls(path, table.column(name), name, where)
    users = _id_column(table.column(user))
    items = _id_column(table.column(item))
    times = _time_column(path, table.column(time), time) if time is not None else None
    return users, items, times


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
                read_options=pajson.ReadOptions(block_size=ARROW_BLOCK_SIZE),
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
                    block_size=ARROW_BLOCK_SIZE, column_names=list(spec.names) if spec.names is not None else None
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
        return first_undecodable_line(path), "line is not valid UTF-8 text"
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
