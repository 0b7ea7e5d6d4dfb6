"""Training losses over the FULL item set, scoring only the positions that need scores.

Never builds batch x length x vocabulary logits: hidden states are gathered first (the tails
in one indexed gather, the other masked positions by mask), then scored against the item rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seqrec.masking import IGNORE_LABEL, MaskedBatch, tail_positions
from seqrec.model import SeqRecModel


@dataclass
class LossParts:
    total: torch.Tensor
    tail: torch.Tensor  # next-item cross-entropy at the tail
    masked: torch.Tensor  # cross-entropy over every masked position, tails included
    scored_rows: int  # rows of the logits matrix that was built (its width is num_items)


def masked_item_loss(model: SeqRecModel, batch: MaskedBatch, tail_weight: float, masked_weight: float) -> LossParts:
    hidden = model.encode(batch.inputs)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    tail_hidden = hidden[rows, batch.tail]
    tail_labels = batch.labels[rows, batch.tail]
    others = batch.labels != IGNORE_LABEL
    others[rows, batch.tail] = False
    gathered = torch.cat([tail_hidden, hidden[others]])
    labels = torch.cat([tail_labels, batch.labels[others]]) - 1
    logits = model.item_scores(gathered).float()
    losses = F.cross_entropy(logits, labels, reduction="none")
    tail = losses[: len(rows)].mean()
    masked = losses.mean()
    return LossParts(tail_weight * tail + masked_weight * masked, tail.detach(), masked.detach(), logits.shape[0])


def causal_next_item_loss(model: SeqRecModel, items: torch.Tensor) -> LossParts:
    """SASRec-style baseline: every position predicts the item after it, full cross-entropy."""
    targets = torch.roll(items, -1, dims=1)
    targets[:, -1] = 0
    # The tail has no next item, so it is dropped from the input, except in one-item rows:
    # an all-padding row would make attention NaN, which leaks into the gradients.
    rows = torch.arange(items.shape[0], device=items.device)
    tail = tail_positions(items)
    inputs = items.clone()
    inputs[rows, tail] = torch.where(tail > 0, torch.zeros_like(tail), items[rows, tail])
    valid = (inputs != 0) & (targets != 0)
    hidden = model.encode(inputs)
    logits = model.item_scores(hidden[valid]).float()
    loss = F.cross_entropy(logits, targets[valid] - 1)
    return LossParts(loss, loss.detach(), loss.detach(), logits.shape[0])
