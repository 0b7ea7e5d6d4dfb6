"""Contrast between masked views: NT-Xent equals a hand-written reference, and the objective adds
it on top of the masked and tail terms of every view."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seqrec.config import ModelConfig, ScratchBertConfig, load_config
from seqrec.contrastive import view_contrast_loss
from seqrec.errors import ConfigError
from seqrec.losses import LossWeights, MaskedItemObjective, masked_loss_sums
from seqrec.masking import mask_from_draws
from seqrec.model import build_model
from tests.conftest import REPO

NUM_ITEMS = 40


def _reference(representations: torch.Tensor, views: int, temperature: float) -> float:
    """Anchor by anchor: -log of each positive's share against every other representation."""
    total = representations.shape[0]
    rows = total // views
    z = F.normalize(representations.double(), dim=-1)
    losses = []
    for anchor in range(total):
        logits = {other: float(z[anchor] @ z[other]) / temperature for other in range(total) if other != anchor}
        normaliser = math.log(sum(math.exp(value) for value in logits.values()))
        positives = [other for other in logits if other % rows == anchor % rows]
        losses.append(sum(normaliser - logits[other] for other in positives) / len(positives))
    return sum(losses) / total


@pytest.mark.parametrize("views", [2, 3])
def test_view_contrast_equals_the_reference(views):
    representations = torch.randn(views * 5, 8, generator=torch.Generator().manual_seed(views))
    loss = view_contrast_loss(representations, views, temperature=0.3)
    assert loss.item() == pytest.approx(_reference(representations, views, 0.3), rel=1e-5)


def test_aligned_views_score_far_below_confused_ones():
    rows = torch.eye(6)
    aligned = view_contrast_loss(torch.cat([rows, rows]), 2, temperature=0.1)
    confused = view_contrast_loss(torch.cat([rows, rows.roll(1, dims=0)]), 2, temperature=0.1)
    assert aligned.item() < 0.01 < 5 < confused.item()


def test_view_contrast_rejects_a_batch_that_does_not_split_into_views():
    with pytest.raises(ValueError, match="do not split into 3 views"):
        view_contrast_loss(torch.randn(8, 4), 3, temperature=0.2)
    with pytest.raises(ValueError, match="at least 2 views"):
        view_contrast_loss(torch.randn(8, 4), 1, temperature=0.2)


def _model():
    torch.manual_seed(0)
    scratch = ScratchBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model, _ = build_model(ModelConfig(pretrained=None, scratch=scratch, dropout=0.0), NUM_ITEMS, max_len=16)
    return model


def _items():
    items = torch.randint(1, NUM_ITEMS + 1, (5, 10), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([10, 7, 4, 2, 6])
    items[torch.arange(10).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return items


def test_objective_with_views_adds_their_contrast_to_every_views_masked_terms():
    model, items = _model(), _items()
    draws = torch.rand((2 * items.shape[0], items.shape[1]), generator=torch.Generator().manual_seed(2))
    sums = MaskedItemObjective(model, 0.3, views=2, temperature=0.25)(items, draws)
    # The same numbers by hand: the two views as one batch, the states scored at their tails
    # (the model's query) contrasted.
    batch = mask_from_draws(items.repeat(2, 1), draws, 0.3)
    plain = masked_loss_sums(model, batch)
    tails = model.query_states(model.encode(batch.inputs), torch.arange(10) * items.shape[1] + batch.tail)
    assert sums.masked_sum.item() == pytest.approx(plain.masked_sum.item(), rel=1e-5)
    assert sums.tail_mean.item() == pytest.approx(plain.tail_mean.item(), rel=1e-5)
    assert sums.contrastive_mean.item() == pytest.approx(view_contrast_loss(tails, 2, 0.25).item(), rel=1e-5)
    parts = sums.combine(LossWeights(0.5, 1.0, 0.2))
    expected = 0.5 * plain.tail_mean + plain.masked_sum / plain.masked_count + 0.2 * sums.contrastive_mean
    assert parts.total.item() == pytest.approx(expected.item(), rel=1e-5)
    parts.total.backward()
    assert model.mlm.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_one_view_computes_no_contrast_and_causal_models_never_do():
    model, items = _model(), _items()
    draws = torch.rand(items.shape, generator=torch.Generator().manual_seed(2))
    assert MaskedItemObjective(model, 0.3)(items, draws).contrastive_mean is None
    assert MaskedItemObjective(model, 0.3)(items, draws).combine(LossWeights(0.0, 1.0, 1.0)).contrastive is None
    model.causal, model.next_item = True, True
    assert MaskedItemObjective(model, 0.3, views=2).views == 1


@pytest.mark.parametrize("override, message", [
    ("loss.contrastive_weight=-0.1", "loss.contrastive_weight: must be >= 0"),
    ("loss.contrastive_views=1", "loss.contrastive_views: must be >= 2"),
    ("loss.contrastive_temperature=0", "loss.contrastive_temperature: must be > 0"),
])
def test_contrast_settings_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "tiny.yaml", [override])


def test_views_follow_the_weight():
    assert load_config(REPO / "configs" / "tiny.yaml", []).loss.views == 1
    assert load_config(REPO / "configs" / "tiny.yaml", ["loss.contrastive_weight=0.1", "loss.contrastive_views=3"]).loss.views == 3
