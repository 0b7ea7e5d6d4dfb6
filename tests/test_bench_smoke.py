"""The benchmarks with a smoke mode run end to end: their figures are not checked here (they
belong to bench/results, measured alone on the machine), only that the scripts still run against
the package and the other benchmarks' helpers they import, and report every headline key."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from seqrec import linear_kernel
from seqrec.runtime import cpu_supports_bf16
from tests.conftest import REPO, bench_module, data_dir, require_data


def _quick(script: str, *arguments: str, timeout: int) -> dict:
    env = {**os.environ, "SEQREC_DATA_DIR": str(data_dir()), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, f"bench/{script}", "--quick", *arguments], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = result.stdout
    return json.loads(printed[printed.rindex("\n{") + 1:])  # the last figures printed: a run prints them after each part


def test_the_efficiency_benchmark_runs_and_reports_its_headline_ratios():
    require_data("beauty.txt")
    # The linear-kernel A/B where this CPU can run the token-major kernel (oneDNN with bf16).
    ab = ["--linear-kernel-ab", "16x1W"] if linear_kernel.available() else []
    figures = _quick("efficiency.py", "--batch", "16", "--keep-layers", "1", *ab, "--activation-kernel-ab", "16x1c", timeout=600)
    for key in ("vs_naive_ratio", "mfu_cpu", "eval_users_per_s_ratio", "reader_over_step_ratio"):
        assert figures[key] > 0, (key, figures[key])
    assert figures["mfu_cpu_best_setting"]["mfu"] >= figures["mfu_cpu"]
    if ab:
        rounds = figures["details"]["linear_kernel_ab"]["step_s_rounds"]
        assert len(rounds["torch"]) == len(rounds["token_major"]) == 3 and figures["details"]["linear_kernel_ab"]["speedup_median"] > 0
    rounds = figures["details"]["activation_kernel_ab"]["step_s_rounds"]
    assert len(rounds["torch"]) == len(rounds["aten"]) == 3 and figures["details"]["activation_kernel_ab"]["speedup_median"] > 0


def test_efficiency_settings_parse_with_their_flags_and_reject_typos():
    efficiency = bench_module("efficiency")
    assert efficiency.parse_mfu_setting("256x2") == ("beauty", 256, 2, "")
    assert efficiency.parse_mfu_setting("ml-1m:64x2e") == ("ml-1m", 64, 2, "e")
    assert efficiency.parse_mfu_setting("1024x6cd") == ("beauty", 1024, 6, "cd")
    assert efficiency.parse_mfu_setting("ml-1m:64x6cw") == ("ml-1m", 64, 6, "cw")
    assert efficiency.parse_mfu_setting("ml-1m:64x4Wct") == ("ml-1m", 64, 4, "Wct")
    assert efficiency.parse_mfu_setting("ml-1m:64x4Wci") == ("ml-1m", 64, 4, "Wci")
    for typo in ("64x", "64x2x3", "64x2q", "64x2cc", "ax2", "0x2", "64x2wW"):
        with pytest.raises(SystemExit, match="--mfu-settings"):
            efficiency.parse_mfu_setting(typo)
    for setting in (setting for settings in efficiency.DEFAULT_MFU_SETTINGS.values() for setting in settings):
        efficiency.parse_mfu_setting(setting)


def test_the_host_overhead_benchmark_runs_and_counts_operators():
    figures = _quick("host_overhead.py", timeout=300)
    assert figures["seqrec_over_plain_step_time"] > 0
    assert all(counts["aten"] > 0 for counts in figures["operators_per_step"].values())


@pytest.mark.skipif(not (cpu_supports_bf16() and linear_kernel.available()), reason="the kernels compared are bf16 ones: this CPU has no native bf16 in oneDNN")
def test_the_cpu_kernels_benchmark_times_both_kernel_pairs():
    figures = _quick("cpu_kernels.py", timeout=300)
    assert [(row["in_features"], row["out_features"]) for row in figures["weight_gradient"]] == [(384, 1536), (1536, 384), (384, 384)]
    assert all(row["plain_ms"] > 0 and row["token_major_ms"] > 0 and row["speedup_median"] > 0 for row in figures["weight_gradient"])
    assert [row["seqrec_takes_token_major"] for row in figures["weight_gradient"]] == [False, False, False]
    assert len(figures["gelu"]) == 1 and figures["gelu"][0]["inductor_ms"] > 0 and figures["gelu"][0]["aten_ms"] > 0


def test_the_cpu_kernels_benchmark_counts_near_equal_timings_as_ties():
    cpu_kernels = bench_module("cpu_kernels")
    assert [cpu_kernels.token_major_wins(speedup) for speedup in (1.3, 1.04, 0.97, 0.8)] == [True, None, None, False]


def test_the_warm_start_benchmark_runs_all_three_trainings(tmp_path):
    figures = _quick("warm_start.py", "--workdir", str(tmp_path / "work"), timeout=300)
    assert figures["runs"]["warm"]["item_init"]["carried"] > 0 and figures["runs"]["warm"]["item_init"]["mean"] > 0
    assert figures["runs"]["fresh"]["item_init"].get("carried") is None
    assert all(figures["runs"][name]["test_new_item_targets"]["users"] > 0 for name in ("fresh", "warm"))
    assert figures["warm_over_fresh_test_ndcg10"] > 0


def test_every_benchmark_script_parses_its_command_line():
    scripts = sorted(path.name for path in (REPO / "bench").glob("*.py") if path.name != "common.py")
    assert {"efficiency.py", "quality.py", "recbole.py"} <= set(scripts)
    for script in scripts:
        result = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "usage:" in result.stdout, (script, result.stderr[-2000:])
