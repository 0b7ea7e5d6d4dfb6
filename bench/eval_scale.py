"""Item-sharded full-catalogue evaluation at scale: synthetic catalogues up to 1M items.

    python bench/eval_scale.py [--users 100000] [--items 100000 300000 1000000] [--processes 1 2] [--hidden 64]

Each configuration runs under `torchrun --standalone --nproc_per_node P` (the machine's cores
shared out among the processes): a 2-layer BERT of the given hidden size with one token per item,
synthetic histories (1..19 items), exact ranks + top-20 for every user. Reported: evaluation wall
time (after model build, max over ranks); per rank the memory evaluation adds on top of the
model (sampled RSS) beside the score buffer bound (batch x items / ranks), and the process peak. Writes bench/results/eval_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, versions, write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MAX_LEN = 20


class RssSampler:
    """Resident memory sampled every 20 ms on a thread: (at start, peak) in MB. ru_maxrss alone
    would report the model build's peak, not the evaluation's."""

    def __init__(self):
        import threading

        self.start_mb = self.peak_mb = self._rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _run(self) -> None:
        while not self._done.wait(0.02):
            self.peak_mb = max(self.peak_mb, self._rss())

    def stop(self) -> tuple[float, float]:
        self._done.set()
        self._thread.join()
        return self.start_mb, max(self.peak_mb, self._rss())


def worker(items: int, users: int, hidden: int, batch: int, out: Path) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from seqrec import distributed
    from seqrec.config import load_config
    from seqrec.data.split import EvalSet
    from seqrec.model import build_model
    from seqrec.sharded_eval import evaluate_sharded

    info = distributed.init("cpu", timeout_minutes=60)
    config = load_config(None, [
        "model.pretrained=null", f"model.scratch.hidden_size={hidden}", f"model.scratch.intermediate_size={4 * hidden}",
        "model.scratch.num_attention_heads=2", f"data.max_len={MAX_LEN}", "model.item_init=random",
    ])
    torch.manual_seed(0)
    model, _ = build_model(config.model, items, MAX_LEN)
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, MAX_LEN, size=users)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # Popularity-skewed histories, so exclusion and ties behave like real data.
    history = np.minimum(rng.zipf(1.2, size=int(offsets[-1])), items).astype(np.int32)
    targets = rng.integers(1, items + 1, size=users).astype(np.int32)
    data = EvalSet(np.arange(users, dtype=np.int64), offsets, history, targets)
    dist.barrier()
    sampler = RssSampler()
    started = time.perf_counter()
    result = evaluate_sharded(model, data, batch, MAX_LEN, (1, 5, 10, 20), True, torch.device("cpu"))
    seconds = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    during = sampler.stop()
    peak = distributed.gather_floats([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, during[0], during[1]])
    if info.is_main:
        out.write_text(json.dumps({
            "items": items, "users": users, "processes": info.world_size, "hidden": hidden, "eval_batch": batch,
            "seconds": round(float(seconds), 2), "users_per_s": round(users / float(seconds), 1),
            "peak_rss_mb_per_rank": [round(row[0], 1) for row in peak],
            "eval_peak_rss_mb_per_rank": [round(row[2], 1) for row in peak],
            "eval_growth_mb_per_rank": [round(row[2] - row[1], 1) for row in peak],
            "score_buffer_mb_per_rank": round(batch * -(-items // info.world_size) * 4 / 2**20, 1),
            "NDCG@10": round(result.metrics["NDCG@10"], 6),
        }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128, help="users per evaluation batch (eval.batch_size)")
    parser.add_argument("--worker", nargs=2, metavar=("ITEMS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(int(args.worker[0]), args.users, args.hidden, args.batch, Path(args.worker[1]))
        return
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for items in args.items:
            # The catalogue-growth series runs on the first process count; all counts at the largest.
            for processes in args.processes if items == max(args.items) else args.processes[:1]:
                out = Path(scratch) / f"{items}-{processes}.json"
                env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // processes)), PYTHONPATH=str(REPO))
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", __file__,
                           "--users", str(args.users), "--hidden", str(args.hidden), "--batch", str(args.batch), "--worker", str(items), str(out)]
                subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
                runs.append(json.loads(out.read_text()))
                print(json.dumps(runs[-1]), flush=True)
    by_key = {(run["items"], run["processes"]): run for run in runs}
    largest = max(args.items)
    summary = {}
    if (largest, 1) in by_key and (largest, 2) in by_key:
        summary["seconds_ratio_2_over_1_at_largest"] = round(by_key[(largest, 2)]["seconds"] / by_key[(largest, 1)]["seconds"], 3)
        summary["eval_growth_ratio_per_rank_2_over_1_at_largest"] = round(
            max(by_key[(largest, 2)]["eval_growth_mb_per_rank"]) / by_key[(largest, 1)]["eval_growth_mb_per_rank"][0], 3)
    smallest = min(args.items)
    summary["seconds_growth_vs_smallest_catalogue_1_process"] = {
        str(items): round(by_key[(items, 1)]["seconds"] / by_key[(smallest, 1)]["seconds"], 2) for items in args.items if (items, 1) in by_key
    }
    payload = {
        "runs": runs, **summary,
        "note": "2 processes share the same 2 cores the 1-process run uses alone: time shows overhead, memory per rank shows the sharding",
        "machine": machine(), "versions": versions(), "command": "python bench/eval_scale.py " + " ".join(sys.argv[1:]),
    }
    table = [(f"{run['items']:,} items, {run['users']:,} users, {run['processes']} process(es)",
              f"{run['seconds']} s ({run['users_per_s']} users/s); per rank: evaluation adds {run['eval_growth_mb_per_rank']} MB "
              f"(score buffer {run['score_buffer_mb_per_rank']} MB), process peak {run['peak_rss_mb_per_rank']} MB") for run in runs]
    table += [(key, str(value)) for key, value in summary.items()]
    write_results("eval_scale", payload, table)


if __name__ == "__main__":
    main()
