"""Contrast between masked views of the same row (CL4SRec / CBiT style).

Each training row is masked V times independently; the encoder's hidden state at each view's
tail is that view's user representation. NT-Xent pulls a row's V representations together and
pushes them from every other row's views in the micro-batch (2B - 2 negatives for V = 2), which
regularises a bidirectional model on sparse data, where each item has a handful of events.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def view_contrast_loss(representations: torch.Tensor, views: int, temperature: float) -> torch.Tensor:
    """Mean NT-Xent over [views * B, H] representations laid out view-major (rows i, B + i, ...
    are the views of row i): cosine similarity / temperature, each anchor's positives the row's
    other views, every other representation a negative. Computed in fp32."""
    if views < 2:
        raise ValueError(f"view_contrast_loss needs at least 2 views, got {views}")
    total = representations.shape[0]
    if total % views:
        raise ValueError(f"{total} representations do not split into {views} views")
    normalised = F.normalize(representations.float(), dim=-1)
    similarity = normalised @ normalised.T / temperature
    self_pairs = torch.eye(total, dtype=torch.bool, device=representations.device)
    log_prob = torch.log_softmax(similarity.masked_fill(self_pairs, float("-inf")), dim=1)
    row = torch.arange(total, device=representations.device) % (total // views)
    positives = (row.unsqueeze(0) == row.unsqueeze(1)) & ~self_pairs
    return -(log_prob.masked_fill(~positives, 0.0).sum(dim=1) / (views - 1)).mean()
