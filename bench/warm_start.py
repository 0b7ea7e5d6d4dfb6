"""Retraining on a newer log: a warm start from last period's export against a fresh start.

    python bench/warm_start.py [--preset demo] [--epochs 4] [--new-items 0.1] [--quick]

The embedded synthetic log is split in time. The previous period is every interaction before the
80% quantile of time, less all interactions of a random share of items (`--new-items`: items
launched since); the newer log is the whole log. configs/demo.yaml trains on the previous
period and that run is exported. On the newer log (prepared afresh, so its items are numbered
anew) the same config then trains twice for the same epochs, validating every epoch: `fresh`
from the pretrained MiniLM, and `warm` with `model.warm_start` on the export. Reported: each
run's validation curve, test metrics and training seconds, the first epoch at which the warm
run reaches the fresh run's best validation NDCG@10, and HR@10 / NDCG@10 over the test users
whose target is one of the new items (from `seqrec evaluate --predictions`), where the warm
model has no trained row to lean on.

Writes bench/results/warm_start.json and .md (`--quick`: the tiny preset, figures printed only).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import code_version, machine, versions, write_results  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", help="synthetic preset of the log (default demo)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of every run (default 4, as configs/demo.yaml)")
    parser.add_argument("--new-items", type=float, default=0.1, help="share of items absent from the previous period (default 0.1)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-warm-start", help="logs, shards and runs (replaced)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny preset and config, 1 epoch; figures printed, not kept")
    args = parser.parse_args(argv)
    if not 0.0 <= args.new_items < 1.0:
        parser.error(f"--new-items must be in [0, 1), got {args.new_items}")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    return args


def split_log(source: Path, previous: Path, newer: Path, new_share: float, seed: int = 0) -> dict:
    """The previous period (before the 80% time quantile, without the new items) and the whole log."""
    with open(source, newline="") as handle:
        rows = list(csv.DictReader(handle))
    cut = sorted(int(row["timestamp"]) for row in rows)[int(0.8 * len(rows))]
    items = sorted({row["item_id"] for row in rows})
    new_items = set(random.Random(seed).sample(items, int(new_share * len(items))))
    kept = [row for row in rows if int(row["timestamp"]) < cut and row["item_id"] not in new_items]
    for path, chosen in ((previous, kept), (newer, rows)):
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["user_id", "item_id", "timestamp"])
            writer.writeheader()
            writer.writerows(chosen)
    return {"interactions_previous": len(kept), "interactions_newer": len(rows), "items": len(items),
            "new_items": sorted(new_items)}


def main() -> None:
    args = parse_args()
    import logging
    import shutil

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from seqrec.cli import main as seqrec_main
    from seqrec.config import load_config
    from seqrec.evaluate import metrics_from_ranks
    from seqrec.tracking import read_history
    from seqrec.train import run

    preset, config_file, epochs = ("tiny", "tiny.yaml", 1) if args.quick else (args.preset, "demo.yaml", args.epochs)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    def cli(*arguments) -> None:
        code = seqrec_main([str(argument) for argument in arguments])
        if code != 0:
            raise SystemExit(f"seqrec {arguments[0]} failed with exit status {code}")

    cli("synth", "--preset", preset, "--out", work / "log.csv", "--quiet")
    split = split_log(work / "log.csv", work / "previous.csv", work / "newer.csv", args.new_items)
    for name in ("previous", "newer"):
        cli("prepare", work / f"{name}.csv", "--out", work / name, "--quiet")

    def train(name: str, dataset: str, *overrides: str) -> dict:
        config = load_config(REPO / "configs" / config_file, [
            f"data.dataset={work / dataset}", f"run_dir={work / name}", f"train.epochs={epochs}", "train.eval_every=1",
            f"train.patience={epochs}", "tracking.wandb=disabled", *overrides,
        ])
        started = time.perf_counter()
        metrics = run(config).metrics
        curve = [{"epochs_trained": row["epoch"] + 1, "NDCG@10": row["valid"]["NDCG@10"], "HR@10": row["valid"]["HR@10"]}
                 for row in read_history(work / name) if "valid" in row]
        cli("export", work / name, work / f"{name}-export", "--quiet")
        return {"test": metrics["test"], "valid": metrics["valid"], "train_seconds": metrics["train_seconds"],
                "wall_seconds": round(time.perf_counter() - started, 1), "epochs": metrics["epochs_run"],
                "best_epoch": metrics["best_epoch"], "valid_history": curve, "item_init": metrics["item_init"]}

    runs = {"previous": train("previous", "previous")}
    runs["fresh"] = train("fresh", "newer")
    runs["warm"] = train("warm", "newer", f"model.warm_start={work / 'previous-export'}")

    new_items = set(split["new_items"])
    for name in ("fresh", "warm"):
        predictions = work / f"{name}-predictions.jsonl"
        cli("evaluate", "--model", work / f"{name}-export", "--dataset", work / "newer", "--split", "test",
            "--predictions", predictions, "--top-k", 10, "--quiet")
        ranks = [row["rank"] for row in map(json.loads, predictions.read_text().splitlines()) if row["target"] in new_items]
        metrics = metrics_from_ranks(ranks, (10,))
        runs[name]["test_new_item_targets"] = {"users": len(ranks), "HR@10": metrics.get("HR@10"), "NDCG@10": metrics.get("NDCG@10")}

    fresh_best = max(point["NDCG@10"] for point in runs["fresh"]["valid_history"])
    reached = next((point["epochs_trained"] for point in runs["warm"]["valid_history"] if point["NDCG@10"] >= fresh_best), None)
    figures = {
        "fresh_best_valid_ndcg10": fresh_best,
        "warm_epochs_to_fresh_best": reached,
        "epochs": epochs,
        "warm_over_fresh_test_ndcg10": round(runs["warm"]["test"]["NDCG@10"] / runs["fresh"]["test"]["NDCG@10"], 4),
        "warm_over_fresh_valid_ndcg10_epoch1": round(runs["warm"]["valid_history"][0]["NDCG@10"] / runs["fresh"]["valid_history"][0]["NDCG@10"], 4),
    }
    split_summary = {key: value for key, value in split.items() if key != "new_items"} | {"new_items": len(new_items)}
    payload = {**figures, "split": split_summary, "runs": runs, "machine": machine(), "versions": versions(), "code": code_version(),
               "command": "python bench/warm_start.py " + " ".join(sys.argv[1:]), "config": f"configs/{config_file}"}
    if args.quick:
        print("\n" + json.dumps(payload, indent=2))
        return
    table = [
        ("log", f"synthetic `{preset}`: {split['interactions_newer']} interactions, {split['items']} items; previous period "
                f"{split['interactions_previous']} interactions without {len(new_items)} new items"),
        *[(f"{name}: validation NDCG@10 by epoch", ", ".join(f"{point['NDCG@10']:.4f}" for point in runs[name]["valid_history"]))
          for name in ("fresh", "warm")],
        *[(f"{name}: test NDCG@10 / HR@10, training s", f"{runs[name]['test']['NDCG@10']:.4f} / {runs[name]['test']['HR@10']:.4f}, "
                                                         f"{runs[name]['train_seconds']:.0f}") for name in ("previous", "fresh", "warm")],
        *[(f"{name}: test users with a new item as target, NDCG@10 / HR@10",
           f"{runs[name]['test_new_item_targets']['users']} users: {runs[name]['test_new_item_targets']['NDCG@10']:.4f} / "
           f"{runs[name]['test_new_item_targets']['HR@10']:.4f}") for name in ("fresh", "warm")],
        ("epochs the warm run took to reach the fresh run's best validation", str(reached)),
        ("warm / fresh test NDCG@10", str(figures["warm_over_fresh_test_ndcg10"])),
        ("warm / fresh validation NDCG@10 after epoch 1", str(figures["warm_over_fresh_valid_ndcg10_epoch1"])),
        ("warm items carried / new", f"{runs['warm']['item_init']}"),
        ("machine", payload["machine"]), ("code", payload["code"]), ("command", payload["command"]),
    ]
    write_results("warm_start", payload, table)
    print("\n" + json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
