"""The embedded synthetic generator: deterministic, skewed, and sequentially predictable."""

from __future__ import annotations

import numpy as np
import pytest

from seqrec.data.synth import SynthConfig, generate, preset
from seqrec.errors import ConfigError


def test_same_seed_same_log_and_other_seed_other_log():
    config = preset("tiny")
    a, b = generate(config), generate(config)
    assert np.array_equal(a.users, b.users) and np.array_equal(a.items, b.items) and np.array_equal(a.timestamps, b.timestamps)
    c = generate(preset("tiny", seed=1))
    assert not (len(c) == len(a) and np.array_equal(c.items, a.items))


def test_log_is_in_time_order_with_users_interleaved():
    log = generate(preset("tiny"))
    assert np.all(np.diff(log.timestamps) >= 0)
    assert np.count_nonzero(np.diff(log.users)) > preset("tiny").users  # not grouped by user


def test_lengths_respect_bounds():
    config = preset("tiny")
    counts = np.bincount(generate(config).users)[1:]
    assert counts.min() >= config.min_length and counts.max() <= config.max_length
    assert len(counts) == config.users


def test_popularity_is_skewed():
    counts = np.sort(np.bincount(generate(preset("demo")).items))[::-1]
    top_decile = counts[: len(counts) // 10].sum() / counts.sum()
    assert top_decile > 0.4


def _sequences(log):
    order = np.lexsort((log.timestamps, log.users))
    return log.users[order], log.items[order]


def test_next_item_is_far_more_predictable_from_history_than_from_popularity():
    """A bigram model fitted on the first half of users beats the most-popular item on the second half."""
    users, items = _sequences(generate(preset("demo")))
    same_user = users[1:] == users[:-1]
    previous, following, user_of = items[:-1][same_user], items[1:][same_user], users[1:][same_user]
    fit = user_of <= preset("demo").users // 2
    num_items = int(items.max()) + 1
    bigram = np.zeros((num_items, num_items), dtype=np.int32)
    np.add.at(bigram, (previous[fit], following[fit]), 1)
    most_popular = np.bincount(items[np.isin(users, np.unique(user_of[fit]))]).argmax()
    held_out = ~fit
    bigram_accuracy = np.mean(bigram[previous[held_out]].argmax(axis=1) == following[held_out])
    popularity_accuracy = np.mean(following[held_out] == most_popular)
    assert bigram_accuracy > 0.15
    assert bigram_accuracy > 5 * popularity_accuracy


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"users": 0}, "users must be >= 1"), ({"groups": 500}, "groups"), ({"follow_prob": 0.9}, "sum to at most 1"), ({"mean_length": 1}, "min_length <= mean_length")],
)
def test_invalid_config_is_rejected(overrides, message):
    base = dict(users=10, items=50, groups=5, mean_length=5)
    with pytest.raises(ConfigError, match=message):
        SynthConfig(**{**base, **overrides})


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="demo"):
        preset("huge")
