"""Streaming training sequences from WebDataset shards.

Shards are split first by rank (node split), then by DataLoader worker; every rank applies
the same seeded shard permutation per epoch, so the parts are disjoint and together cover
every shard exactly once. Inside a worker a seeded shuffle buffer mixes sequences.
Sequences longer than `max_len` keep their most recent items, or (with `windows`) are cut into
consecutive windows of `max_len`, newest first, each its own sample.

With `prefix_prob`, that share of the samples is first cut to a random prefix of the whole
history (each epoch anew, seeded by seed, epoch, rank and worker, so a resumed epoch replays
the same cuts); the newest `max_len` items before the cut are kept. The next-item target then
ranges over the whole history instead of repeating each user's last item, and because the cut
happens before length bucketing, shorter rows cost fewer tokens.
"""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from seqrec.config import WORKER_START_METHODS
from seqrec.data.sequences import right_pad
from seqrec.data.shards import SEQUENCE_FIELD, decode_sequence
from seqrec.errors import ConfigError, ShardError


@dataclass(frozen=True)
class StreamOptions:
    max_len: int
    shuffle_buffer: int = 2_000
    seed: int = 0
    pad_multiple: int = 8
    # Batches are cut from a pool of this many batches' worth of samples sorted by length, so
    # short sequences are not padded to a long neighbour's length (on Beauty, ~6x fewer tokens).
    bucket_pool: int = 32
    windows: bool = False
    prefix_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.max_len < 2:
            raise ConfigError(f"max_len must be >= 2, got {self.max_len!r}")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer!r}")
        if self.pad_multiple < 1:
            raise ConfigError(f"pad_multiple must be >= 1, got {self.pad_multiple!r}")
        if self.bucket_pool < 1:
            raise ConfigError(f"bucket_pool must be >= 1 (1 disables length bucketing), got {self.bucket_pool!r}")
        if not 0 <= self.prefix_prob <= 1:
            raise ConfigError(f"prefix_prob must be in [0, 1], got {self.prefix_prob!r}")


@dataclass(frozen=True)
class SequenceSample:
    key: str
    items: np.ndarray  # int32, oldest first, at most max_len
    url: str = ""


@dataclass
class SequenceBatch:
    keys: list[str]
    items: torch.Tensor  # int64 [batch, length], right-padded with 0
    lengths: torch.Tensor  # int64 [batch]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SequenceBatch":
        return SequenceBatch(
            self.keys, self.items.to(device, non_blocking=non_blocking), self.lengths.to(device, non_blocking=non_blocking)
        )

    def pin_memory(self) -> "SequenceBatch":
        return SequenceBatch(self.keys, self.items.pin_memory(), self.lengths.pin_memory())


def shards_for_rank(shards: Sequence[str | Path], rank: int, world_size: int, seed: int, epoch: int) -> list[str]:
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world size {world_size}")
    urls = [str(shard) for shard in shards]
    random.Random(seed * 1_000_003 + epoch).shuffle(urls)
    return urls[rank::world_size]


def sequence_dataset(
    shards: Sequence[str | Path],
    options: StreamOptions,
    num_items: int,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    expected_counts: Mapping[str, int] | None = None,
) -> wds.WebDataset:
    """An IterableDataset of SequenceSample for one rank and one epoch.

    With `expected_counts` (shard path -> sequences, from meta.json) every shard must yield
    exactly that many samples: tar readers take a cut-off archive for a short one, silently.
    """
    mine = shards_for_rank(shards, rank, world_size, options.seed, epoch)
    dataset = wds.WebDataset(
        mine,
        shardshuffle=False,
        nodesplitter=None,
        workersplitter=wds.split_by_worker,
        handler=_raise_shard_error,
        # More workers than shards is legitimate: such a worker simply yields nothing.
        empty_check=False,
    )
    dataset = dataset.map(partial(_decode, num_items=num_items))
    if expected_counts is not None:
        expected = {str(url): count for url, count in expected_counts.items()}
        dataset = dataset.compose(partial(_verify_counts, shards=mine, expected=expected))
    cuts = partial(_random_prefixes, prefix_prob=options.prefix_prob, seed=(options.seed, epoch, rank))
    if options.windows:
        # Cut inside each window (cutting the history first would change how many windows, and
        # so batches, an epoch has: every rank must know its step count in advance).
        dataset = dataset.compose(partial(_windows, max_len=options.max_len))
        if options.prefix_prob > 0:
            dataset = dataset.compose(cuts)
    else:
        if options.prefix_prob > 0:
            dataset = dataset.compose(cuts)
        dataset = dataset.map(partial(_keep_recent, max_len=options.max_len))
    if options.shuffle_buffer > 1:
        dataset = dataset.compose(partial(_shuffle, size=options.shuffle_buffer, seed=(options.seed, epoch, rank)))
    return dataset


