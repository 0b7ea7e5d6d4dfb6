"""The on-disk sample format of training shards: WebDataset tar files, one sample per user.

A sample is `<key>.seq.i32`: the training sequence as little-endian int32 item ids, oldest
first. The key `u000000042` is user index 42 (row 42 of users.tsv), so every sequence is
addressable. Tar members carry fixed metadata so the same input gives byte-identical shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from seqrec.errors import ShardError

SEQUENCE_FIELD = "seq.i32"
SHARD_PATTERN = "train-{:06d}.tar"
_KEY_PREFIX = "u"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    sequences: int
    interactions: int


def sample_key(user_index: int) -> str:
    return f"{_KEY_PREFIX}{user_index:09d}"


def user_index_of(key: str) -> int:
    if not key.startswith(_KEY_PREFIX) or not key[1:].isdigit():
        raise ShardError(f"sample key {key!r} is not a seqrec user key like 'u000000042'")
    return int(key[1:])


def decode_sequence(data: bytes, where: str) -> np.ndarray:
    if len(data) % 4:
        raise ShardError(f"{where}: sequence of {len(data)} bytes is not a whole number of int32 item ids")
    return np.frombuffer(data, dtype="<i4")


def write_train_shards(
    directory: Path,
    users: np.ndarray,
    offsets: np.ndarray,
    items: np.ndarray,
    shard_size: int,
    seed: int,
    show_progress: bool = False,
) -> list[ShardInfo]:
    """Write the sequences in a seeded random user order, `shard_size` sequences per shard.

    Shuffling users across shards keeps any ordering in the source (by signup date, by id)
    from turning into shard-level bias that a finite shuffle buffer cannot undo.
    """
    order = np.random.default_rng(seed).permutation(len(users))
    data = items.astype("<i4", copy=False)
    shards = []
    progress = tqdm(total=len(users), unit="seq", desc="writing shards", disable=not show_progress)
    for shard_index, start in enumerate(range(0, len(order), shard_size)):
        rows = order[start : start + shard_size]
        name = SHARD_PATTERN.format(shard_index)
        with open(directory / name, "wb") as handle:
            for row in rows.tolist():
                payload = data[offsets[row] : offsets[row + 1]].tobytes()
                handle.write(tar_member(f"{sample_key(int(users[row]))}.{SEQUENCE_FIELD}".encode(), payload))
            handle.write(_END_OF_ARCHIVE)
        interactions = int((offsets[rows + 1] - offsets[rows]).sum())
        shards.append(ShardInfo(name, len(rows), interactions))
        progress.update(len(rows))
    progress.close()
    return shards


def _header_template() -> tuple[bytearray, int]:
    header = bytearray(512)
    header[100:108] = b"0000444\0"  # mode r--r--r--
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[136:148] = b"00000000000\0"  # mtime 0: identical input gives identical bytes
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    return header, sum(header)


_HEADER, _HEADER_SUM = _header_template()
_END_OF_ARCHIVE = bytes(1024)


def tar_member(name: bytes, payload: bytes) -> bytes:
    """One POSIX ustar member. tarfile costs ~25 us a member; this costs a few, and it is the
    inner loop of writing millions of samples."""
    if len(name) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    size = b"%011o\0" % len(payload)
    header = _HEADER.copy()
    header[0 : len(name)] = name
    header[124:136] = size
    header[148:156] = b"%06o\0 " % (_HEADER_SUM + sum(name) + sum(size))
    return bytes(header) + payload + bytes(-len(payload) % 512)
