"""What `model.activation_checkpointing` saves and costs: a training step's transient memory
(the activations kept for the backward pass, the scores, temporaries) and its time, per setting.

    python bench/activation_memory.py [--device cpu|cuda] [--layers 6] [--batch 64] [--length 200]
        [--items 3416] [--settings 0 1 2] [--steps 2]

Each setting runs in a fresh process: the pretrained MiniLM (first --layers layers, its own
dropout) with --items item tokens, the product's loss (mask 0.3, tail always masked) on full-length
rows of random items, fp32 on a CPU and bf16 autocast on a GPU. One untimed step allocates the
gradients; then each of --steps timed steps measures the memory it needs above what was held
before it:
  - GPU: torch.cuda.max_memory_allocated() after the step minus memory_allocated() before it;
  - CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus its
    resident set before the step. The child runs with glibc's mmap threshold fixed at 64 KiB, so
    every tensor is mapped on allocation and unmapped on free, and the resident set follows the
    live tensors (the trainer's own `train.keep_host_memory` keeps freed memory instead).
The defaults are ML-1M's shape (length 200, 3,416 items). Ratios against setting 0 come from one
run. Writes bench/results/activation_memory.json and .md (activation_memory_gpu.* with --device cuda).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import code_version, machine, synchronize, versions, write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class StepMemory:
    """Memory a step needs above what is held before it (MiB), on the GPU or from the resident set."""

    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # peak resident set := current
            self.before = _resident_kib("VmRSS") * 1024

    def peak_mib(self) -> float:
        import torch

        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else _resident_kib("VmHWM") * 1024
        return round((peak - self.before) / 2**20, 1)


def child(args: argparse.Namespace, every: int) -> dict:
    import torch

    from seqrec.config import load_config
    from seqrec.losses import LossWeights, MaskedItemObjective
    from seqrec.model import build_model
    from seqrec.runtime import autocast_dtype

    device = torch.device(args.device)
    config = load_config(None, [f"model.keep_layers={args.layers}", f"model.activation_checkpointing={every}", f"data.max_len={args.length}"])
    torch.manual_seed(0)
    model, _ = build_model(config.model, args.items, args.length, device=device)
    model.to(device).train()
    objective = MaskedItemObjective(model, config.loss.mask_prob)
    amp = autocast_dtype("auto", device)
    generator = torch.Generator().manual_seed(1)
    memory, seconds, peaks = StepMemory(device), [], []
    for step in range(args.steps + 1):
        items = torch.randint(1, args.items + 1, (args.batch, args.length), generator=generator).to(device)
        draws = torch.rand((args.batch, args.length), generator=generator).to(device)
        synchronize(device)
        memory.start()
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = objective(items, draws).combine(LossWeights(0.0, 1.0)).total
        loss.backward()
        synchronize(device)
        if step > 0:  # the first step also allocates the gradients
            seconds.append(time.perf_counter() - started)
            peaks.append(memory.peak_mib())
        model.zero_grad(set_to_none=False)
        del loss
    return {"activation_checkpointing": every, "step_memory_mib": max(peaks), "step_s": round(sum(seconds) / len(seconds), 3),
            "precision": str(amp or "fp32")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--layers", type=int, default=6, help="MiniLM layers kept (6 = all)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--items", type=int, default=3416)
    parser.add_argument("--settings", type=int, nargs="+", default=[0, 1, 2], help="model.activation_checkpointing values; the first is the reference")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting, after one untimed step")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args, args.child)))
        return
    shared = ["--device", args.device, "--layers", str(args.layers), "--batch", str(args.batch), "--length", str(args.length),
              "--items", str(args.items), "--steps", str(args.steps)]
    env = dict(os.environ, PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for every in args.settings:
        done = subprocess.run([sys.executable, __file__, *shared, "--child", str(every)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"activation_memory: setting {every} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    reference = rows[0]
    for row in rows:
        row["memory_vs_first"] = round(row["step_memory_mib"] / reference["step_memory_mib"], 3)
        row["time_vs_first"] = round(row["step_s"] / reference["step_s"], 3)
    payload = {
        "shape": {"layers": args.layers, "batch": args.batch, "length": args.length, "items": args.items, "device": args.device},
        "results": rows,
        "machine": machine(), "versions": versions(), "code": code_version(),
        "command": " ".join(["python bench/activation_memory.py", *sys.argv[1:]]),
    }
    table = [("shape", f"{args.layers} MiniLM layers, batch {args.batch} x length {args.length}, {args.items} items, {args.device}, {rows[0]['precision']}")]
    table += [(f"model.activation_checkpointing={row['activation_checkpointing']}",
               f"step memory {row['step_memory_mib']} MiB ({row['memory_vs_first']}x), step {row['step_s']} s ({row['time_vs_first']}x)")
              for row in rows]
    table += [("machine", payload["machine"]), ("code", payload["code"]), ("command", payload["command"])]
    write_results("activation_memory" if args.device == "cpu" else "activation_memory_gpu", payload, table)


if __name__ == "__main__":
    main()
