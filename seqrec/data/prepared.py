"""A prepared dataset directory: its layout, and reading it back (meta, items, users, eval splits, shards)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from seqrec.data.shards import sample_key
from seqrec.data.split import EvalSet
from seqrec.data.stream import StreamOptions, sequence_dataset
from seqrec.errors import ShardError

FORMAT_VERSION = 1
META_FILE = "meta.json"
ITEMS_FILE = "items.tsv"
USERS_FILE = "users.tsv"
EVAL_FILES = {"valid": "valid.npz", "test": "test.npz"}


@dataclass
class PreparedDataset:
    root: Path
    meta: dict

    @classmethod
    def open(cls, root: str | Path) -> "PreparedDataset":
        root = Path(root)
        meta_path = root / META_FILE
        if not meta_path.is_file():
            raise ShardError(f"{root}: not a prepared dataset (no {META_FILE}); run `seqrec prepare` first")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise ShardError(f"{meta_path}: corrupt ({exc})") from exc
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ShardError(f"{meta_path}: format version {version!r}, this seqrec reads {FORMAT_VERSION}; re-run prepare --force")
        dataset = cls(root, meta)
        missing = [str(path) for path in dataset.shard_paths() if not path.is_file()]
        if missing:
            raise ShardError(f"{root}: missing shard files {missing}")
        return dataset

    @property
    def num_items(self) -> int:
        return int(self.meta["counts"]["items"])

    @property
    def num_train_sequences(self) -> int:
        return int(self.meta["counts"]["train_sequences"])

    def shard_paths(self) -> list[Path]:
        return [self.root / shard["name"] for shard in self.meta["shards"]]

    def shard_counts(self) -> dict[str, int]:
        """Shard path -> number of sequences, for the stream's integrity check."""
        return {str(self.root / shard["name"]): int(shard["sequences"]) for shard in self.meta["shards"]}

    def sequences(self, options: StreamOptions, rank: int = 0, world_size: int = 1, epoch: int = 0) -> wds.WebDataset:
        """The training sequences of one rank and epoch, each shard checked against its recorded count."""
        return sequence_dataset(self.shard_paths(), options, self.num_items, rank, world_size, epoch, self.shard_counts())

    def eval_set(self, split: str) -> EvalSet:
        if split not in EVAL_FILES:
            raise ShardError(f"unknown evaluation split {split!r}; choose one of {sorted(EVAL_FILES)}")
        path = self.root / EVAL_FILES[split]
        try:
            with np.load(path, allow_pickle=False) as arrays:
                return EvalSet(arrays["users"], arrays["offsets"], arrays["history"], arrays["targets"])
        except (OSError, KeyError, ValueError) as exc:
            raise ShardError(f"{path}: unreadable evaluation data ({exc})") from exc

    def items(self) -> tuple[list[str], list[str]]:
        """Original id and title of items 1..N (index 0 is item 1)."""
        rows = read_tsv(self.root / ITEMS_FILE, 3)
        return [row[1] for row in rows], [row[2] for row in rows]

    def user_history(self, original_user_id: str) -> list[str]:
        """The whole sequence of a user, as original item ids, oldest first: an evaluated user's
        test history and target, or a train-only user's training sequence (found by a pass over
        the shards)."""
        users = self.user_ids()
        try:
            row = users.index(original_user_id)
        except ValueError:
            raise ShardError(f"{self.root}: unknown user {original_user_id!r} (see {USERS_FILE})") from None
        test = self.eval_set("test")
        position = np.searchsorted(test.users, row)
        if position < len(test) and test.users[position] == row:
            items = [*test.history[test.offsets[position] : test.offsets[position + 1]].tolist(), int(test.targets[position])]
        else:
            items = self._training_sequence(row)
            if items is None:
                raise ShardError(f"{self.root}: user {original_user_id!r} has no sequence here (too few items, dropped by "
                                 f"short_users={self.meta['split']['short_users']})")
        originals = self.items()[0]
        return [originals[item - 1] for item in items]

    def _training_sequence(self, row: int) -> list[int] | None:
        key = sample_key(row)
        for sample in self.sequences(StreamOptions(max_len=10**9, shuffle_buffer=0)):
            if sample.key == key:
                return sample.items.tolist()
        return None

    def user_ids(self) -> list[str]:
        return [row[1] for row in read_tsv(self.root / USERS_FILE, 2)]


def read_tsv(path: Path, width: int) -> list[list[str]]:
    """Rows of a headed TSV written by `write_tsv`, each checked to have `width` fields."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()[1:]
    except OSError as exc:
        raise ShardError(f"{path}: cannot be read ({exc})") from exc
    rows = [line.split("\t") for line in lines]
    for number, row in enumerate(rows, start=2):
        if len(row) != width:
            raise ShardError(f"{path}:{number}: expected {width} tab-separated fields, got {len(row)}")
    return rows


def write_tsv(path: Path, header: tuple[str, ...], columns: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\t".join(header) + "\n")
        handle.writelines("\t".join(row) + "\n" for row in zip(*columns))
