"""bench/gpu.sh's quality step: six runs side by side, each with its own log, and the step fails
when any run fails. A stand-in interpreter records what each run was asked to do, so the script's
orchestration is tested here, without a GPU; the runs themselves are bench/quality.py's."""

import os
import re
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
    ml1m = "--dataset ml-1m --keep-layers 6 --recipes default --minutes 0.5 --set train.epochs=1000 --set train.patience=10"
    expected = {
        **{f"ml-1m-6-layers-seed-{seed}": f"{ml1m} --set train.seed={seed} --label gpu-6-layers-seed-{seed}-0.5-min" for seed in range(3)},
        **{f"beauty-seed-{seed}": f"{beauty} --set train.seed={seed} --label gpu-seed-{seed}-40-epochs" for seed in range(3)},
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
    result, _, _ = run_quality_step(tmp_path, fail_on="--label gpu-seed-2-40-epochs")
    assert result.returncode == 1
    assert "beauty-seed-2: failed" in result.stdout
    assert "beauty-seed-1: seqrec 0.1 0.2" in result.stdout
    assert "ml-1m-6-layers-seed-2: seqrec 0.1 0.2" in result.stdout
    assert "gpu.sh: 1 step(s) failed" in result.stdout


LEASE_GPU_SH = """#!/usr/bin/env bash
step=$1
date +%s.%N > "$MARKS/$step.start"
echo "== $step: running"
# The checks outlast the quality step here, so a lease that did not wait for them would show.
[ "$step" = quality ] && sleep 1 || sleep 4
date +%s.%N > "$MARKS/$step.end"
echo "== $step: exit 0"
[ "$step" = quality ] && [ -n "$FAIL_QUALITY" ] && exit 1
exit 0
"""

LEASE_PYTHON = """#!/usr/bin/env bash
[ "$1" = "-c" ] && { echo "torch stand-in"; exit 0; }
date +%s.%N > "$MARKS/efficiency.start"
echo "efficiency args: $*"
"""


def run_lease(tmp_path: Path, budget: int, fail_quality: str = "") -> tuple[subprocess.CompletedProcess, Path, Path]:
    """bench/gpu_lease.sh with gpu.sh and the interpreter stood in for: what runs beside what,
    and what comes back, without a GPU."""
    gpu_sh, python, marks, out, logs = (tmp_path / name for name in ("gpu.sh", "python", "marks", "out", "logs"))
    for path, text in ((gpu_sh, LEASE_GPU_SH), (python, LEASE_PYTHON)):
        path.write_text(text)
        path.chmod(0o755)
    marks.mkdir()
    env = {**os.environ, "GPU_SH": str(gpu_sh), "PYTHON": str(python), "LOGS": str(logs), "MARKS": str(marks),
           "FAIL_QUALITY": fail_quality, "KIT": str(tmp_path / "no-kit")}
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_lease.sh"), str(budget), str(out)], env=env,
                            capture_output=True, text=True, timeout=120)
    return result, marks, out


def _packed(out: Path) -> set[str]:
    listing = subprocess.run(["tar", "tzf", str(out / "gpu-results.tgz")], capture_output=True, text=True, check=True).stdout
    return {Path(line).name for line in listing.splitlines()}


def test_lease_runs_the_checks_beside_quality_then_efficiency_alone_and_packs_the_logs(tmp_path):
    result, marks, out = run_lease(tmp_path, budget=200)
    assert result.returncode == 0, result.stdout + result.stderr
    mark = {path.name: float(path.read_text()) for path in marks.iterdir()}
    assert mark["quality.start"] < mark["cuda-tests.end"] and mark["cuda-tests.start"] < mark["quality.end"], "not side by side"
    assert mark["efficiency.start"] > max(mark["quality.end"], mark["cuda-tests.end"]), "efficiency shared the GPU"
    limit = re.search(r"efficiency: exit 0 after \d+ s \(limit (\d+) s\)", result.stdout)
    assert limit and 150 <= int(limit.group(1)) <= 175, result.stdout  # 200 s less the few spent and a 25 s margin
    assert {"checks.txt", "quality.txt", "efficiency.log", "efficiency.json"} <= _packed(out)
    assert "gpu_lease: packed after" in result.stdout


def test_lease_skips_efficiency_without_the_time_and_still_packs_after_a_failed_step(tmp_path):
    result, marks, out = run_lease(tmp_path, budget=30, fail_quality="yes")
    assert "quality: exit 1" in result.stdout
    assert "efficiency: skipped" in result.stdout and not (marks / "efficiency.start").exists()
    assert {"checks.txt", "quality.txt"} <= _packed(out)
