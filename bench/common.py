"""What every benchmark records beside its figures: the machine, the versions, the command."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

from seqrec.atomic import atomic_file

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:  # the vector ISA torch uses: this project's CPUs of one name differ in it (AVX2 or AVX-512)
        cpu = f"{cpu} ({torch.backends.cpu.get_cpu_capability()})"
    host = f"{cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB, {platform.system()} {platform.release()}"
    if torch is not None and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} GPU ({host})"
    return host


def synchronize(device) -> None:
    """Wait for the device's queued work, so a timer around it measures the work (no-op on a CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def code_version() -> str:
    """The seqrec commit measured: $SEQREC_CODE_VERSION where set (an exported snapshot, or a
    copy whose .git is not the code's: a copied working tree can carry a stale one), else
    `git rev-parse` of this checkout (+dirty with uncommitted changes outside bench/results)."""
    if os.environ.get("SEQREC_CODE_VERSION"):
        return os.environ["SEQREC_CODE_VERSION"]
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        # Not bench/results: a benchmark may write there before it records this (efficiency.py
        # --profile writes profile_<device>.txt first).
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    import numpy
    import pyarrow

    import seqrec

    found = {"python": platform.python_version(), "seqrec": seqrec.__version__, "numpy": numpy.__version__, "pyarrow": pyarrow.__version__}
    for name in ("torch", "transformers", "deepspeed", "webdataset", "wandb"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def median_round_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median (upper, for an even count) of per-round ratios: each round's two timings a few
    seconds apart, so the machine's drift over minutes cancels within each ratio."""
    ratios = sorted(numerator / denominator for numerator, denominator in zip(numerators, denominators))
    return ratios[len(ratios) // 2]


def write_results(name: str, payload: dict, table: list[tuple[str, str]]) -> Path:
    """bench/results/<name>.json, and a markdown table of the headline figures beside it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    with atomic_file(path) as handle:
        handle.write(json.dumps(payload, indent=2) + "\n")
    lines = [f"# {name}", "", "| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in table), ""]
    with atomic_file(RESULTS / f"{name}.md") as handle:
        handle.write("\n".join(lines))
    return path


EFFICIENCY_HEADLINES = ("vs_naive_ratio", "vs_recbole_ratio", "vs_recbole_time_to_quality_ratio", "mfu_cpu", "mfu_cpu_best_setting",
                        "eval_users_per_s_ratio", "reader_over_step_ratio")


CPU_RATIOS = ("vs_naive_ratio", "mfu_cpu", "mfu_cpu_best_setting", "eval_users_per_s_ratio", "reader_over_step_ratio")
CPU_RUN_KEYS = (*CPU_RATIOS, "details", "machine", "versions", "code", "command")


def update_efficiency(results: dict, provenance: dict, headline: bool = True) -> dict:
    """Merge one script's figures into efficiency.json (efficiency.py and recbole.py each own a
    part) and rewrite the table from the whole file, so neither drops the other's rows.
    A CPU run on another machine takes the headline; the run it replaces moves to `other_cpus`
    under its machine, since this project's CPUs differ (matmul peak, memory bandwidth) enough
    to move every ratio. A run with `headline` false (fp32 on a CPU without native bf16, where
    the bf16 MFU target cannot be measured) goes to `other_cpus` directly."""
    path = RESULTS / "efficiency.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    other_cpus = dict(previous.get("other_cpus", {}))
    incoming = provenance.get("machine")
    if not headline:
        other_cpus[incoming] = {**results, **provenance}
        payload = {**previous, "other_cpus": other_cpus}
    else:
        if incoming and previous.get("machine") and previous["machine"] != incoming:
            other_cpus[previous["machine"]] = {key: previous[key] for key in CPU_RUN_KEYS if key in previous}
            other_cpus.pop(incoming, None)
        payload = {**previous, **results, **provenance, **({"other_cpus": other_cpus} if other_cpus else {})}
    replaced_gpu = previous.get("gpu")
    if "gpu" in results and replaced_gpu and replaced_gpu.get("code") != results["gpu"].get("code"):
        # GPU leases are short and a run can be cut off before settings an earlier one measured,
        # so earlier runs stay beside the latest, each under its code.
        payload["earlier_gpu_runs"] = {replaced_gpu["code"]: replaced_gpu, **previous.get("earlier_gpu_runs", {})}
    table = [(key, str(payload[key])) for key in EFFICIENCY_HEADLINES if key in payload]
    if "recbole" in payload:
        table += [("RecBole instances/s", str(payload["recbole"]["instances_per_s"])),
                  ("seqrec sequences/s (same size)", str(payload["seqrec_same_size"]["sequences_per_s"])),
                  ("epoch time RecBole / seqrec", str(payload["epoch_time_ratio_recbole_over_seqrec"]))]
    table += [(key, str(value)) for key, value in payload.get("details", {}).items()]
    for other, run in payload.get("other_cpus", {}).items():
        details = run.get("details", {})
        table += [(f"{other}: {key}", str(run[key])) for key in CPU_RATIOS if key in run]
        precision = details.get("precision", "bf16")
        table += [(f"{other}: step s, sequences/s, peak {precision} GFLOP/s",
                   str(tuple(details.get(key) for key in ("seqrec_step_s", "seqrec_sequences_per_s", f"peak_{precision}_gflop_per_s"))))]
        table += [(f"{other}: code", str(run.get("code")))]
    gpu = payload.get("gpu")
    if gpu:
        table += [(f"GPU {key}", str(gpu[key])) for key in ("vs_naive_ratio", "mfu_gpu", "eval_users_per_s_ratio", "reader_over_step_ratio")]
        table += [(f"GPU {key}", str(value)) for key, value in gpu["details"].items()]
        table += [("GPU machine", gpu["machine"]), ("GPU command", gpu["command"]), ("GPU code", gpu["code"])]
    for code, run in payload.get("earlier_gpu_runs", {}).items():
        table += [(f"earlier GPU run {code}: {key}", str(run[key])) for key in ("vs_naive_ratio", "mfu_gpu", "eval_users_per_s_ratio", "reader_over_step_ratio")]
        table += [(f"earlier GPU run {code}: MFU at other settings", str({name: figures["mfu"] for name, figures in run["details"].get("mfu_other_settings", {}).items()}))]
    write_results("efficiency", payload, table)
    return payload
