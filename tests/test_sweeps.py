"""wandb sweeps: an agent starts `launcher/train.py` with the sweep's parameters as
`--section.field=value` flags and its own run id in the environment; the job must train with
those values and log into the agent's run."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from seqrec.cli import config_flags_as_overrides
from seqrec.tracking import WANDB_ID_FILE, read_history, read_offline_history, read_offline_summary
from tests.conftest import REPO
from tests.test_distributed import _env


def test_config_flags_become_overrides_and_other_arguments_stay():
    argv = ["--config", "configs/tiny.yaml", "--optim.lr=0.002", "--model.dropout=None", "--data.dataset=shards/a=b",
            "--model.scratch.hidden_size=32", "--local_rank=0", "--resume", "auto", "--set", "train.epochs=2", "--config=x.yaml"]
    assert config_flags_as_overrides(argv) == [
        "--config", "configs/tiny.yaml", "--set", "optim.lr=0.002", "--set", "model.dropout=null", "--set", "data.dataset=shards/a=b",
        "--set", "model.scratch.hidden_size=32", "--local_rank=0", "--resume", "auto", "--set", "train.epochs=2", "--config=x.yaml",
    ]


def test_a_sweep_agents_command_trains_with_its_values_into_its_run(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    parameters = {"optim.lr": {"value": 0.002}, "loss.mask_prob": {"value": 0.4}, "model.dropout": {"value": None}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(parameters))
    # As wandb's agent sets up a run: its ids and the parameter file in the environment, and the
    # parameters formatted by the sweep's default `${args}` after the command's fixed arguments.
    env = {
        **_env(), "WANDB_MODE": "offline",
        "WANDB_SWEEP_ID": "sweep0001", "WANDB_RUN_ID": "agentrun0001", "WANDB_SWEEP_PARAM_PATH": str(tmp_path / "params.yaml"),
    }
    sweep_args = [f"--{name}={spec['value']}" for name, spec in parameters.items()]
    command = [sys.executable, "launcher/train.py", "--config=configs/tiny.yaml", "--set", f"data.dataset={tiny_dataset}",
               "--set", f"run_dir={run_dir}", "--train.epochs=1", *sweep_args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    trained = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (trained["optim"]["lr"], trained["loss"]["mask_prob"], trained["model"]["dropout"], trained["train"]["epochs"]) == (0.002, 0.4, None, 1)
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == "agentrun0001", "a resume must reopen the agent's run"
    run_files = list((run_dir / "wandb").glob("offline-run-*-agentrun0001/run-agentrun0001.wandb"))
    assert len(run_files) == 1, sorted(path.name for path in (run_dir / "wandb").iterdir())
    logged = [row for row in read_offline_history(run_files[0]) if "final_metrics/_type" not in row]
    assert len(logged) == len(read_history(run_dir)) and any("valid/NDCG@10" in row for row in logged)
    # The sweep's metric is read from the run summary: the kept model's validation, not the last.
    summary = read_offline_summary(run_files[0])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert summary["valid/NDCG@10"] == metrics["valid"]["NDCG@10"]
    assert summary["peak_host_memory_mb"] == max(metrics["peak_host_memory_mb_by_rank"]) > 100
