"""Benchmark of `seqrec prepare` at scale: a synthetic log of ~20M interactions on this machine.

    python bench/prepare.py [--preset large] [--keep DIR]

Writes bench/results/prepare.json: interactions, seconds, interactions_per_s, peak_rss_mb, machine.
`seqrec prepare` runs in a child process so its wall time and peak RSS are its own.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="large", help="synthetic preset (large = ~20M interactions)")
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        log_path, out = work / f"synthetic-{args.preset}.csv", work / "prepared"
        subprocess.run([sys.executable, "-m", "seqrec", "synth", "--preset", args.preset, "--out", str(log_path), "--quiet"], check=True)
        command = [sys.executable, "-m", "seqrec", "prepare", str(log_path), "--out", str(out), "--force", "--quiet"]
        started = time.perf_counter()
        child = subprocess.Popen(command)
        # wait4 gives this child's own peak RSS (RUSAGE_CHILDREN would mix in the synth step).
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise SystemExit(f"seqrec prepare failed with exit code {child.returncode}")
        peak_kb = usage.ru_maxrss
        meta = json.loads((out / "meta.json").read_text())

    interactions = meta["counts"]["raw_interactions"]
    payload = {
        "interactions": interactions,
        "seconds": round(seconds, 2),
        "interactions_per_s": round(interactions / seconds),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "machine": machine(),
        "users": meta["counts"]["users"],
        "items": meta["counts"]["items"],
        "shards": len(meta["shards"]),
        "input_bytes": meta["source"]["source"]["bytes"],
        "command": f"python bench/prepare.py --preset {args.preset}",
        "measured": "wall time and peak RSS of `seqrec prepare` in a child process (synthetic CSV with timestamps, users interleaved)",
        "versions": versions(),
    }
    path = write_results(
        "prepare", payload,
        [("interactions", f"{interactions:,}"), ("seconds", payload["seconds"]), ("interactions/s", f"{payload['interactions_per_s']:,}"),
         ("peak RSS (MB)", payload["peak_rss_mb"]), ("machine", payload["machine"])],
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
