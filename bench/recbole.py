"""seqrec vs RecBole's BERT4Rec on Beauty: training throughput and time to equal validation
quality, at the same model size and batch, measured in one run.

    python bench/recbole.py [--batches 12] [--batch 256] [--quality-minutes 8]

RecBole 1.2.1 is installed by this script into its own virtual environment, `.peers/recbole`
(git-ignored; see ../shared/PEERS.md), and fed Beauty converted to its atomic format (line
number as timestamp, so the order is the file's). Both sides: BERT hidden 64, 2 layers, 2
heads, inner 256, max length 50, batch 256, fp32, one process on this machine's cores.

RecBole's BERT4Rec trains on one instance per prefix of every user's sequence (its epoch is
~912 batches of 256 on Beauty); seqrec trains on each user's sequence once per epoch with
masking on the device. Reported: sequences (training instances) per second on each side,
their ratio (`vs_recbole_ratio`), and the time each needs for one pass over its training data.

Time to equal quality (`vs_recbole_time_to_quality_ratio`): RecBole trains for --quality-minutes
of training time, validated (full ranking, NDCG@10) at each quarter of it; seqrec then trains
until its validation NDCG@10 reaches the best RecBole reached, validated at 5, 10, 20, 30, ...
seconds of training. Ratio = RecBole's training seconds to its best / seqrec's to the same
figure (seqrec's is the first mark at or above it, so an upper bound). The whole script takes
about 20 minutes with the default budget; a RecBole epoch alone is ~40 minutes here.
Merges into bench/results/efficiency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import code_version, machine, update_efficiency, versions  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PEER_VENV = REPO / ".peers" / "recbole"
PEER_DATA = REPO / ".peers" / "data"
DATA_DIR = Path(os.environ.get("SEQREC_DATA_DIR", REPO.parent / "shared" / "data"))

RECBOLE_DRIVER = textwrap.dedent("""
    import json, sys, time, torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import BERT4Rec
    from recbole.utils import init_seed
    data_path, batches, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    config = Config(model="BERT4Rec", dataset="beauty", config_dict={
        "data_path": data_path, "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "MAX_ITEM_LIST_LENGTH": 50,
        "hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2, "loss_type": "CE", "train_neg_sample_args": None,
        "train_batch_size": batch, "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)", "metrics": ["Hit", "NDCG"], "topk": [10],
        "device": "cpu", "use_gpu": False, "show_progress": False, "reproducibility": True, "seed": 0,
    })
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = BERT4Rec(config, train_data.dataset)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    times, sizes = [], []
    for index, interaction in enumerate(train_data):
        started = time.perf_counter()
        optimizer.zero_grad()
        loss = model.calculate_loss(interaction)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
        sizes.append(len(interaction))
        if index + 1 == batches + 2:
            break
    print(json.dumps({"seconds": sum(times[2:]), "instances": sum(sizes[2:]), "batches_per_epoch": len(train_data),
                      "items": dataset.item_num - 1, "users": dataset.user_num - 1, "torch": torch.__version__}))
""")


RECBOLE_QUALITY_DRIVER = textwrap.dedent("""
    import json, sys, time, torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import BERT4Rec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed
    data_path, batch, marks = sys.argv[1], int(sys.argv[2]), [float(m) for m in sys.argv[3].split(",")]
    config = Config(model="BERT4Rec", dataset="beauty", config_dict={
        "data_path": data_path, "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "MAX_ITEM_LIST_LENGTH": 50,
        "hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2, "loss_type": "CE", "train_neg_sample_args": None,
        "train_batch_size": batch, "eval_batch_size": 4096, "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)", "metrics": ["Hit", "NDCG"], "topk": [10],
        "valid_metric": "NDCG@10", "learning_rate": 1e-3, "device": "cpu", "use_gpu": False, "show_progress": False,
        "reproducibility": True, "seed": 0, "checkpoint_dir": data_path + "/saved", "metric_decimal_place": 6,
    })
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = BERT4Rec(config, train_data.dataset)
    trainer = Trainer(config, model)
    trained, instances, epoch = 0.0, 0, 0
    pending = list(marks)
    while pending:
        model.train()
        for interaction in train_data:
            started = time.perf_counter()
            trainer.optimizer.zero_grad()
            loss = model.calculate_loss(interaction)
            loss.backward()
            trainer.optimizer.step()
            trained += time.perf_counter() - started
            instances += len(interaction)
            if trained >= pending[0]:
                started = time.perf_counter()
                result = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
                print(json.dumps({"train_seconds": trained, "instances": instances, "epoch": epoch,
                                  "valid": {k: float(v) for k, v in result.items()},
                                  "eval_seconds": time.perf_counter() - started}), flush=True)
                pending.pop(0)
                model.train()
                if not pending:
                    break
        epoch += 1
