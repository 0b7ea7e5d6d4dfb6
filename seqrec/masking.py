"""Masking a padded batch on its own device: vectorised, generator-driven, no host synchronisation.

Every non-pad item is masked with probability `mask_prob`; the tail (last non-pad position of
each right-padded row) is always masked; pads never are. Labels hold the original item at
masked positions and IGNORE_LABEL elsewhere. Rows may arrive cut to random prefixes by the reader
(`loss.prefix_prob`, seqrec/data/stream.py), so that the always-masked tail is not the same
item every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqrec.model import MASK_ITEM

IGNORE_LABEL = -100


@dataclass
class MaskedBatch:
    inputs: torch.Tensor  # int64 [B, L]: items, MASK_ITEM where masked, 0 = pad
    labels: torch.Tensor  # int64 [B, L]: original item where masked, IGNORE_LABEL elsewhere
    tail: torch.Tensor  # int64 [B]: index of each row's last non-pad position


def tail_positions(items: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad item of each right-padded row (rows must be non-empty)."""
    return (items != 0).sum(dim=1) - 1


def mask_items(items: torch.Tensor, mask_prob: float, generator: torch.Generator) -> MaskedBatch:
    draws = torch.rand(items.shape, generator=generator, device=items.device)
    return mask_from_draws(items, draws, mask_prob)


def mask_from_draws(items: torch.Tensor, draws: torch.Tensor, mask_prob: float) -> MaskedBatch:
    """The deterministic part, a single graph for torch.compile (dynamo cannot trace a Generator)."""
    present = items != 0
    tail = tail_positions(items)
    positions = torch.arange(items.shape[1], device=items.device)
    is_tail = positions.unsqueeze(0) == tail.unsqueeze(1)
    masked = present & ((draws < mask_prob) | is_tail)
    inputs = torch.where(masked, torch.full_like(items, MASK_ITEM), items)
    labels = torch.where(masked, items, torch.full_like(items, IGNORE_LABEL))
    return MaskedBatch(inputs, labels, tail)
