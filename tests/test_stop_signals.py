"""Stopping on a signal: every rank stops at the same step, checkpoints, exits 75, and
`--resume auto` reaches the uninterrupted run's result (one process in-process, one process
signalled with its reader workers, two gloo ranks with only one signalled)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from seqrec import train as train_module
from seqrec.config import load_config
from seqrec.errors import ConfigError, TrainingStopped
from seqrec.stop_signals import STOPPED_EXIT_CODE, StopSignals
from seqrec.tracking import read_history, read_offline_history
from seqrec.train import run
from tests.conftest import REPO, logged_steps
from tests.test_distributed import _env, cpu_ranks_env, losses_by_step, train_args

OVERRIDES = ("train.epochs=4", "train.log_every=1", "train.patience=100")


def _config(dataset: Path, run_dir: Path, *overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", [f"data.dataset={dataset}", f"run_dir={run_dir}", *OVERRIDES, *overrides])


def _steps_logged(run_dir: Path) -> int:
    """The last training step logged so far."""
    return max(logged_steps(run_dir), default=0)


def _wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _steps_logged(run_dir) < step:
        assert process.poll() is None, f"the run ended before step {step}: {process.stderr.read()[-3000:] if process.stderr else ''}"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.05)


def _signal_group_after_step(args: list[str], run_dir: Path, step: int) -> tuple[int, str]:
    """Run `args` in a process group of its own, SIGUSR1 the whole group once `step` is logged;
    the exit code and stderr."""
    process = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_step(run_dir, step, process)
        os.killpg(process.pid, signal.SIGUSR1)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, stderr


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    expected, got = losses_by_step(reference), losses_by_step(run_dir)
    assert sorted(got) == sorted(expected), "the resumed history must hold each step once"
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-6, abs=1e-6), step
    metrics, reference_metrics = (json.loads((path / "metrics.json").read_text()) for path in (run_dir, reference))
    assert metrics["test"] == pytest.approx(reference_metrics["test"], abs=1e-9)
    assert metrics["steps"] == reference_metrics["steps"]


# ---- the handler ----------------------------------------------------------------------------


def test_the_first_signal_is_recorded_and_handlers_are_put_back():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals(["SIGUSR1", "SIGUSR2"]) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.received == "SIGUSR2"
    assert signal.getsignal(signal.SIGUSR1) is before and signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL


def test_a_second_signal_goes_to_the_handler_it_replaced():
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        with StopSignals(["SIGUSR2"]) as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.received == "SIGUSR2" and seen == []
            os.kill(os.getpid(), signal.SIGUSR2)
            assert seen == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_off_the_main_thread_the_handlers_stay_and_a_warning_says_so(caplog):
    before = signal.getsignal(signal.SIGUSR1)
    seen = []

    def enter():
        with caplog.at_level(logging.WARNING, logger="seqrec.stop_signals"), StopSignals(["SIGUSR1"]):
            seen.append(signal.getsignal(signal.SIGUSR1))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == [before]
    assert "not on the main thread" in caplog.text


@pytest.mark.parametrize("value", ["[SIGKILL]", "[USR1]", "[SIGCHLD]", "SIGUSR1"])
def test_stop_signals_are_validated_at_load(value):
    with pytest.raises(ConfigError, match="train.stop_signals"):
        load_config(None, [f"train.stop_signals={value}"])


# ---- training -------------------------------------------------------------------------------


def test_a_stopped_run_checkpoints_and_resumes_to_the_uninterrupted_result(tiny_dataset, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    run(_config(tiny_dataset, reference))

    run_dir = tmp_path / "stopped"
    config = _config(tiny_dataset, run_dir, "tracking.wandb=offline")
    original_step, calls = train_module._Trainer._step, []

    def step_then_signal(self, micro_batches):
        parts = original_step(self, micro_batches)
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGUSR1)
        return parts

    monkeypatch.setattr(train_module._Trainer, "_step", step_then_signal)
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(TrainingStopped, match=r"stopped by SIGUSR1 on rank 0 at step 4 .*--resume auto") as stopped:
        run(config)
    assert str(run_dir / "checkpoints" / "step_00000004") in str(stopped.value)
    assert signal.getsignal(signal.SIGUSR1) is before, "the handler must be put back when training ends"
    assert (run_dir / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    assert _steps_logged(run_dir) == 4 and not (run_dir / "metrics.json").exists()
    run_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1 and any(row.get("step") == 4 for row in read_offline_history(run_files[0]))

    monkeypatch.setattr(train_module._Trainer, "_step", original_step)
    run(config, resume="auto")
    _assert_same_run(run_dir, reference)


def test_a_signal_during_validation_stops_before_it_and_the_resume_validates(tiny_dataset, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    run(_config(tiny_dataset, reference))

    run_dir = tmp_path / "stopped"
    original = train_module._Trainer._train_epoch

    def epoch_then_signal(self, state):
        end = original(self, state)
        if state.epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return end

    monkeypatch.setattr(train_module._Trainer, "_train_epoch", epoch_then_signal)
    with pytest.raises(TrainingStopped, match=r"stopped by SIGTERM on rank 0 .*\(epoch 1, "):
        run(_config(tiny_dataset, run_dir))
    validated = [row["epoch"] for row in read_history(run_dir) if "valid" in row]
    assert validated == [0], "the stop comes before the epoch's validation"
    monkeypatch.setattr(train_module._Trainer, "_train_epoch", original)
    run(_config(tiny_dataset, run_dir), resume="auto")
    _assert_same_run(run_dir, reference)
    assert [row["epoch"] for row in read_history(run_dir) if "valid" in row] == [0, 1, 2, 3]


def test_the_cli_exits_75_when_its_process_group_is_signalled(tiny_dataset, tmp_path):
    # The whole process group, as SLURM signals every process of a task: the reader worker
    # (num_workers 1, started from a forkserver) must outlive the signal until the trainer stops.
    run_dir = tmp_path / "run"
    args = [sys.executable, *map(str, train_args(tiny_dataset, run_dir, *OVERRIDES, "train.epochs=12", "data.num_workers=1"))]
    returncode, stderr = _signal_group_after_step(args, run_dir, 12)
    assert returncode == STOPPED_EXIT_CODE, stderr[-3000:]
    assert "seqrec train: stopped by SIGUSR1 on rank 0" in stderr
    stopped_at = _steps_logged(run_dir)
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").is_file()

    resumed = subprocess.run([*args, "--resume", "auto"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == 12 and metrics["steps"] > stopped_at and f"step_{stopped_at:08d}" in metrics["resumed_from"]


def _rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    """The pid of the launcher's child with RANK=rank in its environment (read from /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher.pid:
                    continue
                if f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    return int(proc.name)
            except (OSError, ValueError, IndexError):
                continue
        assert launcher.poll() is None, "the launcher ended before its ranks were found"
        time.sleep(0.1)
    raise AssertionError(f"no child of {launcher.pid} with RANK={rank}")


