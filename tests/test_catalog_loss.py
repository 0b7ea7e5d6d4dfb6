"""The fused full-catalogue cross-entropy equals F.cross_entropy on F.linear scores, values and
gradients, and keeps no fp32 rows x catalogue tensor for backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

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


def test_values_and_gradients_equal_the_reference():
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


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_written_over_its_input_equals_a_fresh_one(device, dtype):
    """The forward pass overwrites the scores with their softmax (one M x N tensor, not two);
    that holds only while the kernel reads each row whole before writing it."""
    generator = torch.Generator().manual_seed(1)
    scores = (torch.randn(37, 54_542, generator=generator) * 4).to(device, dtype)
    fresh = torch.softmax(scores, dim=1)
    torch._softmax(scores, 1, False, out=scores)
    assert torch.equal(scores, fresh)


def test_bf16_at_catalogue_scale_stays_close_to_float64():
    """Realistic sizes and a wide score spread (std ~4.8, the largest ~25, where a bf16 score's
    rounding step is 0.125): losses within 0.1, gradients within 2% of their norm (the blockwise
    fp32 version before 2026-11-26 was at 0.06 and 0.9% here)."""
    generator = torch.Generator().manual_seed(2)
    rows, hidden_size, items = 96, 64, 20_000
    hidden = torch.randn(rows, hidden_size, generator=generator)
    table = torch.randn(items + 5, hidden_size, generator=generator) * 0.6
    bias = torch.randn(items + 5, generator=generator) * 0.5
    labels = torch.randint(0, items, (rows,), generator=generator)
    weights = torch.rand(rows, generator=generator)
    item_rows = slice(5, 5 + items)

    def run(dtype, autocast):
        leaves = [tensor.to(dtype, copy=True).requires_grad_() for tensor in (hidden, table, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses = catalog_cross_entropy(*leaves, item_rows, labels)
        (losses * weights.to(losses.dtype)).sum().backward()
        return losses.double(), [leaf.grad.double() for leaf in leaves]

    exact_losses, exact_grads = run(torch.float64, False)
    losses, grads = run(torch.float32, True)
    assert (losses - exact_losses).abs().max() < 0.1
    for grad, exact in zip(grads, exact_grads):
        assert (grad - exact).norm() < 0.02 * exact.norm()


def test_a_label_scored_far_below_the_rest_gives_a_capped_loss_and_a_finite_gradient():
    hidden = torch.ones(1, 2, requires_grad=True)
    table = torch.tensor([[60.0, 60.0], [-60.0, -60.0]], requires_grad=True)  # label 1: 240 nats below
    bias = torch.zeros(2, requires_grad=True)
    loss = catalog_cross_entropy(hidden, table, bias, slice(0, 2), torch.tensor([1]))
    assert loss.item() == pytest.approx(-math.log(torch.finfo(torch.float32).tiny))
    loss.sum().backward()
    assert all(torch.isfinite(leaf.grad).all() for leaf in (hidden, table, bias))
    assert hidden.grad.tolist() == [[120.0, 120.0]]  # (softmax - one_hot) = (1, -1), times the rows


def _left_out_mask(excluded, labels):
    """[ROWS, ITEMS]: True where `excluded` lists an item other than the row's label."""
    left_out = torch.zeros(ROWS, ITEMS, dtype=torch.bool)
    for row in range(ROWS):
        for item in excluded[row].tolist():
            if item >= 0 and item != labels[row]:
                left_out[row, item] = True
    return left_out


