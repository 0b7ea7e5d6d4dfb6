"""A non-finite training loss ends the run on every rank before a checkpoint or validation uses
the weights, naming the step, the rank and the last good checkpoint."""

from __future__ import annotations

import time

import pytest
import torch

from seqrec import train as train_module
from seqrec.config import load_config
from seqrec.divergence import DivergenceWatch
from seqrec.errors import TrainingDiverged
from seqrec.tracking import read_history
from seqrec.train import run
from tests.conftest import REPO
from tests.test_distributed import torchrun, train_args


def test_the_watch_keeps_the_first_bad_step_and_ignores_finite_ones():
    import torch.distributed as dist

    from seqrec import distributed

    distributed.start("cpu", 1)
    assert dist.is_initialized()
    watch = DivergenceWatch(torch.device("cpu"))
    watch.observe(torch.tensor(1.5), 1)
    assert watch.first_bad_step() is None
    watch.observe(torch.tensor(float("inf")), 2)
    watch.observe(torch.tensor(float("nan")), 3)
    assert watch.first_bad_step() == (2, [0])
    off = DivergenceWatch(torch.device("cpu"), enabled=False)
    off.observe(torch.tensor(float("nan")), 1)
    assert off.first_bad_step() is None


def test_a_nan_loss_stops_training_before_the_next_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    config = load_config(REPO / "configs" / "tiny.yaml", [
        f"data.dataset={tiny_dataset}", f"run_dir={run_dir}", "train.epochs=4", "train.checkpoint_every=3", "train.log_every=4",
    ])
    original, calls = train_module._Trainer._step, []

    def step_then_poison(self, micro_batches):
        parts = original(self, micro_batches)
        calls.append(1)
        if len(calls) == 5:  # every forward from step 6 on reads a NaN weight
            with torch.no_grad():
                next(self.objective.model.parameters()).fill_(float("nan"))
        return parts

    monkeypatch.setattr(train_module._Trainer, "_step", step_then_poison)
    with pytest.raises(TrainingDiverged, match=r"not finite at step 6 \(rank\(s\) 0; noticed at step 6\)") as diverged:
        run(config)
    assert f"Last complete checkpoint: {run_dir / 'checkpoints' / 'step_00000003'}" in str(diverged.value)
    saved = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert saved == ["step_00000003"], "no checkpoint may hold the poisoned weights"
    assert not any("valid" in row for row in read_history(run_dir)), "no validation of the poisoned weights"
    assert len(calls) == 6


def test_a_nan_loss_on_one_rank_ends_every_rank_with_the_error(tiny_dataset, tmp_path):
    started = time.monotonic()
    launcher_args = train_args(tiny_dataset, tmp_path / "run", "train.log_every=2", "train.epochs=3")[1:]  # without launcher/train.py
    result = torchrun(2, "tests/workers/diverge.py", 4, *launcher_args)
    assert result.returncode != 0
    assert time.monotonic() - started < 120, "a rank left alone in a collective would hang until the timeout"
    assert result.stderr.count("not finite at step 4 (rank(s) 1; noticed at step 4)") == 2, result.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; runs where a GPU is present")
def test_observing_losses_on_cuda_never_synchronises_with_the_host():
    watch = DivergenceWatch(torch.device("cuda"))
    losses = [torch.tensor(value, device="cuda") for value in (1.0, float("nan"), 2.0)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, loss in enumerate(losses, start=1):
            watch.observe(loss, step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(watch._first_bad.item()) == 2
