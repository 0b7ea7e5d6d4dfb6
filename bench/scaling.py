"""Training throughput with 1 and 2 processes under each ZeRO stage, through the real launcher.

    python bench/scaling.py [--config configs/demo.yaml] [--steps 24] [--stages 0 1 2 3]

Each run is `torchrun --standalone --nproc_per_node P launcher/train.py --config ... --set
train.max_steps=N`; the figure is the mean total sequences/s over the logged steps after the
first (warm-up). The machine's cores are shared out: P processes x (cores / P) threads each.
Writes bench/results/scaling.json and scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, versions, write_results  # noqa: E402

from seqrec.tracking import read_history  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def measure(config: str, processes: int, stage: int, steps: int, work: Path, extra: list[str]) -> dict:
    run_dir = work / f"p{processes}-z{stage}"
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "launcher/train.py",
        "--config", config, "--set", f"run_dir={run_dir}", "--set", f"train.max_steps={steps}", "--set", "train.log_every=4",
        "--set", f"distributed.zero_stage={stage}", "--quiet", *extra,
    ]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = read_history(run_dir)
    rates = [row["sequences_per_s"] for row in rows if "sequences_per_s" in row and row["step"] > 1]
    tokens = [row["tokens_per_s"] for row in rows if "tokens_per_s" in row and row["step"] > 1]
    by_rank = [row["sequences_per_s_by_rank"] for row in rows if "sequences_per_s_by_rank" in row and row["step"] > 1]
    return {
        "processes": processes, "zero_stage": stage, "threads_per_process": threads,
        "sequences_per_s": round(sum(rates) / len(rates), 1), "tokens_per_s": round(sum(tokens) / len(tokens), 1),
        "sequences_per_s_by_rank": [round(sum(column) / len(column), 1) for column in zip(*by_rank)],
        "steps": steps, "wall_seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra job-config override")
    args = parser.parse_args()
    extra = [item for override in args.overrides for item in ("--set", override)]
    with tempfile.TemporaryDirectory() as scratch:
        runs = [measure(args.config, 1, 0, args.steps, Path(scratch), extra)]
        runs += [measure(args.config, 2, stage, args.steps, Path(scratch), extra) for stage in args.stages]
    single = runs[0]["sequences_per_s"]
    best_two = max(run["sequences_per_s"] for run in runs[1:])
    payload = {
        "runs": runs,
        "ratio_2_over_1": round(runs[1]["sequences_per_s"] / single, 3),
        "ratio_2_over_1_by_stage": {str(run["zero_stage"]): round(run["sequences_per_s"] / single, 3) for run in runs[1:]},
        "config": args.config, "overrides": args.overrides,
        "note": "one machine: the 2-process runs split the same cores the 1-process run uses alone, so the ratio "
                "measures distributed overhead (gradient all-reduce / ZeRO partitioning over gloo), not added hardware",
        "machine": machine(), "versions": versions(),
        "command": "python bench/scaling.py " + " ".join(sys.argv[1:]),
    }
    table = [(f"{run['processes']} process(es), ZeRO-{run['zero_stage']}", f"{run['sequences_per_s']} seq/s ({run['tokens_per_s']} tokens/s)") for run in runs]
    table.append(("ratio 2 / 1 processes (ZeRO-0)", str(payload["ratio_2_over_1"])))
    table.append(("best 2-process / 1-process", f"{best_two / single:.3f}"))
    print(json.dumps(payload, indent=2))
    write_results("scaling", payload, table)


if __name__ == "__main__":
    main()
