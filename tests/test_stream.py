"""Streaming reader: rank x worker split covers every sequence exactly once; truncation, padding, errors."""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seqrec.data.prepared import PreparedDataset
from seqrec.data.shards import sample_key
from seqrec.data.stream import SequenceSample, StreamOptions, collate, prefix_lengths, sequence_dataset, sequence_loader, shards_for_rank
from seqrec.errors import ConfigError, ShardError


def _all_keys(dataset: PreparedDataset) -> list[str]:
    keys = []
    for path in dataset.shard_paths():
        with tarfile.open(path) as tar:
            keys += [member.name.split(".")[0] for member in tar.getmembers()]
    return keys


def _epoch_keys(root, rank, world_size, num_workers, epoch, result_file):
    dataset = PreparedDataset.open(root)
    options = StreamOptions(max_len=16, shuffle_buffer=50, seed=3)
    stream = dataset.sequences(options, rank, world_size, epoch)
    keys = [key for batch in sequence_loader(stream, options, batch_size=8, num_workers=num_workers) for key in batch.keys]
    with open(result_file, "w") as handle:
        json.dump(keys, handle)


def _distributed_worker(rank, world_size, init_file, root, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        _epoch_keys(root, dist.get_rank(), dist.get_world_size(), 2, 0, os.path.join(out_dir, f"rank{rank}.json"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_sequence_read_exactly_once_per_epoch_across_2_ranks_x_2_workers(tiny_dataset, tmp_path):
    dataset = PreparedDataset.open(tiny_dataset)
    assert len(dataset.shard_paths()) >= 5  # uneven: 300 sequences in shards of 37
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tiny_dataset), str(tmp_path)), nprocs=2, join=True)
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(per_rank)
    counts = collections.Counter(per_rank[0] + per_rank[1])
    assert counts == collections.Counter(_all_keys(dataset))
    assert set(counts.values()) == {1}
    assert not set(per_rank[0]) & set(per_rank[1])


