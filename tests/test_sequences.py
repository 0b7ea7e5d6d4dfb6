"""Ordering, repeat removal, k-core filtering, contiguous ids and the leave-one-out rule."""

from __future__ import annotations

import numpy as np
import pytest

from seqrec.data.formats import InteractionLog
from seqrec.data.sequences import FilterOptions, build_sequences, gather_prefixes
from seqrec.data.split import leave_one_out
from seqrec.errors import ConfigError, InputError


def _log(users, items, times=None):
    return InteractionLog.from_columns(
        "mem", "pairs", np.array(users), np.array(items), None if times is None else np.array(times)
    )


def _as_lists(seqs):
    items = seqs.item_ids[seqs.items - 1]
    return {seqs.user_ids[u].item(): items[seqs.offsets[u] : seqs.offsets[u + 1]].tolist() for u in range(seqs.num_users)}


def test_sort_is_by_time_with_file_order_breaking_ties():
    log = _log([2, 1, 1, 1, 2], [50, 10, 11, 12, 51], [9, 5, 3, 5, 1])
    assert _as_lists(build_sequences(log)) == {1: [11, 10, 12], 2: [51, 50]}


def test_sort_without_times_keeps_file_order_per_user():
    log = _log([2, 1, 2, 1], [4, 3, 2, 1])
    assert _as_lists(build_sequences(log)) == {1: [3, 1], 2: [4, 2]}


def test_float_and_huge_timestamps_sort_correctly():
    assert _as_lists(build_sequences(_log([1, 1, 1], [1, 2, 3], [0.5, 0.25, 0.75])))[1] == [2, 1, 3]
    assert _as_lists(build_sequences(_log([1, 1], [1, 2], [2**62, -(2**62)])))[1] == [2, 1]


def test_dedup_removes_only_consecutive_repeats():
    log = _log([1, 1, 1, 1, 2, 2], [5, 5, 6, 5, 5, 5])
    seqs = build_sequences(log, FilterOptions(dedup_consecutive=True))
    assert _as_lists(seqs) == {1: [5, 6, 5], 2: [5]}
    assert seqs.removed_repeats == 2


def test_k_core_iterates_until_stable():
    # User 3 (1 interaction) goes; item 30 is left with 1, so it goes; user 2 is left with 1, so it
    # goes; item 20 is left with 1, so it goes: a single pass would have stopped after the first step.
    log = _log([1, 1, 1, 2, 2, 3], [10, 20, 10, 20, 30, 30])
    seqs = build_sequences(log, FilterOptions(min_user_interactions=2, min_item_interactions=2))
    assert _as_lists(seqs) == {1: [10, 10]}
    assert seqs.removed_by_core == 4


def test_item_ids_are_contiguous_from_one_in_original_id_order():
    seqs = build_sequences(_log([1, 1, 2], [300, 7, 42]))
    assert seqs.item_ids.tolist() == [7, 42, 300]
    assert sorted(set(seqs.items.tolist())) == [1, 2, 3]


def test_everything_filtered_is_an_error_naming_the_thresholds():
    with pytest.raises(InputError, match="min_user_interactions=5"):
        build_sequences(_log([1, 2], [1, 2]), FilterOptions(min_user_interactions=5))


def test_filter_options_are_validated():
    with pytest.raises(ConfigError, match="min_item_interactions"):
        FilterOptions(min_item_interactions=0)


def test_leave_one_out_splits_last_two_items():
    seqs = build_sequences(_log([1] * 5 + [2] * 3, [1, 2, 3, 4, 5, 6, 7, 8]))
    split = leave_one_out(seqs)
    train = [split.train_items[a:b].tolist() for a, b in zip(split.train_offsets[:-1], split.train_offsets[1:])]
    assert train == [[1, 2, 3], [6]]
    assert split.valid.targets.tolist() == [4, 7]
    assert split.test.targets.tolist() == [5, 8]
    assert split.valid.history[split.valid.offsets[0] : split.valid.offsets[1]].tolist() == [1, 2, 3]
    assert split.test.history[split.test.offsets[0] : split.test.offsets[1]].tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize(("policy", "train_users", "train_only", "dropped"), [("train", [0, 1, 2], 2, 0), ("drop", [2], 0, 2)])
def test_short_users_policy(policy, train_users, train_only, dropped):
    seqs = build_sequences(_log([1, 2, 2, 3, 3, 3], [1, 1, 2, 1, 2, 3]))
    split = leave_one_out(seqs, policy)
    assert split.train_users.tolist() == train_users
    assert (split.train_only_users, split.dropped_users) == (train_only, dropped)
    assert split.test.users.tolist() == [2]


def test_gather_prefixes_matches_python_slices():
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 9, 50)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = rng.integers(1, 100, offsets[-1])
    rows = rng.choice(50, 20, replace=False)
    take = np.minimum(lengths[rows], rng.integers(0, 9, 20))
    new_offsets, new_items = gather_prefixes(offsets, items, rows, take)
    for k, (row, n) in enumerate(zip(rows, take)):
        assert new_items[new_offsets[k] : new_offsets[k + 1]].tolist() == items[offsets[row] : offsets[row] + n].tolist()
