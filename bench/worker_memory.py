"""Memory of the reader workers beside the trainer, per worker start method (`data.worker_start`).

    python bench/worker_memory.py [--dataset beauty] [--batch 1024] [--epochs 3] [--methods fork forkserver]

Each method trains the `make demo` recipe (configs/demo.yaml) on the prepared dataset for a few
epochs, one thread, no validation until the end, while this script reads every descendant
process's private memory (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup) once per
`--interval` seconds. The loop builds a new DataLoader every epoch; a forked worker starts as a
copy of the trainer and comes to own the old copy of every page the trainer writes while it
lives, so its private memory grows toward the trainer's own. Reported per method: the trainer's
peak, each reader worker's peak (in start order: one per epoch) and the forkserver's.
Linux only. Writes bench/results/worker_memory.json and .md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import code_version, machine, versions, write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def private_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            return sum(int(line.split()[1]) for line in rollup if line.startswith(("Private_Clean:", "Private_Dirty:"))) / 1024
    except OSError:  # the process ended between listing and reading
        return 0.0


def children(pid: int) -> list[int]:
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:  # ended
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as listing:
                found += [int(child) for child in listing.read().split()]
        except OSError:
            pass
    return found


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as handle:
            return handle.read().replace("\0", " ")
    except OSError:
        return ""


def reader_processes(trainer: int) -> dict[int, str]:
    """The trainer's reader workers and forkserver by pid. A forked worker is a child running the
    trainer's own command line; the forkserver is a child running multiprocessing.forkserver, and
    its children are workers. Other children (compilers, the resource tracker) are left out."""
    roles = {trainer: "trainer"}
    own = command_line(trainer)
    for child in children(trainer):
        command = command_line(child)
        if command == own:
            roles[child] = "worker"
        elif "multiprocessing.forkserver" in command:
            roles[child] = "forkserver"
            roles.update({grandchild: "worker" for grandchild in children(child)})
    return roles


def measure(method: str, args: argparse.Namespace, run_root: Path) -> dict:
    command = [
        sys.executable, str(REPO / "launcher" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"),
        "--set", f"data.dataset={args.dataset}", "--set", f"train.batch_size={args.batch}", "--set", f"train.epochs={args.epochs}",
        "--set", f"train.eval_every={args.epochs}", "--set", "train.device=cpu", "--set", f"data.worker_start={method}",
        "--set", f"name=worker-memory-{method}", "--set", f"run_dir={run_root / method}",
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    peaks: dict[int, tuple[str, float]] = {}
    started = time.perf_counter()
    with open(run_root / f"{method}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=REPO)
        while process.poll() is None:
            for pid, kind in reader_processes(process.pid).items():
                peaks[pid] = (kind, max(peaks.get(pid, (kind, 0.0))[1], private_mb(pid)))
            time.sleep(args.interval)
    if process.returncode != 0:
        raise SystemExit(f"{method}: training exited with {process.returncode}; see {run_root / f'{method}.log'}")
    by_role = {kind: [round(mb) for pid, (k, mb) in sorted(peaks.items()) if k == kind] for kind in ("trainer", "worker", "forkserver")}
    return {
        "trainer_peak_mb": max(by_role["trainer"], default=0),
        "worker_peaks_mb": by_role["worker"],
        "forkserver_peak_mb": max(by_role["forkserver"], default=0),
        "largest_worker_mb": max(by_role["worker"], default=0),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="beauty", help="beauty, ml-1m, or a prepared dataset directory")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["fork", "forkserver"], choices=["fork", "forkserver", "spawn"])
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory readings")
    args = parser.parse_args()
    if not Path("/proc/self/smaps_rollup").exists():
        raise SystemExit("worker_memory.py reads /proc/PID/smaps_rollup: Linux only")
    from quality import prepared

    args.dataset = str(prepared(args.dataset)[0]) if not Path(args.dataset).is_dir() else args.dataset
    with tempfile.TemporaryDirectory(prefix="worker-memory-") as scratch:
        figures = {method: measure(method, args, Path(scratch)) for method in args.methods}
    payload = {
        "methods": figures,
        "setting": f"configs/demo.yaml on {Path(args.dataset).name}, batch {args.batch}, {args.epochs} epochs, one thread, one reader worker",
        "machine": machine(), "versions": versions(), "code": code_version(),
        "command": "python bench/worker_memory.py " + " ".join(sys.argv[1:]),
    }
    table = [(f"{method}: trainer / largest worker / forkserver (MB)",
              f"{f['trainer_peak_mb']} / {f['largest_worker_mb']} / {f['forkserver_peak_mb']} (workers by epoch: {f['worker_peaks_mb']})")
             for method, f in figures.items()]
    write_results("worker_memory", payload, table)
    for label, value in table:
        print(f"{label}: {value}")


if __name__ == "__main__":
    main()