def collate(samples: Sequence[SequenceSample], pad_multiple: int = 8, max_len: int | None = None) -> SequenceBatch:
    """Right-pad to the longest sequence, rounded up to `pad_multiple` but never past `max_len`
    (the model's position table ends there), in one scatter."""
    lengths = np.fromiter((len(sample.items) for sample in samples), dtype=np.int64, count=len(samples))
    width = int(-(-max(int(lengths.max()), 1) // pad_multiple) * pad_multiple)
    if max_len is not None:
        width = max(min(width, max_len), int(lengths.max()))
    padded = right_pad(np.concatenate([sample.items for sample in samples]), lengths, width)
    return SequenceBatch([sample.key for sample in samples], torch.from_numpy(padded), torch.from_numpy(lengths))


def worker_context(method: str) -> multiprocessing.context.BaseContext:
    """How reader workers are started. The training loop builds a new DataLoader every epoch (shard
    order and prefix cuts change), so a forked worker is a copy of the full-grown trainer, and
    every page the trainer writes while the worker lives (weights, optimiser state, reused
    activation buffers) is duplicated: on Beauty at batch 512 the third epoch's worker held
    3.2 GB of its own beside a 5.0 GB trainer (bench/results/worker_memory.md), and two runs
    side by side exhausted a 24 GiB machine. Workers forked from a forkserver (started once per
    process, with this module preloaded) held 22 MB and reach their first batch as fast as a
    fork; forking a multi-threaded trainer can also deadlock."""
    if method not in WORKER_START_METHODS:
        raise ConfigError(f"data.worker_start: must be one of {WORKER_START_METHODS}, got {method!r}")
    if method not in multiprocessing.get_all_start_methods():
        raise ConfigError(f"data.worker_start: {method!r} is not available on this platform; use one of {multiprocessing.get_all_start_methods()}")
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        # Takes effect when the server starts (the first worker of the process); __main__ first,
        # so that workers do not each import the entry script again.
        context.set_forkserver_preload(["__main__", __name__])
    return context


def sequence_loader(dataset: wds.WebDataset, options: StreamOptions, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                    worker_start: str = "forkserver") -> DataLoader:
    """Batches are formed inside the workers (length-bucketed), so the DataLoader does not batch again."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}")
    context = worker_context(worker_start) if num_workers > 0 else None
    batches = dataset.compose(partial(_length_bucketed, batch_size=batch_size, pool=options.bucket_pool, seed=options.seed))
    batches = batches.map(partial(collate, pad_multiple=options.pad_multiple, max_len=options.max_len))
    # A private generator: creating the iterator must not draw from the global torch RNG, whose
    # state a resumed run restores (dropout) and expects untouched by data loading.
    return DataLoader(
        batches, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, generator=torch.Generator().manual_seed(options.seed),
        multiprocessing_context=context,
    )


def batches_per_rank(
    sample_counts: Mapping[str, int], options: StreamOptions, rank: int, world_size: int, epoch: int, batch_size: int, num_workers: int
) -> int:
    """Batches `sequence_loader` yields for one rank and epoch: each worker cuts its own samples
    into batches, the last one short."""
    mine = shards_for_rank(list(sample_counts), rank, world_size, options.seed, epoch)
    workers = max(num_workers, 1)
    return sum(-(-sum(sample_counts[url] for url in mine[worker::workers]) // batch_size) for worker in range(workers))


def _length_bucketed(source: Iterator[SequenceSample], batch_size: int, pool: int, seed: int) -> Iterator[list[SequenceSample]]:
    info = get_worker_info()
    # A string seed: str hashes are salted per process, and every rank must replay the same order on resume.
    rng = random.Random(f"{seed}/buckets/{info.id if info else 0}")
    buffer: list[SequenceSample] = []

    def flush() -> Iterator[list[SequenceSample]]:
        buffer.sort(key=lambda sample: len(sample.items))
        batches = [buffer[start : start + batch_size] for start in range(0, len(buffer), batch_size)]
        rng.shuffle(batches)
        buffer.clear()
        yield from batches

    for sample in source:
        buffer.append(sample)
        if len(buffer) >= batch_size * pool:
            yield from flush()
    yield from flush()


def prefix_lengths(lengths: np.ndarray, draws: np.ndarray, prefix_prob: float) -> np.ndarray:
    """Items kept per sequence: where a draw (uniform [0, 1)) is below `prefix_prob`, k uniform
    in 2..n for a sequence of n items; the whole sequence otherwise, and always for n <= 2.
    One draw decides both whether and where to cut (rescaled below the threshold)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    cut = (draws < prefix_prob) & (lengths > 2)
    where = draws / max(prefix_prob, 1e-12)
    return np.where(cut, np.minimum(2 + (where * (lengths - 1)).astype(np.int64), lengths), lengths)


def _random_prefixes(source: Iterator[SequenceSample], prefix_prob: float, seed: tuple[int, int, int]) -> Iterator[SequenceSample]:
    info = get_worker_info()
    rng = np.random.default_rng([*seed, info.id if info else 0, 0x5EC])
    for sample in source:
        kept = int(prefix_lengths(np.array([len(sample.items)]), rng.random(1), prefix_prob)[0])
        yield sample if kept == len(sample.items) else SequenceSample(sample.key, sample.items[:kept], sample.url)


def _keep_recent(sample: SequenceSample, max_len: int) -> SequenceSample:
    return sample if len(sample.items) <= max_len else SequenceSample(sample.key, sample.items[-max_len:], sample.url)


def window_bounds(length: int, max_len: int) -> list[tuple[int, int]]:
    """[start, end) of the windows of a sequence: back from the end in steps of max_len, dropping
    a leftover of a single item (nothing to learn from a lone masked tail)."""
    bounds = []
    for end in range(length, 0, -max_len):
        start = max(0, end - max_len)
        if end - start >= 2 or end == length:
            bounds.append((start, end))
    return bounds


def _windows(source: Iterator[SequenceSample], max_len: int) -> Iterator[SequenceSample]:
    for sample in source:
        if len(sample.items) <= max_len:
            yield sample
            continue
        for start, end in window_bounds(len(sample.items), max_len):
            yield SequenceSample(f"{sample.key}.w{start}", sample.items[start:end], sample.url)


def _decode(sample: dict, num_items: int) -> SequenceSample:
    key, url = sample["__key__"], sample.get("__url__", "?")
    where = f"{url}: sample {key}"
    if SEQUENCE_FIELD not in sample:
        raise ShardError(f"{where}: no {SEQUENCE_FIELD} field (fields: {sorted(k for k in sample if not k.startswith('__'))})")
    items = decode_sequence(sample[SEQUENCE_FIELD], where)
    if len(items) == 0:
        raise ShardError(f"{where}: empty sequence")
    if int(items.min()) < 1 or int(items.max()) > num_items:
        raise ShardError(f"{where}: item id outside 1..{num_items}; shards and meta.json disagree, re-run prepare")
    return SequenceSample(key, items, url)


def _verify_counts(source: Iterator[SequenceSample], shards: list[str], expected: dict[str, int]) -> Iterator:
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    seen = dict.fromkeys(shards[worker::workers], 0)
    for sample in source:
        seen[sample.url] = seen.get(sample.url, 0) + 1
        yield sample
    for url, count in seen.items():
        if url in expected and count != expected[url]:
            raise ShardError(
                f"{url}: yielded {count} sequences, meta.json says {expected[url]}: truncated or corrupt shard; re-run prepare --force"
            )


def _shuffle(source: Iterator, size: int, seed: tuple[int, int, int]) -> Iterator:
    info = get_worker_info()
    rng = random.Random("/".join(map(str, (*seed, info.id if info else 0))))
    buffer: list = []
    for sample in source:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(size)
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def _raise_shard_error(exn: Exception) -> bool:
    if isinstance(exn, ShardError):
        raise exn
    url = next((arg for arg in reversed(exn.args) if isinstance(arg, str) and arg.endswith(".tar")), "shard")
    raise ShardError(f"{url}: corrupt or unreadable shard ({exn.args[0] if exn.args else type(exn).__name__})") from exn
