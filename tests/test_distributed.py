"""Real multi-process training (gloo on CPU): ZeRO equivalence, kill -9 and resume, uneven shards,
crashing ranks, and the deepspeed launcher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqrec import linear_kernel
from seqrec.data.prepared import PreparedDataset
from seqrec.data.stream import shards_for_rank
from seqrec.optim import lr_factor
from seqrec.tracking import read_history
from tests.conftest import REPO
from tests.workers.equivalence import GRAD_CLIP, STEPS

VENV_BIN = Path(sys.executable).parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def cpu_ranks_env() -> dict[str, str]:
    """For the multi-process tests, which are gloo runs on the CPU: a GPU machine would otherwise
    put the ranks on its GPUs, and one with fewer GPUs than ranks refuses them. Its CUDA paths
    have their own tests (`-k cuda`), one process per GPU."""
    return {**_env(), "CUDA_VISIBLE_DEVICES": ""}


def torchrun(nproc: int, *args, timeout: float = 300, extra_env: dict[str, str] | None = None, **popen) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    env = {**cpu_ranks_env(), **(extra_env or {})}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def train_args(dataset: Path, run_dir: Path, *overrides: str) -> list[str]:
    args = ["launcher/train.py", "--config", TINY_CONFIG, "--set", f"data.dataset={dataset}", "--set", f"run_dir={run_dir}"]
    for override in overrides:
        args += ["--set", override]
    return args


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_history(run_dir) if "loss" in row}


# ZeRO partitions change the order of fp32 sums (bucketed reduce-scatter vs one all-reduce):
# gradients agree to ~1e-7 relative, and Adam's g / sqrt(v) turns that into at most a few 1e-6
# on weights after 6 steps of lr 0.01. 5e-5 is 10x that and still 200x below one step's update.
WEIGHT_TOLERANCE = 5e-5
LOSS_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("equivalence")
    single = subprocess.run(
        [sys.executable, "tests/workers/equivalence.py", str(out / "one.pt")], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stderr[-3000:]
    double = torchrun(2, "tests/workers/equivalence.py", out / "two.pt")
    assert double.returncode == 0, double.stderr[-3000:]
    return torch.load(out / "one.pt", weights_only=True), torch.load(out / "two.pt", weights_only=True)


@pytest.mark.parametrize("stage", [0, 1, 2, 3, "3-partitioned", "0-checkpointed", "3-partitioned-checkpointed"])
def test_two_processes_match_one_with_the_same_global_batch(equivalence_runs, stage):
    one, two = equivalence_runs[0][stage], equivalence_runs[1][stage]
    assert torch.allclose(one["losses"], two["losses"], rtol=0, atol=LOSS_TOLERANCE), (one["losses"], two["losses"])
    assert set(one["weights"]) == set(two["weights"])
    worst = max((one["weights"][key] - two["weights"][key]).abs().max().item() for key in one["weights"])
    assert worst < WEIGHT_TOLERANCE
    # The comparison can fail: the loss moves far more than its tolerance over these steps.
    assert (one["losses"][0] - one["losses"][-1]).abs().item() > 100 * LOSS_TOLERANCE
    # And every stage trains the same model as ZeRO-0 in one process.
    from_stage0 = max((one["weights"][key] - equivalence_runs[0][0]["weights"][key]).abs().max().item() for key in one["weights"])
    assert from_stage0 < WEIGHT_TOLERANCE
    # The weight average, kept per rank (of its partition under ZeRO-3), gathers to the same
    # average in every stage and process count, and it is not the last step's weights.
    for averaged in (one["averaged"], two["averaged"]):
        assert max((averaged[key] - equivalence_runs[0][0]["averaged"][key]).abs().max().item() for key in averaged) < WEIGHT_TOLERANCE
    assert max((one["averaged"][key] - one["weights"][key]).abs().max().item() for key in one["weights"]) > 20 * WEIGHT_TOLERANCE
    # The gradient norm every step clipped at: the job's (ZeRO-0) and DeepSpeed's (1-3) agree, in
    # one process and in two, and each is far above the clip, so the clip acted.
    reference = equivalence_runs[0][0]["grad_norms"]
    assert torch.isfinite(reference).all() and (reference > 10 * GRAD_CLIP).all(), reference
    for norms in (one["grad_norms"], two["grad_norms"]):
        assert torch.allclose(norms, reference, rtol=1e-4), (norms, reference)
    # Activation checkpointing ran: the first layer was computed twice a step, else once.
    calls_per_step = 2 if str(stage).endswith("checkpointed") else 1
    assert one["attention_calls"] == two["attention_calls"] == calls_per_step * STEPS


def test_kill_nine_then_resume_reaches_the_uninterrupted_result(tiny_dataset, tmp_path):
    # With a weight average on, so its checkpointing runs across two ranks (its exact restore is
    # pinned in test_ema, where the resume comes late enough for a lost average to show).
    overrides = ("train.epochs=8", "train.checkpoint_every=4", "train.log_every=1", "train.patience=100", "train.ema_decay=0.9")
    reference = torchrun(2, *train_args(tiny_dataset, tmp_path / "reference", *overrides))
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, train_args(tiny_dataset, run_dir, *overrides))]
    process = subprocess.Popen(command, cwd=REPO, env=cpu_ranks_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = run_dir / "checkpoints" / "step_00000008" / "COMPLETE"
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    killed_at = max(losses_by_step(run_dir))
    total_steps = max(losses_by_step(tmp_path / "reference"))
    assert killed_at < total_steps

    resumed = torchrun(2, *train_args(tiny_dataset, run_dir, *overrides), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_from"] is not None and "step_" in metrics["resumed_from"]
    expected, got = losses_by_step(tmp_path / "reference"), losses_by_step(run_dir)
    assert sorted(got) == sorted(expected), "the resumed history must hold each step once"
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-6, abs=1e-6), step
    reference_metrics = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert metrics["test"] == pytest.approx(reference_metrics["test"], abs=1e-9)
    kept = sorted(path.name for path in (run_dir / "checkpoints").iterdir() if path.name.startswith("step_"))
    assert len(kept) == 2 and kept[-1] == f"step_{total_steps:08d}"


def _single(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _lr_by_step(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["lr"] for row in read_history(run_dir) if "loss" in row}


# ZeRO-0 loads natively on any number of processes; the other pairs go through DeepSpeed's
# universal format (seqrec/universal.py), whose converter and loader differ for ZeRO-1/2 and -3.
@pytest.mark.parametrize("written_by, resumed_on, written_stage, resumed_stage", [(2, 1, 0, 0), (1, 2, 0, 2), (2, 1, 3, 1)])
def test_a_checkpoint_resumes_on_another_number_of_processes(tiny_dataset, tmp_path, written_by, resumed_on, written_stage, resumed_stage):
    overrides = ("train.epochs=3", "train.checkpoint_every=7", "train.keep_checkpoints=10", "train.log_every=1")
    launch = lambda nproc, *args: torchrun(nproc, *args) if nproc > 1 else _single(*args)  # noqa: E731
    first = launch(written_by, *train_args(tiny_dataset, tmp_path / "first", *overrides, f"distributed.zero_stage={written_stage}"))
    assert first.returncode == 0, first.stderr[-3000:]
    saved = tmp_path / "first" / "checkpoints" / "step_00000014"
    resumed = launch(resumed_on, *train_args(tiny_dataset, tmp_path / "resumed", *overrides, f"distributed.zero_stage={resumed_stage}"), "--resume", saved)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"written by {written_by} process(es), on {resumed_on}: step 14, epoch 1" in resumed.stderr
    assert ("universal format" in resumed.stderr) == ((written_stage, resumed_stage) != (0, 0))
    # The converted copy, and the `latest_universal` file DeepSpeed's converter writes, are gone.
    assert not [path.name for path in (tmp_path / "resumed" / "checkpoints").iterdir() if "universal" in path.name]
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["processes"] == resumed_on and metrics["test"]["NDCG@10"] > metrics["popularity"]["test"]["NDCG@10"]
    # The schedule goes on from step 15 (not from its warmup) and ends at the run's last step,
    # which this layout's epochs set (its ranks read other shards; epochs differ by a step or two).
    total, first_lrs, got = metrics["steps"], _lr_by_step(tmp_path / "first"), _lr_by_step(tmp_path / "resumed")
    assert metrics["schedule_steps"] == total and sorted(got) == list(range(15, total + 1))
    peak = first_lrs[7] / lr_factor(7, 5, max(first_lrs), "linear")
    for step, lr in got.items():
        assert lr == pytest.approx(peak * lr_factor(step, 5, total, "linear"), rel=1e-9, abs=1e-12), step


# On the same number of processes the ranks read the same batches and draw the same masks, so a
# resume under another layout must continue the uninterrupted run's losses exactly: the weights,
# both Adam moments, every group's step and settings, and the schedule all carried over.
@pytest.mark.parametrize("written_stage, resumed_stage", [(2, 3), (3, 0)])
def test_a_checkpoint_resumes_under_another_zero_stage_exactly(tiny_dataset, tmp_path, written_stage, resumed_stage):
    overrides = ("train.max_steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=5", "train.log_every=1",
                 "train.precision=fp32")
    first = torchrun(2, *train_args(tiny_dataset, tmp_path / "first", *overrides, f"distributed.zero_stage={written_stage}"))
    assert first.returncode == 0, first.stderr[-3000:]
    saved = tmp_path / "first" / "checkpoints" / "step_00000004"
    resumed = torchrun(2, *train_args(tiny_dataset, tmp_path / "resumed", *overrides, f"distributed.zero_stage={resumed_stage}"), "--resume", saved)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"converting {saved} (ZeRO-" in resumed.stderr
    uninterrupted, continued = losses_by_step(tmp_path / "first"), losses_by_step(tmp_path / "resumed")
    assert sorted(continued) == [5, 6, 7, 8]
    for step, loss in continued.items():
        assert loss == pytest.approx(uninterrupted[step], rel=LOSS_TOLERANCE), step
    assert _lr_by_step(tmp_path / "resumed") == {step: lr for step, lr in _lr_by_step(tmp_path / "first").items() if step > 4}


def test_a_checkpoint_of_another_global_batch_is_refused_by_name(tiny_dataset, tmp_path):
    overrides = ("train.max_steps=3", "train.checkpoint_every=3")
    first = _single(*train_args(tiny_dataset, tmp_path / "first", *overrides))
    assert first.returncode == 0, first.stderr[-3000:]
    saved = tmp_path / "first" / "checkpoints" / "step_00000003"
    other_batch = _single(*train_args(tiny_dataset, tmp_path / "batch", *overrides, "train.batch_size=16"), "--resume", saved)
    assert other_batch.returncode == 2
    assert f"seqrec train: error: --resume: {saved} was written with global batch 32 (train.batch_size); this run has 16" in other_batch.stderr


def _reshard(source: Path, target: Path, shard_size: int) -> Path:
    from seqrec.cli import main

    csv = source.parent / "tiny.csv"
    assert main(["prepare", str(csv), "--out", str(target), "--shard-size", str(shard_size), "--quiet"]) == 0
    return target


def test_uneven_shards_finish_with_equal_steps_on_every_rank(tiny_dataset, tmp_path):
    # 300 sequences in shards of 120: 120 + 120 + 60, so one rank streams twice the other's data.
    # Two reader workers per rank (started from each rank's forkserver): one of the poorer rank's has no shard.
    dataset = _reshard(tiny_dataset, tmp_path / "uneven", 120)
    assert len(PreparedDataset.open(dataset).shard_paths()) == 3
    result = torchrun(2, *train_args(dataset, tmp_path / "run", "train.epochs=3", "data.num_workers=2"), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["epochs_run"] == 3
    # Each rank's own high-water mark: a process that imported torch and trained holds well over 100 MiB.
    assert len(metrics["peak_host_memory_mb_by_rank"]) == 2 and min(metrics["peak_host_memory_mb_by_rank"]) > 100
    assert "peak_device_memory_mb_by_rank" not in metrics
    # 16 per micro-batch: the poorer rank has ceil(60/16) = 4 or ceil(120/16) = 8 batches per epoch.
    assert metrics["steps"] in range(3 * 4, 3 * 8 + 1)
    assert "left over per rank" in result.stderr


def test_cpu_training_starts_without_a_cpp_compiler_and_builds_no_extension(tiny_dataset, tmp_path):
    # DeepSpeed would JIT-build its shared-memory inference all-reduce here: a slim image has no
    # compiler for it, and training never calls it.
    extensions = tmp_path / "torch_extensions"
    no_compiler = {"CXX": str(tmp_path / "no-such-c++"), "TORCH_EXTENSIONS_DIR": str(extensions)}
    result = torchrun(2, *train_args(tiny_dataset, tmp_path / "run", "train.max_steps=2"), extra_env=no_compiler, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["processes"] == 2
    assert not extensions.exists() or not any(extensions.iterdir())


def test_a_crashing_rank_ends_the_job_with_an_error(tiny_dataset, tmp_path):
    dataset = tmp_path / "broken"
    shutil.copytree(tiny_dataset, dataset)
    data = PreparedDataset.open(dataset)
    victim = Path(shards_for_rank(data.shard_paths(), rank=1, world_size=2, seed=0, epoch=0)[0])
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    started = time.monotonic()
    result = torchrun(2, *train_args(dataset, tmp_path / "run", "distributed.timeout_minutes=2"), timeout=240)
    assert result.returncode != 0
    assert time.monotonic() - started < 150
    assert victim.name in result.stderr


def test_deepspeed_launcher_runs_the_same_entry_point_and_zero3_exports(tiny_dataset, tmp_path):
    command = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", *map(str, train_args(tiny_dataset, tmp_path / "run", "train.max_steps=4", "distributed.zero_stage=3"))]
    result = subprocess.run(command, cwd=REPO, env=cpu_ranks_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["zero_stage"] == 3 and metrics["steps"] == 4
    rows = [row for row in read_history(tmp_path / "run") if "loss" in row]
    assert len(rows[0]["sequences_per_s_by_rank"]) == 2 and rows[0]["tokens_per_s"] > 0
    # One evaluation (at the end): the final model is the last step, which the final checkpoint
    # holds as two ZeRO-3 partitions; merged by export, they must equal the gathered live weights.
    from safetensors.torch import load_file

    from seqrec.cli import main

    assert main(["export", str(tmp_path / "run"), str(tmp_path / "export"), "--checkpoint", "auto", "--quiet"]) == 0
    merged, live = load_file(str(tmp_path / "export" / "model.safetensors")), load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert set(merged) == set(live)
    assert all(torch.equal(merged[key], live[key]) for key in live)


@pytest.mark.skipif(not linear_kernel.available(), reason="model.linear_kernel=token_major needs PyTorch's oneDNN with bf16 on this CPU")
def test_token_major_linears_train_like_torch_ones_in_bf16_under_partitioned_zero3(tiny_dataset, tmp_path):
    """Two ranks, ZeRO-3 (weights gathered for each layer's forward and backward), bf16 autocast,
    an encoder wide enough that its feed-forward layers take the token-major path."""
    overrides = ("train.max_steps=4", "train.log_every=1", "distributed.zero_stage=3", "train.precision=bf16", "model.dropout=0.0",
                 "model.scratch.hidden_size=512", "model.scratch.intermediate_size=1024", "model.scratch.num_hidden_layers=1",
                 "model.scratch.num_attention_heads=8")
    losses = {}
    for kernel in ("torch", "token_major"):
        result = torchrun(2, *train_args(tiny_dataset, tmp_path / kernel, *overrides, f"model.linear_kernel={kernel}"))
        assert result.returncode == 0, result.stderr[-3000:]
        losses[kernel] = losses_by_step(tmp_path / kernel)
    assert sorted(losses["token_major"]) == sorted(losses["torch"]) == [1, 2, 3, 4]
    assert losses["token_major"][1] == losses["torch"][1]  # the same forward
    assert losses["token_major"] != losses["torch"]  # the token-major backward ran (its bias gradients are summed in fp32)
    for step, loss in losses["torch"].items():  # later steps: weights updated by bf16-rounded gradients
        assert losses["token_major"][step] == pytest.approx(loss, rel=0.02), step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; runs where a GPU is present")
def test_a_cuda_bf16_checkpoint_resumes_under_another_zero_stage(tiny_dataset, tmp_path):
    overrides = ("train.max_steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=5", "train.log_every=1",
                 "train.device=cuda", "train.precision=bf16")
    first = _single(*train_args(tiny_dataset, tmp_path / "first", *overrides, "distributed.zero_stage=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    saved = tmp_path / "first" / "checkpoints" / "step_00000004"
    resumed = _single(*train_args(tiny_dataset, tmp_path / "resumed", *overrides, "distributed.zero_stage=3"), "--resume", saved)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"converting {saved} (ZeRO-1/2)" in resumed.stderr
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert (metrics["device"], metrics["precision"], metrics["backend"]) == ("cuda:0", "torch.bfloat16", "nccl")
    assert _lr_by_step(tmp_path / "resumed") == {step: lr for step, lr in _lr_by_step(tmp_path / "first").items() if step > 4}
    # GPU kernels need not sum in one order from run to run; bf16 keeps the losses within a percent.
    uninterrupted, continued = losses_by_step(tmp_path / "first"), losses_by_step(tmp_path / "resumed")
    assert sorted(continued) == [5, 6, 7, 8]
    for step, loss in continued.items():
        assert loss == pytest.approx(uninterrupted[step], rel=1e-2), step