""")


def ensure_recbole() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    probe = subprocess.run([str(python), "-c", "import recbole"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "recbole==1.2.1", "setuptools<81", "numpy<2", "pandas<2.3"], check=True)
    return python


def atomic_beauty() -> Path:
    target = PEER_DATA / "beauty" / "beauty.inter"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        lines = (DATA_DIR / "beauty.txt").read_text().split("\n")
        rows = [line.split() for line in lines if line.strip()]
        temporary = target.with_suffix(".tmp")
        temporary.write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "".join(f"{u}\t{i}\t{n}\n" for n, (u, i) in enumerate(rows)))
        temporary.replace(target)
    return PEER_DATA


def same_size_seqrec(batch: int):
    """seqrec at RecBole's model size: data, config, max_len, a fresh engine."""
    import torch

    from quality import prepared
    from seqrec import distributed
    from seqrec.config import load_config
    from seqrec.data.prepared import PreparedDataset
    from seqrec.engine import TrainingEngine, plan_batches
    from seqrec.losses import MaskedItemObjective
    from seqrec.model import build_model

    distributed.init("cpu", timeout_minutes=30)
    root, max_len, _ = prepared("beauty")
    data = PreparedDataset.open(root)
    config = load_config(None, [
        "model.pretrained=null", "model.scratch.hidden_size=64", "model.scratch.num_hidden_layers=2", "model.scratch.num_attention_heads=2",
        "model.scratch.intermediate_size=256", f"data.max_len={max_len}", f"train.batch_size={batch}", "train.precision=fp32", "train.device=cpu",
        "optim.lr=1e-3", "optim.schedule=constant",
    ])
    torch.manual_seed(0)
    model, _ = build_model(config.model, data.num_items, max_len)
    engine = TrainingEngine(MaskedItemObjective(model, config.loss.mask_prob, exclude_row_items=config.loss.exclude_row_items,
                                                label_smoothing=config.loss.label_smoothing), config, plan_batches(config, 1), 10**6, None)
    return data, config, max_len, engine


def seqrec_throughput(batches: int, batch: int) -> dict:
    import torch

    from seqrec.data.stream import StreamOptions, sequence_loader
    from seqrec.losses import LossWeights
    from seqrec.train import optimizer_step

    data, config, max_len, engine = same_size_seqrec(batch)
    weights = LossWeights(config.loss.tail_weight, config.loss.masked_weight)
    options = StreamOptions(max_len, shuffle_buffer=2000, seed=0)
    items = []
    for loaded in sequence_loader(data.sequences(options), options, batch, num_workers=0):
        items.append(loaded.items)
        if len(items) == batches + 2:
            break
    generator = torch.Generator().manual_seed(0)
    times = []
    for batch_items in items:
        started = time.perf_counter()
        optimizer_step(engine, [batch_items], [torch.rand(batch_items.shape, generator=generator)], weights, 1)
        times.append(time.perf_counter() - started)
    instances = sum(int(b.shape[0]) for b in items[2:])
    return {"seconds": sum(times[2:]), "instances": instances, "train_sequences": data.num_train_sequences}


