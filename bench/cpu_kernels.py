"""The CPU kernel choices behind model.linear_kernel and model.activation_kernel, shape by shape.

    python bench/cpu_kernels.py [--tokens 2560 9216] [--repeats 7] [--quick]

One process, bf16 (the precision CPU training runs its encoder in), each pair of kernels timed in
alternating repeats over the same tensors (best time of each; the ratio is the median of
per-repeat ratios):
  weight_gradient   a linear layer's weight gradient, `grad_output.T @ input` for [tokens, out]
                    and [tokens, in] matrices: as nn.Linear's backward computes it (a transposed
                    operand) against seqrec's token-major product (seqrec/linear_kernel.py), at
                    the encoder shapes of MiniLM (384), BERT-base (768) and BERT-large (1,024)
                    widths and at 512; `seqrec_takes_token_major` says whether `takes_token_major`
                    picks the token-major path for that layer, `isolated_timing_agrees` whether
                    that choice is the faster one in isolation (ties within 5% agree either way).
                    The rule also rests on whole-step A/Bs (bench/efficiency.py
                    --linear-kernel-ab): a layer's gain in isolation need not survive the custom
                    backward's own passes in a step.
  gelu              the exact GELU's forward and backward over [tokens, 4 x hidden] under
                    torch.compile: the compiler's own kernel against seqrec's ATen operator
                    (seqrec/activation_kernel.py).
Writes bench/results/cpu_kernels.json and cpu_kernels.md (not with --quick).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import code_version, machine, median_round_ratio, versions, write_results  # noqa: E402

# (in_features, out_features) of BERT encoders' linear layers: the feed-forward pair and the
# square attention projections, at MiniLM's, BERT-base's and BERT-large's widths, and at 512.
LAYER_SHAPES = [(384, 1536), (1536, 384), (384, 384), (512, 2048), (2048, 512), (512, 512),
                (768, 3072), (3072, 768), (768, 768), (1024, 4096), (4096, 1024), (1024, 1024)]
GELU_WIDTHS = [1536, 3072, 4096]
# Within this share of each other, two kernels tie: the choice between them does not matter.
TIE = 0.05


def alternating(first, second, repeats: int) -> tuple[float, float, float]:
    """Best seconds of each callable and the median of per-repeat ratios first/second
    (`median_round_ratio`, as bench/efficiency.py's A/Bs)."""
    first(), second()  # warm-up (compilation, allocator)
    first_times, second_times = [], []
    for repeat in range(repeats):
        for function, times in ((first, first_times), (second, second_times))[:: 1 if repeat % 2 == 0 else -1]:
            started = time.perf_counter()
            function()
            times.append(time.perf_counter() - started)
    return min(first_times), min(second_times), median_round_ratio(first_times, second_times)


def token_major_wins(speedup: float) -> bool | None:
    """Whether the token-major product is the faster at this speedup over nn.Linear's; None for a tie."""
    if speedup > 1 + TIE:
        return True
    if speedup < 1 - TIE:
        return False
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2560, 9216],
                        help="rows of the [tokens, features] matrices: batch x padded length (ML-1M batches of 64: up to 12,800)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 tokens, 2 repeats, three layer shapes and one GELU width; printed, not kept")
    args = parser.parse_args()
    if any(tokens < 1 for tokens in args.tokens) or args.repeats < 1:
        raise SystemExit("--tokens and --repeats must be >= 1")
    layer_shapes, gelu_widths = LAYER_SHAPES, GELU_WIDTHS
    if args.quick:
        args.tokens, args.repeats, layer_shapes, gelu_widths = [256], 2, LAYER_SHAPES[:3], GELU_WIDTHS[:1]

    import torch
    import torch.nn.functional as F

    from seqrec.activation_kernel import gelu as aten_gelu
    from seqrec.linear_kernel import available, takes_token_major, weight_gradient
    from seqrec.runtime import cpu_supports_bf16, keep_freed_host_memory

    if not (cpu_supports_bf16() and available()):
        raise SystemExit("this CPU has no native bf16 in PyTorch's oneDNN: the kernels compared here are bf16 ones")
    keep_freed_host_memory()  # as CPU training does (train.keep_host_memory)
    generator = torch.Generator().manual_seed(0)

    def matrix(rows: int, columns: int) -> torch.Tensor:
        return torch.randn(rows, columns, generator=generator).to(torch.bfloat16)

    weight_rows = []
    for tokens in args.tokens:
        for in_features, out_features in layer_shapes:
            grad_output, layer_input = matrix(tokens, out_features), matrix(tokens, in_features)
            plain, token_major, ratio = alternating(lambda: grad_output.t().mm(layer_input), lambda: weight_gradient(grad_output, layer_input),
                                                    args.repeats)
            takes = takes_token_major(torch.nn.Linear(in_features, out_features, device="meta"))
            wins = token_major_wins(ratio)
            flops = 2 * tokens * in_features * out_features
            weight_rows.append({
                "tokens": tokens, "in_features": in_features, "out_features": out_features,
                "plain_ms": round(plain * 1e3, 2), "token_major_ms": round(token_major * 1e3, 2),
                "plain_gflop_per_s": round(flops / plain / 1e9, 1), "token_major_gflop_per_s": round(flops / token_major / 1e9, 1),
                "speedup_median": round(ratio, 3), "seqrec_takes_token_major": takes,
                "isolated_timing_agrees": wins is None or wins == takes,
            })
            print(json.dumps(weight_rows[-1]), flush=True)

    compiled_inductor = torch.compile(lambda inputs: F.gelu(inputs), dynamic=True)
    compiled_aten = torch.compile(lambda inputs: aten_gelu(inputs), dynamic=True)
    gelu_rows = []
    for tokens in args.tokens:
        for width in gelu_widths:
            inputs, grad = matrix(tokens, width).requires_grad_(True), matrix(tokens, width)

            def forward_backward(function):
                def run():
                    inputs.grad = None
                    function(inputs).backward(grad)
                return run

            inductor, aten, ratio = alternating(forward_backward(compiled_inductor), forward_backward(compiled_aten), args.repeats)
            gelu_rows.append({"tokens": tokens, "width": width, "inductor_ms": round(inductor * 1e3, 2), "aten_ms": round(aten * 1e3, 2),
                              "speedup_median": round(ratio, 3)})
            print(json.dumps(gelu_rows[-1]), flush=True)

    results = {"weight_gradient": weight_rows, "gelu": gelu_rows,
               "isolated_timing_agrees_share": round(sum(row["isolated_timing_agrees"] for row in weight_rows) / len(weight_rows), 3),
               "threads": torch.get_num_threads()}
    if args.quick:
        print(json.dumps(results, indent=2))
        return
    payload = {**results, "machine": machine(), "versions": versions(), "code": code_version(),
               "command": "python bench/cpu_kernels.py " + " ".join(sys.argv[1:])}
    table = [(f"weight gradient {row['in_features']} -> {row['out_features']}, {row['tokens']} tokens: nn.Linear / token-major "
              f"({'seqrec takes token-major' if row['seqrec_takes_token_major'] else 'seqrec keeps nn.Linear'})",
              f"{row['plain_ms']} / {row['token_major_ms']} ms = {row['speedup_median']}x" + ("" if row["isolated_timing_agrees"] else " (faster in isolation: the other kernel)"))
             for row in weight_rows]
    table += [(f"GELU forward + backward, {row['tokens']} x {row['width']}, compiled: inductor's / ATen's",
               f"{row['inductor_ms']} / {row['aten_ms']} ms = {row['speedup_median']}x") for row in gelu_rows]
    table += [("share of layer shapes where takes_token_major picks the kernel faster in isolation (ties agree)",
               results["isolated_timing_agrees_share"]),
              ("machine", payload["machine"]), ("code", payload["code"]), ("command", payload["command"])]
    write_results("cpu_kernels", payload, table)


if __name__ == "__main__":
    main()
