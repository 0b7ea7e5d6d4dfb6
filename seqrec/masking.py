"""Masking a padded batch on its own device: vectorised, generator-driven, no host synchronisation.

Every non-pad item is masked with probability `mask_prob`; the tail (last non-pad position of
each right-padded row) is always masked; pads never are. Optionally a share of rows
(`tail_only_prob`) has only its tail masked: the history is then clean, as at evaluation.
Labels hold the original item at masked positions and IGNORE_LABEL elsewhere. Rows may arrive
cut to random prefixes by the reader (`loss.prefix_prob`, seqrec/data/stream.py), so that the
always-masked tail is not the same item every epoch.
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


def mask_items(items: torch.Tensor, mask_prob: float, generator: torch.Generator, tail_only_prob: float = 0.0) -> MaskedBatch:
    draws = torch.rand(items.shape, generator=generator, device=items.device)
    return mask_from_draws(items, draws, mask_prob, tail_only_prob)


def mask_from_draws(items: torch.Tensor, draws: torch.Tensor, mask_prob: float, tail_only_prob: float = 0.0) -> MaskedBatch:
    """The deterministic part, a single graph for torch.compile (dynamo cannot trace a Generator).
    The draw at each row's tail, unused by the tail's own (certain) masking, picks tail-only rows,
    independently of the draws that mask the history."""
    present = items != 0
    tail = tail_positions(items)
    positions = torch.arange(items.shape[1], device=items.device)
    is_tail = positions.unsqueeze(0) == tail.unsqueeze(1)
    tail_only = draws.gather(1, tail.unsqueeze(1)) < tail_only_prob
    history_prob = torch.where(tail_only, 0.0, mask_prob)
    masked = present & ((draws < history_prob) | is_tail)
    inputs = torch.where(masked, torch.full_like(items, MASK_ITEM), items)
    labels = torch.where(masked, items, torch.full_like(items, IGNORE_LABEL))
    return MaskedBatch(inputs, labels, tail)
