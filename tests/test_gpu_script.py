"""bench/gpu.sh's quality step: six runs side by side, each with its own log, and the step fails
when any run fails. A stand-in interpreter records what each run was asked to do, so the script's
orchestration is tested here, without a GPU; the runs themselves are bench/quality.py's."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

STAND_IN = """#!/usr/bin/env bash
[ "$1" = "-c" ] && exit 0
name=$(echo "$*" | grep -o -- '--label [^ ]*' | cut -d' ' -f2)
date +%s.%N > "$MARKS/$name.start"
echo "args: $*"
sleep 3
date +%s.%N > "$MARKS/$name.end"
echo "quality: test metrics (best epoch 1, 2 epochs, 3 s training)"
echo "header"
echo "seqrec 0.1 0.2 threads=$OMP_NUM_THREADS"
case "$*" in *"$FAIL_ON"*) exit 1 ;; esac
"""


def run_quality_step(tmp_path: Path, fail_on: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    stand_in, logs, marks = tmp_path / "python", tmp_path / "logs", tmp_path / "marks"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    marks.mkdir()
    env = {**os.environ, "PYTHON": str(stand_in), "LOGS": str(logs), "QUALITY_MINUTES": "0.5", "MARKS": str(marks), "FAIL_ON": fail_on}
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "quality"], env=env, capture_output=True, text=True, timeout=120)
    return result, logs, marks


def test_quality_step_runs_the_six_runs_side_by_side(tmp_path):
    result, logs, marks = run_quality_step(tmp_path, fail_on="no run has this")
    assert result.returncode == 0, result.stdout + result.stderr
    beauty = "--dataset beauty --recipes default --epochs 40 --minutes 0.5 --set train.patience=8 --set train.eval_every=2"
    expected = {
        "ml-1m-6-layers": "--dataset ml-1m --keep-layers 6 --recipes default --minutes 0.5",
        "beauty-6-layers": f"{beauty} --keep-layers 6 --label gpu-6-layers-40-epochs",
        **{f"beauty-seed-{seed}": f"{beauty} --set train.seed={seed} --label gpu-seed-{seed}-40-epochs" for seed in range(4)},
    }
    for name, arguments in expected.items():
        log = (logs / f"quality-{name}.log").read_text()
        assert f"args: bench/quality.py {arguments}" in log
        assert "threads=2" in log
    starts = [float(path.read_text()) for path in marks.glob("*.start")]
    ends = [float(path.read_text()) for path in marks.glob("*.end")]
    assert len(starts) == len(ends) == 6
    assert max(starts) < min(ends), "the runs ran one after another, not side by side"
    assert "gpu.sh: 0 step(s) failed" in result.stdout


def test_quality_step_fails_when_one_run_fails(tmp_path):
    result, _, _ = run_quality_step(tmp_path, fail_on="--set train.seed=2")
    assert result.returncode == 1
    assert "beauty-seed-2: failed" in result.stdout
    assert "beauty-seed-1: seqrec 0.1 0.2" in result.stdout
    assert "gpu.sh: 1 step(s) failed" in result.stdout
