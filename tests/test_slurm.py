"""A real single-node SLURM cluster on 127.0.0.1 runs launcher/slurm/train.sbatch with 2 tasks.

Installs Debian's slurm-wlm and munge when missing (root + apt-get), starts munged, slurmctld and
slurmd by hand with a config under a temp dir, submits with `sbatch --wait`, and stops the
daemons by PID. Skips with the reason where that is impossible, unless SEQREC_REQUIRE_SLURM=1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO, logged_steps

DAEMONS = ("sbatch", "scontrol", "slurmctld", "slurmd", "munged")


def _unavailable(reason: str):
    if os.environ.get("SEQREC_REQUIRE_SLURM") == "1":
        pytest.fail(reason + "; SEQREC_REQUIRE_SLURM=1 makes this a failure")
    pytest.skip(reason)


def _ensure_installed() -> None:
    if all(shutil.which(name) or Path("/usr/sbin", name).exists() for name in DAEMONS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        _unavailable("SLURM is not installed and apt-get as root is not available to install slurm-wlm and munge")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            _unavailable(f"installing slurm-wlm and munge failed: {result.stderr[-500:]}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin") / name)


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


@contextmanager
def slurm_cluster(root: Path):
    """munged + slurmctld + slurmd on 127.0.0.1, one node with 2 CPUs; yields the environment for sbatch."""
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(parents=True)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    munge_socket = root / "munge" / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(f"""
ClusterName=seqrectest
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'slurmctld.log'}
SlurmdLogFile={root / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    # A CPU cluster of one node: its jobs' ranks are gloo ranks, even where this machine has a GPU.
    env = dict(os.environ, SLURM_CONF=str(conf), CUDA_VISIBLE_DEVICES="")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    pid_files = [root / "munged.pid", root / "slurmctld.pid", root / "slurmd.pid"]
    try:
        subprocess.run([
            _binary("munged"), "--force", f"--socket={munge_socket}", f"--key-file={key}", f"--pid-file={pid_files[0]}",
            f"--log-file={root / 'munged.log'}", f"--seed-file={root / 'munge' / 'seed'}",
        ], check=True, env=env, capture_output=True, timeout=60)
        subprocess.run([_binary("slurmctld"), "-i"], check=True, env=env, capture_output=True, timeout=60)
        subprocess.run([_binary("slurmd"), "-N", "localhost"], check=True, env=env, capture_output=True, timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                break
            if not all(_alive(pid_file) for pid_file in pid_files):
                break
            time.sleep(0.5)
        if state not in ("idle", "mixed", "allocated"):
            raise AssertionError(f"the SLURM node never became idle (state {state!r}): {(root / 'slurmctld.log').read_text()[-2000:]}")
        yield env
    finally:
        for pid_file in reversed(pid_files):
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(0.5)


@pytest.mark.timeout(900)
def test_sbatch_runs_two_task_training_and_writes_checkpoint_and_metrics(tiny_dataset, tmp_path):
    _ensure_installed()
    run_dir = tmp_path / "run"
    with slurm_cluster(tmp_path / "slurm") as env:
        command = [
            "sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={tmp_path / 'job-%j.log'}",
            f"--chdir={REPO}", "launcher/slurm/train.sbatch", "configs/tiny.yaml",
            "--set", f"data.dataset={tiny_dataset}", "--set", f"run_dir={run_dir}", "--set", "train.epochs=2",
            "--set", "train.checkpoint_every=5", "--set", "tracking.wandb=disabled",
        ]
        env["SEQREC_PYTHON"] = str(Path(os.sys.executable))
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        logs = "".join(path.read_text() for path in tmp_path.glob("job-*.log"))
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{logs[-4000:]}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] > 0 and metrics["backend"] == "gloo"
    assert any((path / "COMPLETE").is_file() for path in (run_dir / "checkpoints").iterdir())
    assert "2 process(es) (srun" in logs


def _job_state(job: str, env: dict) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(word.split("=", 1) for word in shown.split() if word.startswith(("JobState=", "Restarts=")))


@pytest.mark.timeout(900)
def test_the_time_limit_signal_checkpoints_requeues_and_the_job_resumes_to_the_end(tiny_dataset, tmp_path):
    """What `--signal=B:USR1@300` does near the time limit, sent at once with scancel: the batch
    shell passes it to every task (and so to every process of theirs, the reader's included), the
    tasks stop at one step and checkpoint, and the job requeues itself and continues from there."""
    _ensure_installed()
    run_dir = tmp_path / "run"
    with slurm_cluster(tmp_path / "slurm") as env:
        env["SEQREC_PYTHON"] = str(Path(os.sys.executable))
        submitted = subprocess.run([
            "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={tmp_path / 'job-%j.log'}",
            f"--chdir={REPO}", "launcher/slurm/train.sbatch", "configs/tiny.yaml",
            "--set", f"data.dataset={tiny_dataset}", "--set", f"run_dir={run_dir}", "--set", "train.epochs=10", "--set", "train.log_every=1",
            "--set", "data.num_workers=1", "--set", "tracking.wandb=disabled",
        ], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert submitted.returncode == 0, submitted.stderr
        job = submitted.stdout.strip().split(";")[0]
        logs = lambda: "".join(path.read_text() for path in tmp_path.glob("job-*.log"))  # noqa: E731
        deadline = time.monotonic() + 300
        while len(logged_steps(run_dir)) < 3:
            assert time.monotonic() < deadline and _job_state(job, env).get("JobState") in ("PENDING", "RUNNING"), logs()[-4000:]
            time.sleep(0.1)
        assert subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, timeout=60).returncode == 0
        deadline, requeued_at = time.monotonic() + 300, None
        while (state := _job_state(job, env)).get("JobState") != "COMPLETED":
            assert time.monotonic() < deadline and state.get("JobState") in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"), (state, logs()[-4000:])
            if state.get("JobState") == "PENDING" and state.get("Restarts") == "1":
                # SLURM holds a requeued job back for minutes; the test need not wait that long,
                # but a start within the second of the requeue meets the old run's revoked
                # credential (slurmd compares whole seconds) and fails: 3 s, then release it.
                requeued_at = requeued_at or time.monotonic()
                if time.monotonic() - requeued_at > 3:
                    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True, timeout=60)
            time.sleep(0.2)
        log = logs()
    assert state.get("Restarts") == "1"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stopped_at = int(Path(metrics["resumed_from"]).name.removeprefix("step_"))
    assert 3 <= stopped_at < metrics["steps"]
    assert "0: seqrec train: stopped by SIGUSR1 on rank 0, SIGUSR1 on rank 1 at step" in log
    assert "requeueing to continue from its checkpoint" in log and "(restart 1)" in log
    assert "died unexpectedly" not in log, "the reader's helper processes must not die of the signal"
    steps = logged_steps(run_dir)
    assert steps == list(range(1, metrics["steps"] + 1)), "each step once, across the requeue"
