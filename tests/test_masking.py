"""Property tests of device-side masking."""

from __future__ import annotations

import pytest
import torch

from seqrec.masking import IGNORE_LABEL, mask_from_draws, mask_items
from seqrec.model import MASK_ITEM


def _batch(rows=512, width=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    items = torch.randint(1, 1000, (rows, width), generator=generator)
    lengths = torch.randint(1, width + 1, (rows,), generator=generator)
    items[torch.arange(width).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return items, lengths


def test_tail_always_masked_pads_never_masked():
    items, lengths = _batch()
    batch = mask_items(items, 0.3, torch.Generator().manual_seed(1))
    rows = torch.arange(len(items))
    assert torch.equal(batch.tail, lengths - 1)
    assert torch.all(batch.inputs[rows, lengths - 1] == MASK_ITEM)
    assert torch.all(batch.inputs[items == 0] == 0)
    assert torch.all(batch.labels[items == 0] == IGNORE_LABEL)


def test_labels_are_exactly_the_replaced_items():
    items, _ = _batch()
    batch = mask_items(items, 0.3, torch.Generator().manual_seed(2))
    masked = batch.inputs == MASK_ITEM
    assert torch.equal(batch.labels[masked], items[masked])
    assert torch.all(batch.labels[~masked] == IGNORE_LABEL)
    assert torch.equal(batch.inputs[~masked], items[~masked])


@pytest.mark.parametrize("mask_prob", [0.15, 0.3, 0.6])
def test_empirical_mask_rate_of_non_tail_items(mask_prob):
    items, lengths = _batch(rows=4096)
    batch = mask_items(items, mask_prob, torch.Generator().manual_seed(3))
    non_tail = (items != 0).clone()
    non_tail[torch.arange(len(items)), lengths - 1] = False
    rate = (batch.inputs[non_tail] == MASK_ITEM).float().mean().item()
    count = non_tail.sum().item()
    tolerance = 5 * (mask_prob * (1 - mask_prob) / count) ** 0.5  # five standard errors
    assert abs(rate - mask_prob) < tolerance


def test_tail_only_rows_have_a_clean_history_and_the_rest_keep_the_mask_rate():
    items, lengths = _batch(rows=4096)
    batch = mask_items(items, 0.3, torch.Generator().manual_seed(5), tail_only_prob=0.4)
    rows = torch.arange(len(items))
    assert torch.all(batch.inputs[rows, lengths - 1] == MASK_ITEM)
    masked_per_row = (batch.inputs == MASK_ITEM).sum(dim=1)
    tail_only = masked_per_row == 1
    long_rows = lengths >= 20  # a 30% rate leaves such a row unmasked but for its tail with p < 0.001
    share = tail_only[long_rows].float().mean().item()
    assert abs(share - 0.4) < 5 * (0.4 * 0.6 / long_rows.sum().item()) ** 0.5
    non_tail = (items != 0).clone()
    non_tail[rows, lengths - 1] = False
    others = non_tail & long_rows.unsqueeze(1) & ~tail_only.unsqueeze(1)
    rate = (batch.inputs[others] == MASK_ITEM).float().mean().item()
    assert abs(rate - 0.3) < 5 * (0.3 * 0.7 / others.sum().item()) ** 0.5
    everything = mask_items(items, 0.3, torch.Generator().manual_seed(5), tail_only_prob=1.0)
    assert torch.equal((everything.inputs == MASK_ITEM).sum(dim=1), torch.ones(len(items), dtype=torch.long))


def test_deterministic_for_a_fixed_generator_and_varies_across_seeds():
    items, _ = _batch()
    a = mask_items(items, 0.3, torch.Generator().manual_seed(7))
    b = mask_items(items, 0.3, torch.Generator().manual_seed(7))
    c = mask_items(items, 0.3, torch.Generator().manual_seed(8))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.slow
def test_masking_compiles_as_one_graph_and_matches_eager():
    items, _ = _batch(rows=16, width=12)
    draws = torch.rand(items.shape, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(mask_from_draws, fullgraph=True)
    expected, got = mask_from_draws(items, draws, 0.3, 0.5), compiled(items, draws, 0.3, 0.5)
    assert torch.equal(got.inputs, expected.inputs) and torch.equal(got.labels, expected.labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; runs where a GPU is present")
def test_masking_on_cuda_never_synchronises_with_the_host():
    items, _ = _batch()
    items = items.cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = mask_items(items, 0.3, generator)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert batch.inputs.is_cuda and torch.all(batch.inputs[torch.arange(len(items), device="cuda"), batch.tail] == MASK_ITEM)