def test_one_signalled_rank_stops_both_at_the_same_step_and_the_resume_matches(tiny_dataset, tmp_path):
    overrides = (*OVERRIDES, "train.epochs=6", "data.num_workers=1")
    reference = tmp_path / "reference"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*command, *map(str, train_args(tiny_dataset, reference, *overrides))], cwd=REPO, env=cpu_ranks_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = tmp_path / "stopped"
    process = subprocess.Popen([*command, *map(str, train_args(tiny_dataset, run_dir, *overrides))], cwd=REPO, env=cpu_ranks_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        rank_1 = _rank_pid(process, 1)
        _wait_for_step(run_dir, 5, process)
        os.kill(rank_1, signal.SIGUSR1)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    # torchrun ends the job at the first rank's exit, sending SIGTERM to a rank still on its
    # way out (its stop handler already put back): one exit code of 75 at least, both ranks'
    # checkpoint parts below.
    assert process.returncode != 0
    assert f"exitcode  : {STOPPED_EXIT_CODE}" in stderr, stderr[-3000:]
    assert "stopped by SIGUSR1 on rank 1 at step" in stderr
    stopped_at = _steps_logged(run_dir)
    assert stopped_at < max(losses_by_step(reference))
    saved = run_dir / "checkpoints" / f"step_{stopped_at:08d}"
    assert (saved / "COMPLETE").is_file() and {path.name for path in saved.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}

    resumed = subprocess.run([*command, *map(str, train_args(tiny_dataset, run_dir, *overrides)), "--resume", "auto"], cwd=REPO,
                             env=cpu_ranks_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(run_dir, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; runs where a GPU is present")
def test_a_cuda_run_over_nccl_stops_on_sigusr1_and_resumes_to_the_end(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, *map(str, train_args(tiny_dataset, run_dir, *OVERRIDES, "train.epochs=30", "train.device=cuda",
                                                 "train.precision=bf16", "data.num_workers=1"))]
    returncode, stderr = _signal_group_after_step(args, run_dir, 12)
    assert returncode == STOPPED_EXIT_CODE, stderr[-3000:]
    resumed = subprocess.run([*args, "--resume", "auto"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["device"], metrics["precision"], metrics["backend"]) == ("cuda:0", "torch.bfloat16", "nccl")
    assert metrics["epochs_run"] == 30 and metrics["resumed_from"] is not None
