"""Reading interaction logs into columns: format detection and the one entry point, `read_log`.

Every reader is columnar (pyarrow + numpy): no Python object per interaction, so tens of
millions of rows read in seconds. Integer-id release formats are read by
`seqrec.data.text_logs`, named-column ones (csv, tsv, jsonl, parquet) by `seqrec.data.tables`.
Errors name the file, the physical line and the reason. Compressed files (`.gz`, `.bz2`,
`.xz`, `.zst`, `.lz4`, a one-file `.zip`) are read as what they hold (`seqrec.data.inputs`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seqrec.data.inputs import DECOMPRESSION_ERRORS, compression_of, content_name, corrupt_compressed, read_head
from seqrec.data.tables import ColumnSpec, read_table
from seqrec.data.text_logs import INTEGER_PATTERN, read_lines, read_movielens, read_pairs
from seqrec.errors import InputError

__all__ = ["FORMATS", "ColumnSpec", "InteractionLog", "check_readable", "detect_format", "factorize", "read_log"]

FORMATS = ("pairs", "lines", "movielens", "csv", "tsv", "jsonl", "parquet")
_TEXT_READERS = {"pairs": read_pairs, "lines": read_lines, "movielens": read_movielens}


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
        reader = _TEXT_READERS.get(fmt)
        users, items, times = reader(path) if reader is not None else read_table(path, fmt, columns)
    except DECOMPRESSION_ERRORS as exc:
        raise corrupt_compressed(path, exc) from exc
    if len(users) == 0:
        raise InputError(path, "no interactions found")
    return InteractionLog.from_columns(path, fmt, users, items, times)


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
    if all(re.match(INTEGER_PATTERN, token) for token in rows[0]):
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
