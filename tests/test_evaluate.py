"""Exact ranks and metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from seqrec.data.split import EvalSet
from seqrec.evaluate import evaluate_popularity, history_batches, metrics_from_ranks, popularity_ranks, target_ranks
from seqrec.model import MASK_ITEM


def test_rank_counts_ties_pessimistically():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.5]])  # items 1..4
    assert target_ranks(scores, torch.tensor([2]), None).tolist() == [2]
    assert target_ranks(scores, torch.tensor([4]), None).tolist() == [2]
    assert target_ranks(scores, torch.tensor([3]), None).tolist() == [3]
    assert target_ranks(torch.zeros(1, 4), torch.tensor([1]), None).tolist() == [4]


def test_history_items_are_excluded_but_never_the_target():
    scores = torch.tensor([[0.9, 0.5, 0.8, 0.1], [0.9, 0.5, 0.8, 0.1]])
    history = torch.tensor([[1, 3, 0], [1, 2, MASK_ITEM]])
    ranks = target_ranks(scores, torch.tensor([2, 2]), history)
    # Row 0: items 1 and 3 excluded -> item 2 first. Row 1: target 2 is in the history but kept; item 1 excluded, item 3 above.
    assert ranks.tolist() == [1, 2]


def test_metrics_from_ranks_by_hand():
    metrics = metrics_from_ranks(np.array([1, 2, 11]), (1, 10))
    assert metrics["HR@1"] == pytest.approx(1 / 3)
    assert metrics["HR@10"] == pytest.approx(2 / 3)
    assert metrics["NDCG@1"] == pytest.approx(1 / 3)
    assert metrics["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert metrics["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 11) / 3)


def _eval_set():
    histories = [[1, 2, 3, 4, 5, 6], [7], [8, 9]]
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in histories])])
    return EvalSet(np.arange(3), offsets, np.concatenate(histories).astype(np.int32), np.array([7, 8, 9], dtype=np.int32))


def test_history_batches_keep_recent_items_append_mask_and_carry_full_history():
    batches = list(history_batches(_eval_set(), batch_size=2, max_len=4, append_mask=True))
    items, targets, full = batches[0]
    assert items.tolist() == [[4, 5, 6, MASK_ITEM], [7, MASK_ITEM, 0, 0]]
    assert targets.tolist() == [7, 8]
    assert full.tolist() == [[1, 2, 3, 4, 5, 6], [7, 0, 0, 0, 0, 0]]
    causal_items, _, _ = next(history_batches(_eval_set(), batch_size=2, max_len=4, append_mask=False))
    assert causal_items.tolist() == [[3, 4, 5, 6], [7, 0, 0, 0]]


def test_popularity_baseline_ranks_by_training_counts():
    counts = np.array([0, 50, 40, 30, 20, 10, 5, 4, 3, 2, 1])  # items 1..10
    metrics = evaluate_popularity(counts, _eval_set(), ks=(1, 10), exclude_history=True)
    # User 0: items 1-6 excluded -> 7 first. User 1: item 7 excluded; 8 ranks after 1..6 -> 7. User 2: 8, 9 excluded
    # except target 9 -> after 1..7 -> 8.
    assert metrics["HR@1"] == pytest.approx(1 / 3)
    assert metrics["MRR"] == pytest.approx((1 + 1 / 7 + 1 / 8) / 3)


@pytest.mark.parametrize("exclude_history", [True, False])
def test_popularity_ranks_equal_target_ranks_of_the_popularity_scores(exclude_history):
    rng = np.random.default_rng(7)
    num_items, users = 40, 300
    counts = np.concatenate([[0], rng.integers(0, 6, num_items)])  # few distinct counts: many ties
    lengths = rng.integers(1, 25, users)
    # Repeats and the target itself appear in histories; the exclusion counts each item once and keeps the target.
    history = rng.integers(1, num_items + 1, lengths.sum()).astype(np.int32)
    targets = rng.integers(1, num_items + 1, users).astype(np.int32)
    eval_set = EvalSet(np.arange(users), np.concatenate([[0], np.cumsum(lengths)]), history, targets)

    expected = []
    for items, batch_targets, full in history_batches(eval_set, batch_size=64, max_len=8, append_mask=False):
        scores = torch.as_tensor(counts[1:], dtype=torch.float32).expand(len(batch_targets), -1)
        expected.append(target_ranks(scores, batch_targets, full if exclude_history else None).numpy())
    ranks = popularity_ranks(counts, eval_set, exclude_history)
    assert np.array_equal(ranks, np.concatenate(expected))
    assert ranks.min() >= 1
