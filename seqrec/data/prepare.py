"""`seqrec prepare`: an interaction log -> a prepared dataset directory (shards, eval data, items, meta).

The directory is built in a temporary sibling and renamed into place only when complete.
Re-running on unchanged input with unchanged options is a no-op unless forced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from seqrec import __version__
from seqrec.atomic import atomic_directory
from seqrec.data.formats import FORMATS, ColumnSpec, check_readable, read_log
from seqrec.data.prepared import EVAL_FILES, FORMAT_VERSION, ITEMS_FILE, META_FILE, USERS_FILE, write_tsv
from seqrec.data.sequences import FilterOptions, build_sequences
from seqrec.data.shards import SEQUENCE_FIELD, write_train_shards
from seqrec.data.split import MIN_EVAL_LENGTH, SHORT_USER_POLICIES, SPLIT_RULE, leave_one_out
from seqrec.data.titles import attach_titles, read_item_map, read_titles, sibling_titles_file
from seqrec.errors import ConfigError, SeqrecError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareOptions:
    source: Path
    out: Path
    format: str | None = None
    columns: ColumnSpec = field(default_factory=ColumnSpec)
    titles: Path | None = None
    item_map: Path | None = None
    filters: FilterOptions = field(default_factory=FilterOptions)
    short_users: str = "train"
    shard_size: int = 10_000
    seed: int = 0
    force: bool = False
    show_progress: bool = False

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.short_users not in SHORT_USER_POLICIES:
            raise ConfigError(f"short_users must be one of {SHORT_USER_POLICIES}, got {self.short_users!r}")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ConfigError(f"shard_size must be an integer >= 1, got {self.shard_size!r}")
        if self.item_map is not None and self.titles is None:
            raise ConfigError("item_map only maps ids for a titles file: pass titles too")

    def recipe(self) -> dict:
        """Everything besides the input bytes that decides the output."""
        return {
            "format": self.format,
            # Without `names` the recipe stays what it was before headerless files were read, so
            # datasets prepared then are still up to date.
            "columns": {key: value for key, value in asdict(self.columns).items() if not (key == "names" and value is None)},
            "filters": asdict(self.filters),
            "short_users": self.short_users,
            "shard_size": self.shard_size,
            "seed": self.seed,
        }


@dataclass
class PrepareResult:
    out: Path
    meta: dict
    skipped: bool


def prepare(options: PrepareOptions) -> PrepareResult:
    started = time.perf_counter()
    source = check_readable(options.source)
    titles_path = options.titles
    if titles_path is None and options.format in (None, "movielens"):
        titles_path = sibling_titles_file(source)
    inputs = {"source": _describe_file(source)}
    if titles_path is not None:
        inputs["titles"] = _describe_file(titles_path)
    if options.item_map is not None:
        inputs["item_map"] = _describe_file(options.item_map)
    fingerprint = hashlib.sha256(json.dumps([inputs, options.recipe(), FORMAT_VERSION], sort_keys=True).encode()).hexdigest()

    existing = _existing_fingerprint(options.out)
    if options.out.exists() and not options.force:
        if existing == fingerprint:
            log.info("%s is up to date with %s; nothing to do (use --force to rebuild)", options.out, source)
            return PrepareResult(options.out, json.loads((options.out / META_FILE).read_text()), skipped=True)
        what = "was prepared from other input or options" if existing else "exists and is not a prepared dataset"
        raise SeqrecError(f"{options.out}: {what}; pass --force to replace it, or choose another --out")

    interactions = read_log(source, options.format, options.columns)
    sequences = build_sequences(interactions, options.filters)
    split = leave_one_out(sequences, options.short_users)
    titles = [""] * sequences.num_items
    if titles_path is not None:
        item_map = read_item_map(options.item_map) if options.item_map is not None else None
        titles = attach_titles(sequences.item_ids, read_titles(titles_path), item_map)

    with atomic_directory(options.out, replace=options.force) as staging:
        shards = write_train_shards(
            staging, split.train_users, split.train_offsets, split.train_items,
            options.shard_size, options.seed, options.show_progress,
        )
        for name, eval_set in (("valid", split.valid), ("test", split.test)):
            np.savez(staging / EVAL_FILES[name], **eval_set.arrays())
        write_tsv(
            staging / ITEMS_FILE,
            ("item_id", "original_id", "title"),
            [[str(k) for k in range(1, sequences.num_items + 1)], [str(i) for i in sequences.item_ids.tolist()], titles],
        )
        write_tsv(
            staging / USERS_FILE,
            ("user_index", "original_id"),
            [[str(k) for k in range(sequences.num_users)], [str(u) for u in sequences.user_ids.tolist()]],
        )
        lengths = sequences.lengths
        meta = {
            "format_version": FORMAT_VERSION,
            "seqrec_version": __version__,
            "fingerprint": fingerprint,
            "source": {**inputs, "format": interactions.format},
            "options": options.recipe(),
            "counts": {
                "users": sequences.num_users,
                "items": sequences.num_items,
                "interactions": int(len(sequences.items)),
                "raw_interactions": len(interactions),
                "removed_consecutive_repeats": sequences.removed_repeats,
                "removed_by_core_filter": sequences.removed_by_core,
                "evaluated_users": len(split.test),
                "train_only_users": split.train_only_users,
                "dropped_users": split.dropped_users,
                "train_sequences": len(split.train_users),
                "train_interactions": int(len(split.train_items)),
                "items_with_title": sum(1 for title in titles if title),
            },
            "sequence_length": {
                "min": int(lengths.min()),
                "max": int(lengths.max()),
                "mean": round(float(lengths.mean()), 3),
                "median": float(np.median(lengths)),
            },
            "split": {"rule": SPLIT_RULE, "min_eval_length": MIN_EVAL_LENGTH, "short_users": options.short_users},
            "sample_format": {"field": SEQUENCE_FIELD, "dtype": "<i4", "key": "u%09d = row of users.tsv"},
            "shards": [asdict(shard) for shard in shards],
            "files": {"items": ITEMS_FILE, "users": USERS_FILE, **EVAL_FILES},
            "seconds": round(time.perf_counter() - started, 3),
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return PrepareResult(options.out, meta, skipped=False)


def _describe_file(path: Path) -> dict:
    path = check_readable(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _existing_fingerprint(out: Path) -> str | None:
    try:
        return json.loads((out / META_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
