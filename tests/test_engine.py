"""Batch planning, DeepSpeed config merging, checkpoint bookkeeping and launch environments."""

from __future__ import annotations

import json
import os

import pytest
import torch

from seqrec import checkpoint, distributed
from seqrec.config import load_config
from seqrec.data.stream import StreamOptions, batches_per_rank, shards_for_rank, window_bounds
from seqrec.distributed import first_slurm_host, launch_environment
from seqrec.engine import deepspeed_config, job_clips_gradients, plan_batches
from seqrec.errors import ConfigError


def _config(*overrides):
    return load_config(None, list(overrides))


def test_batch_plan_is_micro_times_accumulation_times_world():
    plan = plan_batches(_config("train.batch_size=64", "train.micro_batch_size=8"), world_size=2)
    assert (plan.micro_batch, plan.accumulation, plan.world_size) == (8, 4, 2)
    assert plan_batches(_config("train.batch_size=64"), world_size=4).micro_batch == 16
    with pytest.raises(ConfigError, match=r"train.batch_size: 64 .*micro_batch_size \(24\)"):
        plan_batches(_config("train.batch_size=64", "train.micro_batch_size=24"), world_size=2)
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        plan_batches(_config("train.batch_size=64"), world_size=3)


def test_deepspeed_json_may_not_contradict_the_job(tmp_path):
    conflicting = tmp_path / "ds.json"
    conflicting.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    config = _config(f"distributed.deepspeed_config={conflicting}", "train.batch_size=64")
    with pytest.raises(ConfigError, match=r"train_batch_size=32 disagrees with the job config, which gives 64"):
        deepspeed_config(config, plan_batches(config, 2), None)

    owned = tmp_path / "optimizer.json"
    owned.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    config = _config(f"distributed.deepspeed_config={owned}")
    with pytest.raises(ConfigError, match="'optimizer' is set by the job config"):
        deepspeed_config(config, plan_batches(config, 1), None)

    with pytest.raises(ConfigError, match="distributed.deepspeed_config: nowhere.json not found"):
        config = _config("distributed.deepspeed_config=nowhere.json")
        deepspeed_config(config, plan_batches(config, 1), None)


