"""Quality benchmark: recipes side by side under the published full-ranking leave-one-out protocol.

    python bench/quality.py --dataset beauty|ml-1m|PREPARED_DIR [--epochs N] [--minutes M] [--keep-layers K]
        [--batch-size B] [--lr LR] [--warmup-steps W] [--recipes ...] [--set key=value ...] [--label L]

Recipes, all measured here on the same prepared data:
  default       pretrained all-MiniLM-L6-v2 (its first K layers, default 2), tail +
                masked-item losses
  scratch       the same architecture from random initialisation
  causal        the same architecture, random init, causal attention, full cross-entropy at
                every position (the SASRec+ baseline of Klenitskiy & Vasilev 2023)
  popularity    items ranked by training frequency
  default-text  (datasets with titles) default with item embeddings from title word pieces
  sasrec        (only when named) the published SASRec+ configuration itself: hidden 64,
                2 blocks, 1 head, dropout 0.1, no weight decay, batch 128, causal, full
                cross-entropy, from random initialisation (its batch wins over --batch-size;
                change it with --set train.batch_size=B)

--set overrides apply after the recipe's own settings, so they can change those too.

With --label L, rows are named "RECIPE (L)", so an ablation (say --set loss.prefix_prob=0.5
--label prefix-0.5) sits beside the plain recipe instead of replacing it.

Every recipe side by side in under 20 minutes on a 2-core CPU, one budget each:
    python bench/quality.py --dataset ml-1m --minutes 3 --label 3-min
(969 s in all on a 2-core Xeon with AMX at b89edb2: four trained recipes of ~4 minutes with
setup and evaluation, plus popularity). A budget that short favours the causal recipe, which
learns fastest per step; the rows that reach the published figures train 30-40 epochs
(bench/results/README.md).

Writes bench/results/quality_<dataset>.json and .md. CPU budgets are far below the published
training runs; each result records its epochs and seconds so figures are read in that light.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, code_version, machine, versions  # noqa: E402

from seqrec.atomic import atomic_file  # noqa: E402

DATA_DIR = Path(os.environ.get("SEQREC_DATA_DIR", REPO.parent / "shared" / "data"))
DATASETS = {
    # Batch sizes measured per dataset (bench/results/quality_*.md). Beauty, 30-minute runs on one
    # core each, validation NDCG@10 at epoch 11: 0.0146 at 512, 0.0125 at 256, 0.0124 at 1024,
    # 0.0103 at 64, 0.0101 at 128: ahead per epoch, not only per second. Warm-up: ~50k sequences.
    # Item rows start as far apart as MiniLM's word pieces (noise null, not 0.02): on Beauty, with
    # ~5 training events per item, that was ahead at every validation from epoch 5 (30 minutes).
    # The pretrained encoder at 0.3 x the item rows' rate (optim.pretrained_lr_scale, the product
    # default since): 15 epochs on one core gave test NDCG@10 0.0139 against 0.0119 at 1.0.
    # loss.prefix_prob 0 gained about as much (0.0133), but its whole rows cost ~25% more per
    # epoch, and the two together gave 0.0134.
    # One encoder layer on Beauty (mean history ~9 items): 45 minutes on one EPYC core, side by
    # side, test NDCG@10 0.0277 (validation 0.0376, 21 epochs) against 0.0264 (0.0349, 18) with
    # two, level per epoch early and ahead from epoch 13; on an H200 6 layers trailed 2.
    # With that layer, 20 epochs on one EPYC core each: loss.mask_prob 0.4 gave test NDCG@10
    # 0.0295 against 0.0291 at the product's 0.3 (ML-1M keeps 0.3: 0.2 and 0.5 trailed it there),
    # and weight decay 2.0 on that 0.0306 (two seeds) against 0.0295 at the product's 1.0 and
    # 0.0294 at 3.0. These settings keep gaining with epochs: 0.0319-0.0327 in 40 or 50 (four
    # seeds at 40, mean 0.0323; two at 50; a cosine schedule changed nothing); over 80,
    # patience stopped the run on the high-rate plateau (train.min_epochs defers it); a moving
    # average of the weights moved 40 epochs' test figure by at most 0.3%. Twice the steps
    # favour a stronger decay: over 40 epochs and the same four seeds, 2.5 gave mean validation
    # NDCG@10 0.04309 against 0.04305 at 2.0 (level; the bench takes the higher) and test
    # 0.0322-0.0330, mean 0.0325, against 0.0323 (three seeds higher by 0.0003-0.0004, one level;
    # a fifth seed at 2.5: 0.0321); mask 0.5 was level at one seed over 40 epochs, behind at another;
    # 1.5 and 3.0 (seed 0) trailed 2.5 on validation (3.0 level on test). Over those 40 epochs
    # a second layer pays where 20 did not: level or slightly behind on validation while the
    # rate is high, ahead as it decays; test NDCG@10 at seeds 0-3 0.0329, 0.0331, 0.0328,
    # 0.0331 against 0.0323, 0.0325, 0.0330, 0.0322 with one (AMX Xeon against AVX-512 EPYC),
    # so Beauty keeps the first 2 layers, as ML-1M does. Every run and its validation curve:
    # bench/results/notes/quality-beauty-cpu.md.
    "beauty": {"source": ["beauty.txt"], "max_len": 50, "batch_size": 512, "warmup_steps": 100,
               "overrides": ["model.item_init_noise=null", "loss.mask_prob=0.4", "optim.weight_decay=2.5"],
               "published": {"BERT4Rec": (0.0338, 0.0187), "SASRec+ (full CE)": (0.0533, 0.0327)}},
    "ml-1m": {
        "source": ["ml-1m.txt", "--titles", "ml-1m/movies.dat", "--item-map", "ml-1m/sas_to_original_items.txt"],
        "max_len": 200, "batch_size": 64, "warmup_steps": 100,
        "published": {"BERT4Rec": (0.2843, 0.1537), "SASRec+ (full CE)": (0.3152, 0.1821)},
    },
}
# The length cap of a prepared directory the table above does not name.
DEFAULT_MAX_LEN = 50
PROTOCOL = "leave-one-out (last item test, second-to-last validation), full item set ranked, history items excluded, pessimistic ties"


def recipes(keep_layers: int) -> dict[str, list[str]]:
    base = [f"model.keep_layers={keep_layers}", "model.pretrained=minilm"]
    return {
        "default": [*base, "model.weights=pretrained"],
        "scratch": [*base, "model.weights=random"],
        # Every position of a causal row is already a next-item target, so a prefix cut only
        # drops targets: the SASRec+ baseline trains on whole rows.
        "causal": [*base, "model.weights=random", "model.attention=causal", "loss.prefix_prob=0.0"],
        "default-text": [*base, "model.weights=pretrained", "model.item_init=text"],
        # The published SASRec+ itself (Klenitskiy & Vasilev 2023: hidden 64, 2 blocks, 1 head,
        # dropout 0.1, Adam at 1e-3 without weight decay, batch 128) through this pipeline: the
        # causal row above keeps the MiniLM shape, this one says whether the pipeline reproduces
        # the published figure. Not run unless named.
        "sasrec": [
            "model.pretrained=null", "model.scratch.hidden_size=64", "model.scratch.num_hidden_layers=2",
            "model.scratch.num_attention_heads=1", "model.dropout=0.1", "model.attention=causal",
            "loss.prefix_prob=0.0", "optim.weight_decay=0.0", "train.batch_size=128",
            # The paper's full cross-entropy includes the user's own items among the negatives.
            "loss.exclude_row_items=false",
        ],
    }


def recipe_overrides(recipe: str, keep_layers: int, common: list[str], overrides: list[str], dataset_name: str,
                     label: str | None = None) -> list[str]:
    """The config overrides of one recipe's run: the benchmark's common settings, the recipe's,
    then the user's `--set` (last, so they win). A label gives the run a directory of its own, so
    labelled runs of one recipe can train side by side."""
    name = f"quality-{dataset_name}-{recipe}" + (f"-{label}" if label else "")
    return [*common, *recipes(keep_layers)[recipe], *overrides, f"name={name}"]


def prepared(dataset: str) -> tuple[Path, int, dict]:
    """A known dataset prepared under shards/ (its directory, max length and published figures),
    or a prepared directory as it is."""
    if dataset in DATASETS:
        spec = DATASETS[dataset]
        out = REPO / "shards" / dataset
        args = [str(DATA_DIR / part) if not part.startswith("--") else part for part in spec["source"]]
        from seqrec.cli import main as seqrec_main

        if seqrec_main(["prepare", *args, "--out", str(out), "--quiet"]) != 0:
            raise SystemExit(f"preparing {dataset} failed")
        return out, spec["max_len"], spec["published"]
    return Path(dataset), DEFAULT_MAX_LEN, {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with a known dataset's own defaults filled in."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="beauty, ml-1m, or a prepared dataset directory")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget per trained recipe")
    parser.add_argument("--keep-layers", type=int, default=2, help="encoder layers kept (6 = the full MiniLM)")
    parser.add_argument("--batch-size", type=int, help="default: 512 for beauty, 64 for ml-1m, else 256")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, help="linear warm-up; keep it well below the steps a budget allows (default: 100 for beauty and ml-1m, else 200)")
    parser.add_argument("--max-len", type=int, help=f"default: 50 for beauty, 200 for ml-1m, else {DEFAULT_MAX_LEN}")
    parser.add_argument("--recipes", nargs="+", help="subset of default scratch causal popularity default-text, or sasrec (run only when named)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override for every recipe, applied after the recipe's own")
    parser.add_argument("--label", type=run_label, help="suffix for the rows' recipe names, for ablations kept beside the plain recipe")
    args = parser.parse_args(argv)
    known_dataset = DATASETS.get(args.dataset, {})
    args.batch_size = args.batch_size or known_dataset.get("batch_size", 256)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else known_dataset.get("warmup_steps", 200)
    args.max_len = args.max_len or known_dataset.get("max_len", DEFAULT_MAX_LEN)
    known = {*recipes(args.keep_layers), "popularity"}
    if set(args.recipes or ()) - known:
        parser.error(f"unknown recipe(s) {sorted(set(args.recipes) - known)}; known: {sorted(known)}")
    return args


def common_overrides(root: Path, args: argparse.Namespace) -> list[str]:
    """The settings every recipe of one benchmark run shares, over configs/demo.yaml."""
    return [
        f"data.dataset={root}", f"data.max_len={args.max_len}", f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
        f"optim.lr={args.lr}", f"optim.warmup_steps={args.warmup_steps}", "train.patience=3", "eval.batch_size=512", "train.log_every=100",
        *([f"train.time_limit_minutes={args.minutes}"] if args.minutes else []), *DATASETS.get(args.dataset, {}).get("overrides", []),
    ]


def main() -> None:
    args = parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from seqrec.config import EvalConfig, load_config
    from seqrec.data.prepared import PreparedDataset
    from seqrec.evaluate import popularity_baseline
    from seqrec.train import run

    root, _, published = prepared(args.dataset)
    data = PreparedDataset.open(root)
    has_titles = data.meta["counts"]["items_with_title"] > 0
    name = args.dataset if args.dataset in DATASETS else root.name
    wanted = args.recipes or ["default", "scratch", "causal", "popularity"] + (["default-text"] if has_titles else [])
    common = common_overrides(root, args)
    results = []
    for recipe in wanted:
        started = time.perf_counter()
        row_name = f"{recipe} ({args.label})" if args.label else recipe
        if recipe == "popularity":
            protocol = EvalConfig()
            evaluation = popularity_baseline(data, protocol.ks, protocol.exclude_history)
            results.append({"recipe": row_name, **evaluation, "train_seconds": 0.0, "epochs": 0, "config": {}})
            continue
        config = load_config(REPO / "configs" / "demo.yaml", recipe_overrides(recipe, args.keep_layers, common, args.overrides, name, args.label))
        result = run(config)
        metrics = result.metrics
        results.append({
            "recipe": row_name, "valid": metrics["valid"], "test": metrics["test"],
            "train_seconds": metrics["train_seconds"], "epochs": metrics["epochs_run"], "best_epoch": metrics["best_epoch"],
            "sequences_per_s": metrics["sequences_per_s"], "wall_seconds": round(time.perf_counter() - started, 1),
            # The recipes of one invocation share a process: its high-water mark so far, which is
            # this recipe's own only for the first (or a run of one recipe).
            "peak_host_memory_mb": max(metrics["peak_host_memory_mb_by_rank"]),
            "valid_history": validation_history(result.run_dir), "config": config.to_dict(),
        })
        _write(name, results, published, args)
    _write(name, results, published, args)


def run_label(text: str) -> str:
    if not text or "/" in text or text.strip() != text:
        raise argparse.ArgumentTypeError(f"a label names a run directory: non-empty, no '/' and no surrounding spaces, got {text!r}")
    return text


def validation_history(run_dir: Path) -> list[dict]:
    """Each validation of the run (epoch, step, HR@10, NDCG@10) from its metrics.jsonl, so a row
    shows whether it was still rising when its budget ended."""
    from seqrec.tracking import read_history

    return [{"epoch": row["epoch"], "step": row["step"], "HR@10": row["valid"]["HR@10"], "NDCG@10": row["valid"]["NDCG@10"]}
            for row in read_history(run_dir) if "valid" in row]


def _write(name: str, results: list[dict], published: dict, args: argparse.Namespace) -> None:
    """quality_<name>.json/.md: this run's recipes, plus the rows of earlier runs for recipes this
    one did not train (each row keeps the command that produced it), so a partial re-run does not
    drop the others. Runs side by side (bench/gpu.sh) each hold a lock while they merge, and the
    files are replaced whole, so no run's rows are lost and no reader sees half a file."""
    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    for row in results:
        row.setdefault("command", command)
        row.setdefault("machine", machine())
        row.setdefault("code", code_version())
    RESULTS.mkdir(parents=True, exist_ok=True)
    # The lock is on the results folder itself (the files are replaced, so their inodes change).
    folder = os.open(RESULTS, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        _merge_and_write(name, results, published, command)
    finally:
        os.close(folder)


def _merge_and_write(name: str, results: list[dict], published: dict, command: str) -> None:
    path = RESULTS / f"quality_{name}.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    ran = {row["recipe"] for row in results}
    kept = [row for row in earlier.get("results", []) if row["recipe"] not in ran]
    for row in kept:
        row.setdefault("command", earlier.get("command", "unknown"))
        row.setdefault("machine", earlier.get("machine", "unknown"))
    results = kept + results
    payload = {
        "dataset": name,
        "protocol": PROTOCOL,
        "results": results,
        "published_reference": {model: {"HR@10": hr, "NDCG@10": ndcg} for model, (hr, ndcg) in published.items()},
        "machine": machine(),
        "versions": versions(),
        "command": command,
    }
    with atomic_file(path) as handle:
        handle.write(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"# Quality on {name}", "", PROTOCOL + ".", "", "Time-budgeted rows are comparable only on the same machine (machine column); code is the seqrec commit measured.", "",
        "| recipe | test HR@10 | test NDCG@10 | valid NDCG@10 | epochs | train s | command | machine | code |", "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        lines.append(f"| {row['recipe']} | {row['test']['HR@10']:.4f} | {row['test']['NDCG@10']:.4f} | {row['valid'].get('NDCG@10', float('nan')):.4f} "
                     f"| {row['epochs']} | {row['train_seconds']:.0f} | `{row['command']}` | {row['machine']} | {row.get('code', 'unrecorded')} |")
    for model, (hr, ndcg) in published.items():
        lines.append(f"| published {model} | {hr:.4f} | {ndcg:.4f} | | | | | | |")
    with atomic_file(RESULTS / f"quality_{name}.md") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
