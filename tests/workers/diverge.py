"""`seqrec train` whose loss turns NaN on rank 1 alone at a given step (its reported loss, not its
weights: the test is that rank 0, whose own loss stays finite, stops too). Launched with
torchrun by tests/test_divergence.py: python tests/workers/diverge.py STEP [train args...]."""

from __future__ import annotations

import os
import sys

from seqrec import train as train_module
from seqrec.cli import main

BAD_STEP = int(sys.argv[1])
_original_step = train_module._Trainer._step
_calls = [0]


def _step_going_bad_on_rank_1(self, micro_batches):
    parts = _original_step(self, micro_batches)
    _calls[0] += 1
    if os.environ.get("RANK") == "1" and _calls[0] == BAD_STEP:
        parts.total = parts.total * float("nan")
    return parts


if __name__ == "__main__":
    train_module._Trainer._step = _step_going_bad_on_rank_1
    sys.exit(main(["train", *sys.argv[2:]]))