def test_merged_config_takes_stage_batches_clipping_and_precision_from_the_job():
    config = _config("distributed.deepspeed_config=configs/deepspeed/zero2.json", "distributed.zero_stage=3",
                     "train.batch_size=96", "train.micro_batch_size=16", "optim.grad_clip=0.5")
    merged = deepspeed_config(config, plan_batches(config, 2), torch.bfloat16)
    assert merged["zero_optimization"]["stage"] == 3 and merged["zero_optimization"]["overlap_comm"] is True
    assert (merged["train_batch_size"], merged["train_micro_batch_size_per_gpu"], merged["gradient_accumulation_steps"]) == (96, 16, 3)
    assert merged["gradient_clipping"] == 0.5
    assert merged["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "torch_autocast" not in deepspeed_config(config, plan_batches(config, 2), None)
    assert deepspeed_config(config, plan_batches(config, 2), torch.float16)["torch_autocast"]["dtype"] == "float16"


def test_zero0_clipping_moves_from_deepspeed_to_the_job():
    stage0 = _config("optim.grad_clip=0.5")
    merged = deepspeed_config(stage0, plan_batches(stage0, 1), torch.bfloat16)
    assert merged["gradient_clipping"] == 0.0 and job_clips_gradients(merged, torch.bfloat16)
    # DeepSpeed keeps it where its own optimiser holds the gradients.
    assert deepspeed_config(stage0, plan_batches(stage0, 1), torch.float16)["gradient_clipping"] == 0.5
    for stage in (1, 2, 3):
        staged = _config("optim.grad_clip=0.5", f"distributed.zero_stage={stage}")
        assert deepspeed_config(staged, plan_batches(staged, 1), torch.bfloat16)["gradient_clipping"] == 0.5


def test_fp16_is_refused_off_the_gpu():
    from seqrec.runtime import autocast_dtype

    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        autocast_dtype("fp16", torch.device("cpu"))


def test_incomplete_checkpoints_are_never_resumed_from_and_old_ones_pruned(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (4, 8, 12):
        (root / checkpoint.tag_for(step)).mkdir(parents=True)
        (root / checkpoint.tag_for(step) / checkpoint.COMPLETE_MARKER).write_text(f"{step}\n")
    (root / checkpoint.tag_for(16)).mkdir()  # a save cut short by a kill
    assert checkpoint.latest_checkpoint(root).name == "step_00000012"
    assert checkpoint.resolve_resume("auto", root).name == "step_00000012"
    assert checkpoint.resolve_resume("never", root) is None
    assert checkpoint.resolve_resume("auto", tmp_path / "none") is None
    with pytest.raises(ConfigError, match="not a complete seqrec checkpoint"):
        checkpoint.resolve_resume(str(root / checkpoint.tag_for(16)), root)
    checkpoint._prune(root, keep=2, newest=root / checkpoint.tag_for(12))
    assert sorted(path.name for path in root.iterdir()) == ["step_00000008", "step_00000012"]


def test_launch_environment_from_torchrun_srun_and_plain():
    torchrun = launch_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (torchrun["RANK"], torchrun["WORLD_SIZE"], torchrun["LOCAL_RANK"], torchrun["LAUNCHER"]) == ("3", "4", "1", "torchrun/deepspeed")
    srun = launch_environment({
        "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
        "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "4242", "MASTER_ADDR": "gpu003",
    })
    assert (srun["RANK"], srun["WORLD_SIZE"], srun["LOCAL_RANK"], srun["MASTER_ADDR"], srun["LAUNCHER"]) == ("5", "8", "1", "gpu003", "srun")
    assert srun["MASTER_PORT"] == str(20000 + 4242)
    batch_step = launch_environment({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_ID": "batch"})
    assert batch_step["WORLD_SIZE"] == "1" and batch_step["LAUNCHER"] == "single process"


def test_a_second_run_in_one_process_still_knows_it_was_not_launched_as_ranks():
    """Joining a world of one sets RANK and WORLD_SIZE in the environment, as launchers do;
    the next run in the process (bench/quality.py trains several) must not read them as a launcher's."""
    if "RANK" in os.environ and distributed._launcher is None:
        pytest.skip("this test process was itself started by a launcher")
    first = distributed.init("cpu", 1)
    second = distributed.init("cpu", 1)
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
    assert first.launcher == second.launcher == "single process"


@pytest.mark.parametrize("launch", [{"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"},
                                    {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "1"}])
def test_a_rank_without_a_gpu_of_its_own_is_refused_before_joining(monkeypatch, launch):
    """Two ranks launched on a one-GPU node: local rank 1 has no cuda:1 (seen on an H200), under
    torchrun/deepspeed and under srun, whose local rank only SLURM_LOCALID gives before joining."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_ID", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in launch.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: pytest.fail("went on to join the group"))
    with pytest.raises(ConfigError, match=r"--device: this process is local rank 1, but the node has 1 CUDA device\(s\): launch at most 1"):
        distributed.start("auto", 1, "--device")


@pytest.mark.parametrize("nodelist, first", [("gpu[003-005,009],cpu01", "gpu003"), ("node7", "node7"), ("a1,a2", "a1"), ("", "127.0.0.1")])
def test_first_slurm_host(nodelist, first, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the fallback parser
    assert first_slurm_host(nodelist) == first


def test_windows_cover_long_sequences_newest_first():
    assert window_bounds(5, 10) == [(0, 5)]
    assert window_bounds(25, 10) == [(15, 25), (5, 15), (0, 5)]
    assert window_bounds(21, 10) == [(11, 21), (1, 11)]  # a lone leftover item is dropped


def test_batches_per_rank_counts_each_workers_short_last_batch():
    counts = {"a.tar": 37, "b.tar": 37, "c.tar": 10}
    options = StreamOptions(max_len=20, seed=0)
    for rank in range(2):
        mine = shards_for_rank(list(counts), rank, 2, seed=0, epoch=0)
        assert batches_per_rank(counts, options, rank, 2, 0, batch_size=16, num_workers=1) == -(-sum(counts[url] for url in mine) // 16)
    assert batches_per_rank(counts, options, 0, 1, 0, batch_size=16, num_workers=3) == 3 + 3 + 1
