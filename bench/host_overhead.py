"""Host work per training step: seqrec's step against a plain PyTorch step of the same model, on a
model so small that the device's arithmetic is negligible, so what is timed is the work of issuing
the operators (Python, the dispatcher, autocast's casts and, on a GPU, kernel launches).

    python bench/host_overhead.py [--device cpu|cuda] [--layers 6] [--batch 8] [--length 10] [--rounds 5] [--no-compile]

Why: on an H200 the eager Beauty step took ~33 ms at every batch from 64 to 1024 (efficiency.json,
key gpu): launch-bound. This says how much of that host work seqrec's own code (the DeepSpeed
engine, masking on the device, the catalogue loss, the job's clipping) adds over the encoder
itself, and how much `model.compile` takes away, so the cure is aimed at the right part.

Steps, all bf16 autocast, the same scratch BERT (hidden 32, 2 heads, `--layers` layers, 1,000
items) and the same batches:
  seqrec           the product's step: TrainingEngine (DeepSpeed ZeRO-0), masking from draws,
                   masked + tail losses over the item rows, clipping, fused AdamW
  seqrec_compiled  the same with `model.compile` (each encoder layer torch.compile'd)
  plain            HF BertForMaskedLM's encoder, the tail states (one gather) times the item rows,
                   cross-entropy, clip_grad_norm_, fused AdamW: the least a hand-written step does
Timed in alternating rounds (the median of per-round ratios); operator counts from torch.profiler
(aten operators, nested ones included; on a GPU also kernel launches).
Writes bench/results/host_overhead.json (a GPU run under the key "gpu") and host_overhead.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, code_version, machine, synchronize, versions, write_results  # noqa: E402

NUM_ITEMS = 1000
HIDDEN = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round and step kind")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the model.compile step (no C++ compiler)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 1 round, no compile; figures printed, not kept")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.compile = 3, 1, False

    import torch
    import torch.nn.functional as F

    from seqrec import distributed
    from seqrec.config import load_config
    from seqrec.engine import TrainingEngine, plan_batches
    from seqrec.losses import LossWeights, MaskedItemObjective
    from seqrec.model import build_model
    from seqrec.train import optimizer_step

    device, _ = distributed.start(args.device, timeout_minutes=10)
    config = load_config(None, [
        "model.pretrained=null", f"model.scratch.hidden_size={HIDDEN}", "model.scratch.num_attention_heads=2",
        f"model.scratch.num_hidden_layers={args.layers}", "model.scratch.intermediate_size=64", "model.dropout=0.0",
        f"data.max_len={max(args.length, 8)}", "train.precision=bf16", f"train.device={args.device}", f"train.batch_size={args.batch}",
    ])
    generator = torch.Generator().manual_seed(0)
    items = torch.randint(1, NUM_ITEMS + 1, (args.batch, args.length), generator=generator).to(device)
    draws = torch.rand(items.shape, generator=generator).to(device)

    def fresh_model():
        torch.manual_seed(0)
        model, _ = build_model(config.model, NUM_ITEMS, config.data.max_len, device=device)
        return model.to(device)

    def seqrec_step(compiled: bool):
        model = fresh_model()
        objective = MaskedItemObjective(model, config.loss.mask_prob, exclude_row_items=config.loss.exclude_row_items)
        engine = TrainingEngine(objective, config, plan_batches(config, 1), 10**6, torch.bfloat16)
        if compiled:
            model.compile_encoder()
        return lambda: optimizer_step(engine, [items], [draws], LossWeights(1.0, 1.0), 1)

    def plain_step():
        model = fresh_model()
        mlm, rows = model.mlm, model.vocab.item_rows
        optimizer = torch.optim.AdamW(mlm.parameters(), lr=1e-3, fused=True)
        tail = torch.full((args.batch, 1, HIDDEN), args.length - 1, device=device)
        targets = items[:, -1] - 1

        def step():
            with torch.autocast(device.type, torch.bfloat16):
                hidden = mlm.bert(items, attention_mask=items != 0).last_hidden_state
                logits = hidden.gather(1, tail).squeeze(1) @ mlm.get_input_embeddings().weight[rows].T
            F.cross_entropy(logits.float(), targets).backward()
            torch.nn.utils.clip_grad_norm_(mlm.parameters(), 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    kinds = {"seqrec": seqrec_step(False), "plain": plain_step()}
    if args.compile:
        kinds["seqrec_compiled"] = seqrec_step(True)
    for step in kinds.values():  # warm-up: first-step allocations, and compilation where compiled
        for _ in range(3):
            step()
    synchronize(device)

    seconds: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(args.rounds):
        for name, step in kinds.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            synchronize(device)
            seconds[name].append((time.perf_counter() - started) / args.steps)

    operators = {name: count_operators(step, device) for name, step in kinds.items()}
    step_ms = {name: round(1e3 * statistics.median(values), 3) for name, values in seconds.items()}
    results = {
        "seqrec_over_plain_step_time": round(statistics.median(a / b for a, b in zip(seconds["seqrec"], seconds["plain"])), 3),
        "step_ms_median": step_ms,
        "step_ms_rounds": {name: [round(1e3 * value, 3) for value in values] for name, values in seconds.items()},
        "operators_per_step": operators,
        "setting": {"layers": args.layers, "hidden": HIDDEN, "items": NUM_ITEMS, "batch": args.batch, "length": args.length,
                    "precision": "bf16 autocast", "steps_per_round": args.steps, "rounds": args.rounds},
    }
    if "seqrec_compiled" in seconds:
        results["compiled_over_eager_step_time"] = round(
            statistics.median(a / b for a, b in zip(seconds["seqrec_compiled"], seconds["seqrec"])), 3)
    provenance = {"machine": machine(), "device": str(device), "versions": versions(), "code": code_version(),
                  "command": "python bench/host_overhead.py " + " ".join(sys.argv[1:])}
    if args.quick:
        print(json.dumps({**results, **provenance}, indent=2))
        return
    path = RESULTS / "host_overhead.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    payload = {**previous, "gpu": {**results, **provenance}} if device.type == "cuda" else {**previous, **results, **provenance}
    table = []
    for prefix, run in (("", payload), ("GPU ", payload.get("gpu"))):
        if not run or "step_ms_median" not in run:
            continue
        table += [(f"{prefix}machine", run["machine"]), (f"{prefix}seqrec / plain step time", str(run["seqrec_over_plain_step_time"]))]
        table += [(f"{prefix}compiled / eager step time", str(run["compiled_over_eager_step_time"]))] if "compiled_over_eager_step_time" in run else []
        table += [(f"{prefix}{name} step ms, operators", f"{run['step_ms_median'][name]}, {run['operators_per_step'][name]}") for name in run["step_ms_median"]]
        table += [(f"{prefix}code", run["code"])]
    write_results("host_overhead", payload, table)
    print(json.dumps(payload, indent=2))


def count_operators(step, device) -> dict[str, float]:
    """aten operators per step (nested ones included), and kernel launches on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    steps = 3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronize(device)
    events = profiler.key_averages()
    counts = {"aten": round(sum(event.count for event in events if event.key.startswith("aten::")) / steps, 1)}
    if device.type == "cuda":
        counts["kernel_launches"] = round(sum(event.count for event in events if event.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")) / steps, 1)
    return counts


if __name__ == "__main__":
    main()