def seqrec_time_to_quality(batch: int, target: float, marks: list[float]) -> dict:
    """Train the same-size seqrec model, validating (full catalogue, NDCG@10) when its training
    time passes each mark, until it reaches `target`. Validation time is not training time."""
    import torch

    from seqrec.data.stream import StreamOptions, sequence_loader
    from seqrec.evaluate import evaluate_model
    from seqrec.losses import LossWeights
    from seqrec.train import optimizer_step

    data, config, max_len, engine = same_size_seqrec(batch)
    valid = data.eval_set("valid")
    generator = torch.Generator().manual_seed(0)
    trained, sequences, epoch, curve, pending = 0.0, 0, 0, [], list(marks)
    weights = LossWeights(config.loss.tail_weight, config.loss.masked_weight)
    engine.train()
    while pending:
        options = StreamOptions(max_len, shuffle_buffer=10_000, seed=0)
        for loaded in sequence_loader(data.sequences(options, epoch=epoch), options, batch, num_workers=0):
            started = time.perf_counter()
            optimizer_step(engine, [loaded.items], [torch.rand(loaded.items.shape, generator=generator)], weights, 1)
            trained += time.perf_counter() - started
            sequences += int(loaded.items.shape[0])
            if trained < pending[0]:
                continue
            pending.pop(0)
            engine.train(False)
            started = time.perf_counter()
            metrics = evaluate_model(engine.model, valid, config.eval.batch_size, max_len, (10,), True, torch.device("cpu"))
            curve.append({"train_seconds": round(trained, 1), "sequences": sequences, "epoch": epoch,
                          "valid": {"HR@10": metrics["HR@10"], "NDCG@10": metrics["NDCG@10"]},
                          "eval_seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(curve[-1]), flush=True)
            engine.train()
            if metrics["NDCG@10"] >= target:
                pending = []
            if not pending:
                break
        epoch += 1
    reached = next((point for point in curve if point["valid"]["NDCG@10"] >= target), None)
    return {"curve": curve, "reached": reached}


def time_to_equal_quality(python: Path, data_path: Path, batch: int, minutes: float) -> dict:
    """RecBole trains for `minutes` (validated at each quarter); seqrec then trains until its
    validation NDCG@10 reaches the best RecBole reached. Each side's own full-ranking validator
    on the same leave-one-out split (second-to-last item, history excluded)."""
    budget = minutes * 60
    marks = [budget * k / 4 for k in (1, 2, 3, 4)]
    driver = subprocess.run([str(python), "-c", RECBOLE_QUALITY_DRIVER, str(data_path), str(batch), ",".join(map(str, marks))],
                            capture_output=True, text=True, cwd=PEER_DATA, check=False)
    if driver.returncode != 0:
        raise SystemExit(f"RecBole quality run failed:\n{driver.stderr[-3000:]}")
    recbole_curve = [json.loads(line) for line in driver.stdout.splitlines() if line.startswith("{")]
    for point in recbole_curve:
        point["valid"] = {"HR@10": point["valid"]["hit@10"], "NDCG@10": point["valid"]["ndcg@10"]}
    best = max(recbole_curve, key=lambda point: point["valid"]["NDCG@10"])
    target = best["valid"]["NDCG@10"]
    ours = seqrec_time_to_quality(batch, target, [5, 10, 20, 30, 45, 60, 90, 120, 180, 240, 300, 420, 600])
    result = {
        "protocol": "Beauty, leave-one-out, validation = second-to-last item, full catalogue, history excluded; "
                    "each system's own validator; training time only (validation excluded); fp32 both, batch %d" % batch,
        "recbole_budget_minutes": minutes,
        "recbole_curve": recbole_curve,
        "recbole_best_valid_ndcg@10": round(target, 5),
        "recbole_seconds_to_best": round(best["train_seconds"], 1),
        "seqrec_curve": ours["curve"],
    }
    if ours["reached"] is None:
        result["seqrec_seconds_to_equal"] = None
        result["ratio"] = None
    else:
        result["seqrec_seconds_to_equal"] = ours["reached"]["train_seconds"]
        # seqrec is validated at marks, so its time is an upper bound (it crossed before that mark).
        result["ratio"] = round(best["train_seconds"] / ours["reached"]["train_seconds"], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--quality-minutes", type=float, default=8.0,
                        help="RecBole's training budget for the time-to-equal-validation-quality run (0: skip it)")
    args = parser.parse_args()
    python = ensure_recbole()
    data_path = atomic_beauty()
    driver = subprocess.run([str(python), "-c", RECBOLE_DRIVER, str(data_path), str(args.batches), str(args.batch)],
                            capture_output=True, text=True, cwd=PEER_DATA, check=False)
    if driver.returncode != 0:
        raise SystemExit(f"RecBole run failed:\n{driver.stderr[-3000:]}")
    recbole = json.loads(driver.stdout.strip().splitlines()[-1])
    ours = seqrec_throughput(args.batches, args.batch)
    recbole_rate = recbole["instances"] / recbole["seconds"]
    seqrec_rate = ours["instances"] / ours["seconds"]
    recbole_epoch = recbole["batches_per_epoch"] * args.batch / recbole_rate
    seqrec_epoch = ours["train_sequences"] / seqrec_rate
    results = {
        "vs_recbole_ratio": round(seqrec_rate / recbole_rate, 2),
        "recbole": {
            "model": "RecBole 1.2.1 BERT4Rec, hidden 64, 2 layers, 2 heads, inner 256, CE loss, batch %d" % args.batch,
            "instances_per_s": round(recbole_rate, 1), "batches_per_epoch": recbole["batches_per_epoch"],
            "epoch_seconds_estimated": round(recbole_epoch, 1), "items": recbole["items"], "users": recbole["users"],
        },
        "seqrec_same_size": {
            "model": "seqrec, scratch BERT hidden 64, 2 layers, 2 heads, inner 256, its default losses (masked items, tail always masked), batch %d" % args.batch,
            "sequences_per_s": round(seqrec_rate, 1), "epoch_seconds_estimated": round(seqrec_epoch, 1),
        },
        "epoch_time_ratio_recbole_over_seqrec": round(recbole_epoch / seqrec_epoch, 1),
    }
    if args.quality_minutes > 0:
        quality = time_to_equal_quality(python, data_path, args.batch, args.quality_minutes)
        results["time_to_equal_validation_ndcg"] = quality
        results["vs_recbole_time_to_quality_ratio"] = quality["ratio"]
    update_efficiency(results, {"recbole_machine": machine(), "recbole_versions": versions(), "recbole_code": code_version(), "recbole_command": "python bench/recbole.py " + " ".join(sys.argv[1:])})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
