"""The fused full-catalogue cross-entropy equals F.cross_entropy on F.linear scores, values and
gradients, and keeps no fp32 rows x catalogue tensor for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqrec import catalog_loss
from seqrec.catalog_loss import catalog_cross_entropy

ROWS, HIDDEN, TABLE, ITEMS = 13, 8, 50, 37
ITEM_ROWS = slice(9, 9 + ITEMS)


def _inputs(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, HIDDEN, generator=generator, dtype=dtype).requires_grad_()
    table = torch.randn(TABLE, HIDDEN, generator=generator, dtype=dtype).requires_grad_()
    bias = torch.randn(TABLE, generator=generator, dtype=dtype).requires_grad_()
    labels = torch.randint(0, ITEMS, (ROWS,), generator=generator)
    return hidden, table, bias, labels


def _reference(hidden, table, bias, labels):
    logits = F.linear(hidden, table[ITEM_ROWS], bias[ITEM_ROWS]).float()
    return F.cross_entropy(logits, labels, reduction="none")


@pytest.mark.parametrize("block_elements", [1 << 19, ITEMS * 2, 1])
def test_values_and_gradients_equal_the_reference(monkeypatch, block_elements):
    monkeypatch.setattr(catalog_loss, "_CPU_BLOCK_ELEMENTS", block_elements)
    weights = torch.linspace(0.5, 2.0, ROWS)
    fused_inputs, reference_inputs = _inputs(), _inputs()
    fused = catalog_cross_entropy(*fused_inputs[:3], ITEM_ROWS, fused_inputs[3])
    reference = _reference(*reference_inputs)
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-6)
    (fused * weights).sum().backward()
    (reference * weights).sum().backward()
    for ours, theirs in zip(fused_inputs[:3], reference_inputs[:3]):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6)
    outside = torch.ones(TABLE, dtype=torch.bool)
    outside[ITEM_ROWS] = False
    assert fused_inputs[1].grad[outside].eq(0).all() and fused_inputs[2].grad[outside].eq(0).all()


def test_bf16_autocast_is_close_and_keeps_no_fp32_score_matrix():
    fused_inputs, reference_inputs = _inputs(), _inputs()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append((tuple(t.shape), t.dtype)), t)[1], lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = catalog_cross_entropy(*fused_inputs[:3], ITEM_ROWS, fused_inputs[3])
    assert fused.dtype == torch.float32
    assert [dtype for shape, dtype in saved if shape == (ROWS, ITEMS)] == [torch.bfloat16]
    reference = _reference(*reference_inputs)
    torch.testing.assert_close(fused, reference, rtol=0.05, atol=0.05)
    fused.sum().backward()
    reference.sum().backward()
    for ours, theirs in zip(fused_inputs[:3], reference_inputs[:3]):
        assert ours.grad.dtype == torch.float32
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0.05, atol=0.05)
