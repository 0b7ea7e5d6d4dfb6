"""Logs of whitespace-separated integer ids, one reader per release format.

- pairs: `user item` per line (the SASRec/BERT4Rec releases), file order per user;
- lines: `user item item ...` per line (the S3-Rec release);
- movielens: `u.data` (tab) or `ratings.dat` (`::`): user, item, rating, unix time.

Each file is read as one string column (pyarrow) and split in bulk; locating a bad line
happens only on the error path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from seqrec.data.inputs import ARROW_BLOCK_SIZE, arrow_source, open_input
from seqrec.errors import InputError

# Columns of one log: users, items, and times (None: file order is time order).
Columns = tuple[np.ndarray, np.ndarray, np.ndarray | None]

INTEGER_PATTERN = r"^[+-]?[0-9]+$"
# A byte that never occurs in text logs: reading with it as the delimiter yields one column per line.
_WHOLE_LINE_DELIMITER = "\x1f"


def read_pairs(path: Path) -> Columns:
    tokens = _read_token_rows(path, width=(2, 2), names=("user", "item"))
    return tokens.column(0), tokens.column(1), None


def read_lines(path: Path) -> Columns:
    tokens = _read_token_rows(path, width=(2, None), names=("user", "item"))
    lengths = np.diff(tokens.offsets)
    is_item = np.ones(len(tokens.flat), dtype=bool)
    is_item[tokens.offsets[:-1]] = False
    users = np.repeat(tokens.column(0), lengths - 1)
    return users, tokens.flat[is_item], None


def read_movielens(path: Path) -> Columns:
    with open_input(path) as handle:
        first = handle.readline()
    pattern = "::" if b"::" in first else None
    tokens = _read_token_rows(path, width=(4, 4), names=("user", "item", "rating", "timestamp"), pattern=pattern)
    return tokens.column(0), tokens.column(1), tokens.column(3)


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
        read_options=pacsv.ReadOptions(column_names=["line"], block_size=ARROW_BLOCK_SIZE),
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
        is_integer = pc.match_substring_regex(flat, INTEGER_PATTERN).to_numpy(zero_copy_only=False)
        position = int(np.argmax(~is_integer))
        row = int(np.searchsorted(offsets, position, side="right") - 1)
        field = names[min(position - offsets[row], len(names) - 1)]
        raise InputError(
            path, f"{field} id {flat[position].as_py()!r} is not an integer", int(line_numbers[row])
        ) from None