def _private_mb(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        return sum(int(line.split()[1]) for line in rollup if line.startswith(("Private_Clean:", "Private_Dirty:"))) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the worker's private memory from /proc")
@pytest.mark.parametrize("worker_start, keeps_a_copy", [("forkserver", False), ("fork", True)])
def test_reader_worker_keeps_no_copy_of_memory_the_trainer_writes(tiny_dataset, worker_start, keeps_a_copy):
    """Each epoch starts a new worker while the trainer is full-grown; a forked one ends up owning the
    old copy of every page the trainer writes afterwards. `fork` shows the test can tell."""
    options = StreamOptions(max_len=16, shuffle_buffer=50, seed=3, prefix_prob=0.5)
    trainer_memory = torch.ones(64 * 2**20 // 4)
    before = set(multiprocessing.active_children())
    batches = iter(sequence_loader(PreparedDataset.open(tiny_dataset).sequences(options), options, batch_size=8, num_workers=1, worker_start=worker_start))
    next(batches)
    (worker,) = set(multiprocessing.active_children()) - before
    trainer_memory.add_(1.0)
    assert (_private_mb(worker.pid) > 64) == keeps_a_copy
    assert sum(len(batch.keys) for batch in batches) > 0
    del batches


def test_worker_start_method_is_checked():
    options = StreamOptions(max_len=16)
    with pytest.raises(ConfigError, match="data.worker_start: must be one of"):
        sequence_loader(iter(()), options, batch_size=8, num_workers=1, worker_start="thread")


def test_shard_assignment_is_a_partition_that_changes_per_epoch():
    shards = [f"s{i}.tar" for i in range(7)]
    for epoch in range(3):
        parts = [shards_for_rank(shards, rank, 3, seed=0, epoch=epoch) for rank in range(3)]
        assert sorted(sum(parts, [])) == sorted(shards)
    assert shards_for_rank(shards, 0, 2, 0, 0) != shards_for_rank(shards, 0, 2, 0, 1)
    with pytest.raises(ConfigError):
        shards_for_rank(shards, 2, 2, 0, 0)


def test_single_process_stream_with_workers_reads_each_once_and_shuffles(tiny_dataset, tmp_path):
    dataset = PreparedDataset.open(tiny_dataset)
    out = tmp_path / "keys.json"
    _epoch_keys(tiny_dataset, 0, 1, 2, 0, out)
    keys = json.loads(out.read_text())
    assert sorted(keys) == sorted(_all_keys(dataset))
    _epoch_keys(tiny_dataset, 0, 1, 2, 1, out)
    assert json.loads(out.read_text()) != keys


def test_long_sequences_keep_their_most_recent_items(tmp_path):
    from seqrec.data.shards import tar_member

    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(tar_member(f"{sample_key(0)}.seq.i32".encode(), np.arange(1, 31, dtype="<i4").tobytes()) + bytes(1024))
    samples = list(sequence_dataset([shard], StreamOptions(max_len=8, shuffle_buffer=0), num_items=30))
    assert samples[0].items.tolist() == list(range(23, 31))
    windows = list(sequence_dataset([shard], StreamOptions(max_len=8, shuffle_buffer=0, windows=True), num_items=30))
    assert [sample.items.tolist() for sample in windows] == [list(range(23, 31)), list(range(15, 23)), list(range(7, 15)), list(range(1, 7))]
    assert len({sample.key for sample in windows}) == 4


def test_prefix_lengths_cut_the_chosen_share_to_uniform_prefixes():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 31, 60_000)
    draws = rng.random(60_000)
    kept = prefix_lengths(lengths, draws, 0.4)
    assert np.all((kept >= 2) | (kept == lengths)) and np.all(kept <= lengths)
    eligible = lengths > 2
    assert np.array_equal(kept[~eligible], lengths[~eligible]), "sequences of 1-2 items stay whole"
    chosen = draws[eligible] < 0.4
    assert np.array_equal(kept[eligible][~chosen], lengths[eligible][~chosen])
    assert abs(chosen.mean() - 0.4) < 0.01
    assert np.array_equal(prefix_lengths(lengths, draws, 0.0), lengths)
    full = prefix_lengths(np.full(60_000, 30), draws, 0.4)[draws < 0.4]
    counts = np.bincount(full, minlength=31)[2:]  # uniform over 2..30: ~830 each
    assert counts.min() > 0.85 * counts.mean() and counts.max() < 1.15 * counts.mean()


def _long_history_shard(tmp_path, users=400, length=60):
    from seqrec.data.shards import tar_member

    shard = tmp_path / "train-000000.tar"
    members = [tar_member(f"{sample_key(user)}.seq.i32".encode(), np.arange(1, length + 1, dtype="<i4").tobytes()) for user in range(users)]
    shard.write_bytes(b"".join(members) + bytes(1024))
    return shard


def test_prefix_cuts_range_over_the_whole_history_then_keep_the_newest_max_len(tmp_path):
    shard = _long_history_shard(tmp_path)
    options = StreamOptions(max_len=8, shuffle_buffer=0, prefix_prob=1.0, seed=5)
    samples = list(sequence_dataset([shard], options, num_items=60, epoch=0))
    assert len(samples) == 400, "cutting never drops or adds a sample"
    ends = np.array([int(sample.items[-1]) for sample in samples])
    for sample in samples:
        end = int(sample.items[-1])
        assert sample.items.tolist() == list(range(max(1, end - 7), end + 1)), "the newest max_len items before the cut"
    assert 2 <= ends.min() < 10 and ends.max() > 55, "targets come from the whole history, not only its newest max_len"
    again = [sample.items.tolist() for sample in sequence_dataset([shard], options, num_items=60, epoch=0)]
    assert again == [sample.items.tolist() for sample in samples], "an epoch replays the same cuts (resume)"
    other = [sample.items.tolist() for sample in sequence_dataset([shard], options, num_items=60, epoch=1)]
    assert other != again, "each epoch cuts anew"
    half = list(sequence_dataset([shard], StreamOptions(max_len=8, shuffle_buffer=0, prefix_prob=0.5, seed=5), num_items=60))
    assert 0.4 < np.mean([int(sample.items[-1]) < 60 for sample in half]) < 0.6


def test_prefix_cuts_with_windows_cut_inside_each_window(tmp_path):
    shard = _long_history_shard(tmp_path, users=50, length=30)
    plain = list(sequence_dataset([shard], StreamOptions(max_len=8, shuffle_buffer=0, windows=True), num_items=30))
    cut = list(sequence_dataset([shard], StreamOptions(max_len=8, shuffle_buffer=0, windows=True, prefix_prob=1.0), num_items=30))
    assert [sample.key for sample in cut] == [sample.key for sample in plain], "the window count, and so the step count, is unchanged"
    for whole, part in zip(plain, cut):
        assert whole.items[: len(part.items)].tolist() == part.items.tolist()
    assert sum(len(sample.items) for sample in cut) < 0.8 * sum(len(sample.items) for sample in plain)


def test_collate_right_pads_to_a_multiple():
    batch = collate([SequenceSample("u1", np.array([5, 6, 7], dtype=np.int32)), SequenceSample("u2", np.array([9], dtype=np.int32))], pad_multiple=4)
    assert batch.items.tolist() == [[5, 6, 7, 0], [9, 0, 0, 0]]
    assert batch.lengths.tolist() == [3, 1]
    assert batch.items.dtype == torch.int64


def test_corrupt_shard_error_names_the_shard(tmp_path):
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(ShardError, match="train-000000.tar"):
        list(sequence_dataset([shard], StreamOptions(max_len=8, shuffle_buffer=0), num_items=10))


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_shard_is_detected_against_meta_counts(tiny_dataset, tmp_path, cut):
    dataset = PreparedDataset.open(tiny_dataset)
    source = dataset.shard_paths()[0]
    shard = tmp_path / source.name
    data = source.read_bytes()
    shard.write_bytes(data[: int(len(data) * cut) // 512 * 512 + 100])
    expected = {str(shard): dataset.shard_counts()[str(source)]}
    with pytest.raises(ShardError, match=f"{source.name}: yielded .* meta.json says 37"):
        list(sequence_dataset([shard], StreamOptions(max_len=8, shuffle_buffer=0), 10_000, expected_counts=expected))


def test_out_of_range_item_ids_are_rejected(tmp_path):
    from seqrec.data.shards import tar_member

    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(tar_member(f"{sample_key(0)}.seq.i32".encode(), np.array([1, 99], dtype="<i4").tobytes()) + bytes(1024))
    with pytest.raises(ShardError, match="outside 1..10"):
        list(sequence_dataset([shard], StreamOptions(max_len=8, shuffle_buffer=0), num_items=10))


def test_missing_shard_file_is_reported_when_opening(tiny_dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    (copy / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match="missing shard files"):
        PreparedDataset.open(copy)


def test_stream_options_are_validated():
    with pytest.raises(ConfigError, match="max_len"):
        StreamOptions(max_len=1)
    with pytest.raises(ConfigError, match="prefix_prob"):
        StreamOptions(max_len=8, prefix_prob=1.5)