def test_excluded_items_leave_the_softmax_but_the_label_stays():
    generator = torch.Generator().manual_seed(1)
    excluded = torch.randint(0, ITEMS, (ROWS, 6), generator=generator)
    excluded[:, 0] = -1  # empty slot
    fused_inputs, reference_inputs = _inputs(), _inputs()
    labels = fused_inputs[3]
    excluded[:, 1] = labels  # a row's label listed among its items is still scored
    weights = torch.linspace(0.5, 2.0, ROWS)
    fused = catalog_cross_entropy(*fused_inputs[:3], ITEM_ROWS, labels, excluded)

    hidden, table, bias, _ = reference_inputs
    logits = F.linear(hidden, table[ITEM_ROWS], bias[ITEM_ROWS]).float()
    left_out = _left_out_mask(excluded, labels)
    assert left_out.any()
    reference = F.cross_entropy(logits.masked_fill(left_out, float("-inf")), labels, reduction="none")
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-6)
    assert (fused < _reference(*_inputs())).all()  # fewer competitors, lower loss
    (fused * weights).sum().backward()
    (reference * weights).sum().backward()
    for ours, theirs in zip(fused_inputs[:3], reference_inputs[:3]):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6)
    # A left-out item gets no gradient from the rows that left it out.
    only_row = torch.zeros(ROWS)
    only_row[0] = 1.0
    hidden0, table0, bias0, _ = _inputs()
    (catalog_cross_entropy(hidden0, table0, bias0, ITEM_ROWS, labels, excluded) * only_row).sum().backward()
    dropped = left_out[0].nonzero().flatten() + ITEM_ROWS.start
    assert bias0.grad[dropped].eq(0).all() and table0.grad[dropped].eq(0).all()


def _smoothed_reference(logits, labels, left_out, smoothing):
    """(1 - s) * CE + s * mean over kept items of their cross-entropy, written out."""
    logits = logits.masked_fill(left_out, float("-inf"))
    log_probabilities = logits.log_softmax(1)
    kept = ~left_out
    uniform = -(log_probabilities.where(kept, 0.0)).sum(1) / kept.sum(1)
    picked = -log_probabilities.gather(1, labels.unsqueeze(1)).squeeze(1)
    return (1 - smoothing) * picked + smoothing * uniform


@pytest.mark.parametrize("leave_out", [False, True], ids=["all-items", "left-out-items"])
def test_label_smoothing_equals_the_written_out_loss(leave_out):
    generator = torch.Generator().manual_seed(2)
    fused_inputs, reference_inputs = _inputs(), _inputs()
    labels = fused_inputs[3]
    excluded = None
    left_out = torch.zeros(ROWS, ITEMS, dtype=torch.bool)
    if leave_out:
        excluded = torch.randint(0, ITEMS, (ROWS, 7), generator=generator)
        excluded[:, 0] = -1  # empty slot
        excluded[:, 1] = labels  # never left out
        excluded[:, 2] = excluded[:, 3]  # listed twice, left out (and counted) once
        left_out = _left_out_mask(excluded, labels)
    weights = torch.linspace(0.5, 2.0, ROWS)
    fused = catalog_cross_entropy(*fused_inputs[:3], ITEM_ROWS, labels, excluded, 0.2)
    hidden, table, bias, _ = reference_inputs
    reference = _smoothed_reference(F.linear(hidden, table[ITEM_ROWS], bias[ITEM_ROWS]).float(), labels, left_out, 0.2)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    (fused * weights).sum().backward()
    (reference * weights).sum().backward()
    for ours, theirs in zip(fused_inputs[:3], reference_inputs[:3]):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6)
    if leave_out:  # left-out items stay out of the smoothed target too: no gradient from their row
        only_row = torch.zeros(ROWS)
        only_row[0] = 1.0
        hidden0, table0, bias0, _ = _inputs()
        (catalog_cross_entropy(hidden0, table0, bias0, ITEM_ROWS, labels, excluded, 0.2) * only_row).sum().backward()
        dropped = left_out[0].nonzero().flatten() + ITEM_ROWS.start
        assert len(dropped) > 0 and bias0.grad[dropped].eq(0).all() and table0.grad[dropped].eq(0).all()
        kept = (~left_out[0]).nonzero().flatten() + ITEM_ROWS.start
        assert bias0.grad[kept].ne(0).all()


def test_label_smoothing_zero_is_the_plain_loss_and_bad_values_are_refused():
    hidden, table, bias, labels = _inputs()
    plain = catalog_cross_entropy(hidden, table, bias, ITEM_ROWS, labels)
    torch.testing.assert_close(catalog_cross_entropy(hidden, table, bias, ITEM_ROWS, labels, None, 0.0), plain, rtol=0, atol=0)
    smoothed = catalog_cross_entropy(hidden, table, bias, ITEM_ROWS, labels, None, 0.3)
    assert not torch.allclose(smoothed, plain)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="smoothing"):
            catalog_cross_entropy(hidden, table, bias, ITEM_ROWS, labels, None, bad)
