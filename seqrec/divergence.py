"""Catching a diverged run before it overwrites the good checkpoints.

In bf16 or fp32 a loss that is NaN or infinite poisons the weights in the same step (its
gradients, and so the clipping norm, are not finite either), and a run that goes on trains
nothing for hours while each periodic save replaces a good checkpoint with a poisoned one
(`train.keep_checkpoints` are kept). fp16 is different: DeepSpeed's loss scaler skips the steps
whose gradients overflow, so there the scaler is left to do its job.

The watch records the first non-finite step on the device, with no host synchronisation per
step; `first_bad_step` synchronises, so the loop asks at its log steps and before every
checkpoint and validation, where it synchronises anyway.
"""

from __future__ import annotations

import torch

from seqrec import distributed


class DivergenceWatch:
    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Note `step` if `loss` is not finite and no earlier step was (device ops only)."""
        if not self.enabled:
            return
        bad = ~torch.isfinite(loss.detach())
        self._first_bad = torch.where(bad & (self._first_bad < 0), step, self._first_bad)

    def first_bad_step(self) -> tuple[int, list[int]] | None:
        """The first step with a non-finite loss on any rank, and the ranks that saw it then;
        None when there was none. A collective: every rank must ask at the same point."""
        local = int(self._first_bad.item()) if self.enabled else -1
        steps = [int(row[0]) for row in distributed.gather_floats([float(local)])]
        bad = [step for step in steps if step >= 0]
        if not bad:
            return None
        first = min(bad)
        return first, [rank for rank, step in enumerate(steps) if step == first]
