"""Item titles from side files (MovieLens `u.item` / `movies.dat`, or `id<TAB>title`), optionally
through an id map (e.g. SASRec's `sas_to_original_items.txt`: `id_in_log original_id`).

These files have one line per item, never per interaction, so plain Python is fine here.
They may be compressed like the logs (`seqrec.data.inputs`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from seqrec.data.formats import check_readable
from seqrec.data.inputs import compression_of, content_name, open_input
from seqrec.errors import InputError


def read_titles(path: Path) -> dict[str, str]:
    """Original item id -> title."""
    path = check_readable(path)
    with open_input(path) as handle:
        raw = handle.read()
    is_u_item = content_name(path) == "u.item"
    # MovieLens side files are latin-1; anything else is expected in UTF-8.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    titles: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if "::" in line:
            fields = line.split("::")
        elif "|" in line and is_u_item:
            fields = line.split("|")
        else:
            fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip():
            raise InputError(path, "expected 'item_id::title', 'item_id|title|...' or 'item_id<TAB>title'", number)
        titles[fields[0].strip()] = " ".join(fields[1].split())
    return titles


def read_item_map(path: Path) -> dict[str, str]:
    """Id in the interaction log -> id used by the titles file."""
    path = check_readable(path)
    mapping: dict[str, str] = {}
    with open_input(path) as raw, io.TextIOWrapper(raw, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise InputError(path, f"expected 2 fields 'log_id original_id', got {len(fields)}", number)
            mapping[fields[0]] = fields[1]
    return mapping


def attach_titles(item_ids: np.ndarray, titles: dict[str, str], item_map: dict[str, str] | None) -> list[str]:
    """Title of each item ('' when unknown)."""
    keys = [str(item) for item in item_ids.tolist()]
    if item_map is not None:
        keys = [item_map.get(key, "") for key in keys]
    return [titles.get(key, "") for key in keys]


def sibling_titles_file(source: Path) -> Path | None:
    """MovieLens releases keep titles next to the ratings: u.data -> u.item, ratings.dat -> movies.dat."""
    candidate = {"u.data": "u.item", "ratings.dat": "movies.dat"}.get(content_name(source))
    if candidate is None:
        return None
    # A compressed release may keep its titles compressed alike (u.data.gz -> u.item.gz).
    compression = compression_of(source)
    for name in [candidate, candidate + compression] if compression else [candidate]:
        if (source.parent / name).is_file():
            return source.parent / name
    return None
