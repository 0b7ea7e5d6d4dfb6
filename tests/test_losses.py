"""Losses equal a naive full-vocabulary reference, while scoring only the gathered positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from seqrec.config import ModelConfig, ScratchBertConfig
from seqrec.losses import LossWeights, MaskedItemObjective, causal_loss_sums, causal_next_item_loss, masked_item_loss
from seqrec.masking import IGNORE_LABEL, mask_from_draws, mask_items
from seqrec.model import build_model

NUM_ITEMS = 40


def _model(attention="bidirectional", positions="from_start", item_head="transform"):
    """BERT's own MLM head by default, so the naive reference below is the plain HF forward."""
    torch.manual_seed(0)
    scratch = ScratchBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config = ModelConfig(pretrained=None, scratch=scratch, attention=attention, positions=positions, item_head=item_head, query="mask")
    model, _ = build_model(config, NUM_ITEMS, max_len=16)
    return model.eval()


def _items():
    items = torch.randint(1, NUM_ITEMS + 1, (6, 12), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([12, 9, 5, 1, 3, 7])
    items[torch.arange(12).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return items, lengths


def _naive_item_logits(model, inputs):
    """The usual recipe: full MLM logits at every position, then the item columns (a direct head:
    the last hidden states times the whole vocabulary table, plus the bias)."""
    tokens = model.vocab.tokens(inputs)
    out = model.mlm(input_ids=tokens, attention_mask=(inputs != 0).long(), position_ids=model.position_ids(inputs), output_hidden_states=True)
    logits = out.logits
    if model.item_head == "direct":
        table = model.mlm.get_input_embeddings().weight
        logits = out.hidden_states[-1] @ table.T + model.mlm.cls.predictions.bias
    assert logits.shape[-1] == model.vocab.first_item_token + NUM_ITEMS
    return logits[..., model.vocab.item_rows]


@pytest.mark.parametrize("positions, item_head", [("from_start", "transform"), ("from_end", "transform"), ("from_start", "direct")])
def test_masked_and_tail_losses_equal_naive_reference(positions, item_head):
    model = _model(positions=positions, item_head=item_head)
    items, lengths = _items()
    batch = mask_items(items, 0.3, torch.Generator().manual_seed(2))
    parts = masked_item_loss(model, batch, tail_weight=0.7, masked_weight=1.3)
    with torch.no_grad():
        logits = _naive_item_logits(model, batch.inputs)
    masked = batch.labels != IGNORE_LABEL
    naive_masked = F.cross_entropy(logits[masked], batch.labels[masked] - 1)
    naive_tail = torch.stack([F.cross_entropy(logits[b, lengths[b] - 1], items[b, lengths[b] - 1] - 1) for b in range(len(items))]).mean()
    assert parts.masked.item() == pytest.approx(naive_masked.item(), rel=1e-5)
    assert parts.tail.item() == pytest.approx(naive_tail.item(), rel=1e-5)
    assert parts.total.item() == pytest.approx(0.7 * naive_tail.item() + 1.3 * naive_masked.item(), rel=1e-5)


def test_only_masked_positions_are_scored_and_the_vocabulary_head_never_runs():
    model = _model()
    items, _ = _items()
    batch = mask_items(items, 0.3, torch.Generator().manual_seed(3))
    shapes = []
    original = model.item_losses
    model.item_losses = lambda hidden, labels, table, *rest: (shapes.append(tuple(hidden.shape)), original(hidden, labels, table, *rest))[1]
    handle = model.mlm.cls.predictions.decoder.register_forward_hook(lambda *_: pytest.fail("full-vocabulary decoder ran"))
    try:
        parts = masked_item_loss(model, batch, 1.0, 1.0)
    finally:
        handle.remove()
    masked_positions = int((batch.labels != IGNORE_LABEL).sum())
    assert shapes == [(masked_positions, 32)]
    assert parts.scored_rows == masked_positions < items.numel()


def test_gradients_reach_item_embeddings_and_encoder():
    model = _model().train()
    items, _ = _items()
    parts = masked_item_loss(model, mask_items(items, 0.3, torch.Generator().manual_seed(4)), 1.0, 1.0)
    parts.total.backward()
    embedding_grad = model.mlm.get_input_embeddings().weight.grad
    assert embedding_grad[model.vocab.item_rows].abs().sum() > 0
    assert model.mlm.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_sparse_lookup_gradient_on_cpu_equals_the_dense_one(attention):
    """On CPU the lookup adds its rows into the table's (dense) gradient sparsely and in place:
    the same gradient as a dense lookup's, still dense, as fused AdamW and ZeRO need, and no
    table-sized out-of-place add (a copy of the whole table) in the backward pass."""
    items, _ = _items()
    gradients = {}
    for sparse in (True, False):
        model = _model(attention).train()
        table = model.mlm.get_input_embeddings()
        assert table.sparse, "the CPU default"
        table.sparse = sparse
        if attention == "causal":
            parts = causal_next_item_loss(model, items)
        else:
            parts = masked_item_loss(model, mask_items(items, 0.3, torch.Generator().manual_seed(4)), 1.0, 1.0)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as backward:
            parts.total.backward()
        gradients[sparse] = table.weight.grad
        table_adds = [event.name for event in backward.events()
                      if event.name in ("aten::add", "aten::add_") and event.input_shapes and event.input_shapes[0] == list(table.weight.shape)
                      and event.cpu_parent is not None and event.cpu_parent.name.startswith("autograd::engine::evaluate_function")]
        assert table_adds == ["aten::add_"], table_adds
    assert gradients[True].layout == torch.strided
    torch.testing.assert_close(gradients[True], gradients[False])
    # The lookup's own share is in it: the [MASK] row is only ever looked up, never scored.
    if attention == "bidirectional":
        assert gradients[True][model.vocab.mask_token_id].abs().sum() > 0


def test_causal_loss_equals_per_position_next_item_reference():
    model = _model("causal")
    items, lengths = _items()
    parts = causal_next_item_loss(model, items)
    losses = []
    for b in range(len(items)):
        n = int(lengths[b])
        if n < 2:
            continue
        prefix = items[b : b + 1, : n - 1]
        with torch.no_grad():
            logits = _naive_item_logits(model, prefix)[0]
        losses.append(F.cross_entropy(logits, items[b, 1:n] - 1, reduction="none"))
    reference = torch.cat(losses).mean()
    assert parts.total.item() == pytest.approx(reference.item(), rel=1e-4)
    assert parts.scored_rows == int((lengths - 1).clamp(min=0).sum())


def test_causal_loss_is_finite_with_single_item_rows():
    model = _model("causal").train()
    items = torch.tensor([[5, 0, 0], [3, 4, 0]])
    parts = causal_next_item_loss(model, items)
    parts.total.backward()
    assert torch.isfinite(parts.total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_causal_batch_of_only_single_item_rows_is_a_zero_loss_not_nan():
    """Length bucketing puts a log's one-item training rows (users with 3 interactions) into
    batches of their own, where the next-item objective has no target at all."""
    model = _model("causal").train()
    items = torch.tensor([[5, 0], [3, 0], [7, 0]])
    sums = causal_loss_sums(model, items)
    assert sums.scored_rows == 0
    for parts in (sums.combine(LossWeights(0.0, 1.0)), sums.combine(LossWeights(0.0, 1.0), torch.zeros(()), world_size=2)):
        assert parts.total.item() == 0.0 and parts.masked.item() == 0.0
    sums.combine(LossWeights(0.0, 1.0)).total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _without_row_items(logits, row, label):
    """Logits of one position with its row's other items left out (row: item ids, 0 = pad)."""
    left_out = torch.zeros_like(logits, dtype=torch.bool)
    seen = row[(row > 0) & (row != label)] - 1
    left_out[seen] = True
    return logits.masked_fill(left_out, float("-inf"))


def test_masked_loss_leaving_out_row_items_equals_naive_reference():
    model = _model()
    items, lengths = _items()
    draws = torch.rand(items.shape, generator=torch.Generator().manual_seed(2))
    sums = MaskedItemObjective(model, 0.3, exclude_row_items=True)(items, draws)
    plain = MaskedItemObjective(model, 0.3)(items, draws)
    batch = mask_from_draws(items, draws, 0.3)
    with torch.no_grad():
        logits = _naive_item_logits(model, batch.inputs)
    losses = []
    for b, t in (batch.labels != IGNORE_LABEL).nonzero().tolist():
        label = int(items[b, t])
        losses.append(F.cross_entropy(_without_row_items(logits[b, t], items[b], label), torch.tensor(label - 1)))
    naive = torch.stack(losses)
    assert sums.masked_sum.item() == pytest.approx(naive.sum().item(), rel=1e-5)
    assert sums.masked_sum.item() < plain.masked_sum.item()
    tails = [F.cross_entropy(_without_row_items(logits[b, lengths[b] - 1], items[b], int(items[b, lengths[b] - 1])), items[b, lengths[b] - 1] - 1)
             for b in range(len(items))]
    assert sums.tail_mean.item() == pytest.approx(torch.stack(tails).mean().item(), rel=1e-5)


def test_causal_loss_leaving_out_row_items_equals_naive_reference():
    model = _model("causal")
    items, lengths = _items()
    sums = causal_loss_sums(model, items, exclude_row_items=True)
    losses = []
    for b in range(len(items)):
        n = int(lengths[b])
        with torch.no_grad():
            logits = _naive_item_logits(model, items[b : b + 1, : max(n - 1, 1)])[0]
        for t in range(n - 1):
            label = int(items[b, t + 1])
            losses.append(F.cross_entropy(_without_row_items(logits[t], items[b], label), torch.tensor(label - 1)))
    assert sums.masked_sum.item() == pytest.approx(torch.stack(losses).sum().item(), rel=1e-4)
    assert sums.masked_sum.item() < causal_loss_sums(model, items).masked_sum.item()


def _smoothed_cross_entropy(logits, label, smoothing):
    """(1 - s) * CE + s * the mean CE against every item left in (finite) `logits`, written out."""
    log_probabilities = logits.log_softmax(0)
    kept = torch.isfinite(logits)
    return -(1 - smoothing) * log_probabilities[label] - smoothing * log_probabilities[kept].mean()


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_label_smoothing_reaches_both_objectives(attention):
    model = _model(attention)
    items, lengths = _items()
    draws = torch.rand(items.shape, generator=torch.Generator().manual_seed(2))
    sums = MaskedItemObjective(model, 0.3, exclude_row_items=True, label_smoothing=0.1)(items, draws)
    plain = MaskedItemObjective(model, 0.3, exclude_row_items=True)(items, draws)
    losses = []
    with torch.no_grad():
        if attention == "bidirectional":
            batch = mask_from_draws(items, draws, 0.3)
            logits = _naive_item_logits(model, batch.inputs)
            for b, t in (batch.labels != IGNORE_LABEL).nonzero().tolist():
                label = int(items[b, t])
                losses.append(_smoothed_cross_entropy(_without_row_items(logits[b, t], items[b], label), label - 1, 0.1))
        else:
            for b in range(len(items)):
                n = int(lengths[b])
                logits = _naive_item_logits(model, items[b : b + 1, : max(n - 1, 1)])[0]
                for t in range(n - 1):
                    label = int(items[b, t + 1])
                    losses.append(_smoothed_cross_entropy(_without_row_items(logits[t], items[b], label), label - 1, 0.1))
    assert sums.masked_sum.item() == pytest.approx(torch.stack(losses).sum().item(), rel=1e-4)
    assert sums.masked_sum.item() != pytest.approx(plain.masked_sum.item(), rel=1e-3)
