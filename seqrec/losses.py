"""Training losses over the FULL item set, scoring only the positions that need scores.

Never builds batch x length x vocabulary logits: hidden states are gathered first (the tails
in one indexed gather, the other masked positions by mask), then scored against the item rows
inside a fused cross-entropy (seqrec.catalog_loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from seqrec.contrastive import view_contrast_loss
from seqrec.masking import IGNORE_LABEL, MaskedBatch, mask_from_draws, tail_positions
from seqrec.model import SeqRecModel


@dataclass
class LossParts:
    total: torch.Tensor
    tail: torch.Tensor  # next-item cross-entropy at the tail
    masked: torch.Tensor  # cross-entropy over every masked position, tails included
    scored_rows: int  # rows of the logits matrix that was built (its width is num_items)
    contrastive: torch.Tensor | None = None  # NT-Xent between masked views (None: not computed)


class LossWeights(NamedTuple):
    tail: float
    masked: float
    contrastive: float = 0.0


class LossSums(NamedTuple):
    """Per-rank pieces, so the caller can normalise the masked term by the GLOBAL count of masked
    positions: averaging per-rank means would weight a rank's positions by its own count.
    A NamedTuple, so engines that hook module outputs (ZeRO-3) see the tensors inside."""

    tail_mean: torch.Tensor  # every rank has the same number of tails (its micro-batch)
    masked_sum: torch.Tensor
    masked_count: torch.Tensor
    scored_rows: int
    # Mean over this rank's rows, like tail_mean; None when the objective makes one view per row.
    contrastive_mean: torch.Tensor | None = None

    def combine(self, weights: LossWeights, masked_count_all_ranks: torch.Tensor | None = None, world_size: int = 1) -> LossParts:
        """With the all-rank count, `masked` is scaled so that gradient averaging over ranks yields
        the mean over every masked position of the global batch. A batch without a scored position
        (next-item rows of one item each: nothing follows their item) contributes 0, not 0 / 0."""
        if masked_count_all_ranks is None:
            masked = self.masked_sum / self.masked_count.clamp(min=1)
        else:
            masked = self.masked_sum * world_size / masked_count_all_ranks.clamp(min=1)
        total = weights.tail * self.tail_mean + weights.masked * masked
        contrastive = None
        if self.contrastive_mean is not None:
            total = total + weights.contrastive * self.contrastive_mean
            contrastive = self.contrastive_mean.detach()
        return LossParts(total, self.tail_mean.detach(), masked.detach(), self.scored_rows, contrastive)


class MaskedItemObjective(nn.Module):
    """The training forward pass as one module (what an engine wraps): mask, encode, score, CE."""

    def __init__(self, model: SeqRecModel, mask_prob: float, tail_only_prob: float = 0.0, views: int = 1,
                 temperature: float = 0.2, exclude_row_items: bool = False, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.mask_prob = mask_prob
        self.tail_only_prob = tail_only_prob
        # Masked views per row (bidirectional only): > 1 adds the contrast between them.
        self.views = 1 if model.next_item else views
        self.temperature = temperature
        self.exclude_row_items = exclude_row_items
        self.label_smoothing = label_smoothing

    def forward(self, items: torch.Tensor, draws: torch.Tensor) -> LossSums:
        """`draws` [views * B, L]: one uniform draw per position of every view."""
        if self.model.next_item:
            return causal_loss_sums(self.model, items, self.exclude_row_items, self.label_smoothing)
        rows = items if self.views == 1 else items.repeat(self.views, 1)
        batch = mask_from_draws(rows, draws, self.mask_prob, self.tail_only_prob)
        return masked_loss_sums(self.model, batch, self.views, self.temperature, rows if self.exclude_row_items else None,
                                self.label_smoothing)


def masked_loss_sums(model: SeqRecModel, batch: MaskedBatch, views: int = 1, temperature: float = 0.2,
                     row_items: torch.Tensor | None = None, label_smoothing: float = 0.0) -> LossSums:
    """Rows of `batch` are `views` masked copies of the same rows, view-major; with views > 1,
    the tails' hidden states are contrasted (seqrec.contrastive). With `row_items` (the unmasked
    rows), each masked position's softmax leaves out its row's other items. `label_smoothing`
    moves that share of every target onto the items the softmax keeps."""
    batch_size, length = batch.inputs.shape
    rows = torch.arange(batch_size, device=batch.inputs.device)
    others = batch.labels != IGNORE_LABEL
    others[rows, batch.tail] = False
    positions = torch.cat([rows * length + batch.tail, torch.nonzero(others.flatten()).flatten()])
    labels = batch.labels.flatten()[positions]
    excluded = None if row_items is None else row_items[positions // length]
    contrastive = None
    if views == 1:
        losses = model(batch.inputs, positions, labels, excluded=excluded, smoothing=label_smoothing)
    else:
        losses, tails = model(batch.inputs, positions, labels, hidden_rows=batch_size, excluded=excluded, smoothing=label_smoothing)
        contrastive = view_contrast_loss(tails, views, temperature)
    return LossSums(losses[:batch_size].mean(), losses.sum(), _count(losses), losses.shape[0], contrastive)


def _count(losses: torch.Tensor) -> torch.Tensor:
    """The number of scored rows as a device scalar, filled on the device: `torch.tensor(n,
    device=cuda)` would copy from pageable host memory, which waits for the forward pass
    already queued on the stream and so stalls the host before it can launch the backward."""
    return torch.full((), float(losses.shape[0]), dtype=torch.float32, device=losses.device)


def masked_item_loss(model: SeqRecModel, batch: MaskedBatch, tail_weight: float, masked_weight: float) -> LossParts:
    return masked_loss_sums(model, batch).combine(LossWeights(tail_weight, masked_weight))


def causal_loss_sums(model: SeqRecModel, items: torch.Tensor, exclude_row_items: bool = False, label_smoothing: float = 0.0) -> LossSums:
    """SASRec-style baseline: every position predicts the item after it, full cross-entropy.
    All of it is reported as the `masked` term (positions vary per row); `tail` mirrors it.
    With `exclude_row_items`, each position's softmax leaves out its row's other items (SASRec's
    own negatives are drawn from items outside the user's sequence)."""
    targets = torch.roll(items, -1, dims=1)
    targets[:, -1] = 0
    # The tail has no next item, so it is dropped from the input, except in one-item rows:
    # an all-padding row would make attention NaN, which leaks into the gradients.
    rows = torch.arange(items.shape[0], device=items.device)
    tail = tail_positions(items)
    inputs = items.clone()
    inputs[rows, tail] = torch.where(tail > 0, torch.zeros_like(tail), items[rows, tail])
    valid = (inputs != 0) & (targets != 0)
    positions = torch.nonzero(valid.flatten()).flatten()
    excluded = items[positions // items.shape[1]] if exclude_row_items else None
    losses = model(inputs, positions, targets.flatten()[positions], excluded=excluded, smoothing=label_smoothing)
    return LossSums(torch.zeros((), device=losses.device), losses.sum(), _count(losses), losses.shape[0])


def causal_next_item_loss(model: SeqRecModel, items: torch.Tensor) -> LossParts:
    parts = causal_loss_sums(model, items).combine(LossWeights(0.0, 1.0))
    return LossParts(parts.total, parts.masked, parts.masked, parts.scored_rows)
