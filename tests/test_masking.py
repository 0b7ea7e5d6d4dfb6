"""Property tests of device-side masking."""

from __future__ import annotations

import pytest
import torch

from seqrec.masking import IGNORE_LABEL, mask_from_draws, mask_items, random_prefixes
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


def test_deterministic_for_a_fixed_generator_and_varies_across_seeds():
    items, _ = _batch()
    a = mask_items(items, 0.3, torch.Generator().manual_seed(7))
    b = mask_items(items, 0.3, torch.Generator().manual_seed(7))
    c = mask_items(items, 0.3, torch.Generator().manual_seed(8))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)


def test_random_prefixes_cut_the_chosen_share_of_rows_to_uniform_prefixes():
    width, rows = 30, 60_000
    items, lengths = _batch(rows=rows, width=width, seed=3)
    row_draws = torch.rand(rows, generator=torch.Generator().manual_seed(4))
    cut = random_prefixes(items, row_draws, 0.4)
    kept = (cut != 0).sum(dim=1)
    positions = torch.arange(width).unsqueeze(0)
    assert torch.equal(cut, torch.where(positions < kept.unsqueeze(1), items, 0)), "a prefix of the row, pads after it"
    assert torch.all((kept >= 2) | (kept == lengths)) and torch.all(kept <= lengths)
    eligible = lengths > 2
    assert torch.equal(kept[~eligible], lengths[~eligible]), "rows of 1-2 items stay whole"
    chosen = row_draws[eligible] < 0.4
    assert torch.all(kept[eligible][~chosen] == lengths[eligible][~chosen])
    assert abs(chosen.float().mean().item() - 0.4) < 0.01
    assert torch.equal(random_prefixes(items, row_draws, 0.0), items)
    full_rows = torch.randint(1, 1000, (rows, width), generator=torch.Generator().manual_seed(5))
    kept = (random_prefixes(full_rows, row_draws, 0.4)[row_draws < 0.4] != 0).sum(dim=1)
    counts = torch.bincount(kept, minlength=width + 1)[2:].float()  # uniform over 2..width: ~830 each
    assert counts.min() > 0.85 * counts.mean() and counts.max() < 1.15 * counts.mean()


def test_random_prefixes_then_masking_masks_the_new_tail():
    items, _ = _batch(rows=256, width=20, seed=5)
    cut = random_prefixes(items, torch.rand(256, generator=torch.Generator().manual_seed(6)), 1.0)
    batch = mask_items(cut, 0.3, torch.Generator().manual_seed(7))
    rows = torch.arange(256)
    assert torch.all(batch.labels[rows, batch.tail] == cut[rows, batch.tail])
    assert torch.all(batch.inputs[cut == 0] == 0)


@pytest.mark.slow
def test_masking_compiles_as_one_graph_and_matches_eager():
    items, _ = _batch(rows=16, width=12)
    draws = torch.rand(items.shape, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(mask_from_draws, fullgraph=True)
    expected, got = mask_from_draws(items, draws, 0.3), compiled(items, draws, 0.3)
    assert torch.equal(got.inputs, expected.inputs) and torch.equal(got.labels, expected.labels)
    row_draws = torch.rand(16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.compile(random_prefixes, fullgraph=True)(items, row_draws, 0.5), random_prefixes(items, row_draws, 0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; runs where a GPU is present")
def test_masking_on_cuda_never_synchronises_with_the_host():
    items, _ = _batch()
    items = items.cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        items = random_prefixes(items, torch.rand(len(items), generator=generator, device="cuda"), 0.5)
        batch = mask_items(items, 0.3, generator)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert batch.inputs.is_cuda and torch.all(batch.inputs[torch.arange(len(items), device="cuda"), batch.tail] == MASK_ITEM)
