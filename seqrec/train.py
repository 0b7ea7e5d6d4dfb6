"""The training loop: stream shards, mask on the device, step, validate, stop early, test.

One process here; the distributed issue puts a DeepSpeed engine under `_Stepper` and shards
the data by rank, leaving this loop's shape unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from seqrec.atomic import atomic_file
from seqrec.config import EvalConfig, JobConfig
from seqrec.data.prepared import PreparedDataset
from seqrec.data.stream import StreamOptions, sequence_loader
from seqrec.evaluate import evaluate_model, evaluate_popularity, format_table
from seqrec.losses import LossParts, causal_next_item_loss, masked_item_loss
from seqrec.masking import mask_items
from seqrec.model import SeqRecModel, build_model
from seqrec.optim import build_optimizer, build_scheduler
from seqrec.runtime import autocast_dtype, resolve_device

log = logging.getLogger(__name__)

EARLY_STOP_METRIC = "NDCG@10"


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict


def compute_loss(model: SeqRecModel, items: torch.Tensor, config: JobConfig, generator: torch.Generator) -> LossParts:
    if model.causal:
        return causal_next_item_loss(model, items)
    batch = mask_items(items, config.loss.mask_prob, generator)
    return masked_item_loss(model, batch, config.loss.tail_weight, config.loss.masked_weight)


class _Stepper:
    """Backward, clip, optimiser and schedule step."""

    def __init__(self, model: SeqRecModel, config: JobConfig, total_steps: int):
        self.model = model
        self.optimizer = build_optimizer(model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, total_steps)
        self.grad_clip = config.optim.grad_clip

    def step(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip if self.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


def train_item_counts(data: PreparedDataset) -> np.ndarray:
    """Interactions per item in the training shards (index 0 = padding), for the popularity baseline."""
    counts = np.zeros(data.num_items + 1, dtype=np.int64)
    for sample in data.sequences(StreamOptions(max_len=10**9, shuffle_buffer=0)):
        counts += np.bincount(sample.items, minlength=len(counts))
    return counts


def popularity_baseline(data: PreparedDataset, max_len: int, config: EvalConfig) -> dict[str, dict[str, float]]:
    """Most-popular metrics on the validation and test splits, under the same protocol as the model."""
    counts = train_item_counts(data)
    return {
        split: evaluate_popularity(counts, data.eval_set(split), config.batch_size, max_len, config.ks, config.exclude_history)
        for split in ("valid", "test")
    }


def run(config: JobConfig) -> TrainResult:
    started = time.perf_counter()
    run_dir = config.run_path
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    torch.manual_seed(config.train.seed)
    device = resolve_device(config.train.device)
    amp = autocast_dtype(config.train.precision, device)

    data = PreparedDataset.open(config.data.dataset)
    titles = data.items()[1] if config.model.item_init == "text" else None
    model, init_report = build_model(config.model, data.num_items, config.data.max_len, titles)
    model.to(device)
    (run_dir / "item_init.json").write_text(json.dumps(init_report) + "\n")

    steps_per_epoch = math.ceil(data.num_train_sequences / config.train.batch_size)
    total_steps = config.train.epochs * steps_per_epoch
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)
    stepper = _Stepper(model, config, total_steps)
    generator = torch.Generator(device=device).manual_seed(config.train.seed)
    stream_options = StreamOptions(config.data.max_len, config.data.shuffle_buffer, config.train.seed, config.data.pad_multiple)
    valid_set, test_set = data.eval_set("valid"), data.eval_set("test")
    evaluate = lambda eval_set: evaluate_model(  # noqa: E731
        model, eval_set, config.eval.batch_size, config.data.max_len, config.eval.ks, config.eval.exclude_history, device, amp
    )
    log.info(
        "training %s on %s: %d items, %d sequences, %d steps/epoch, device %s, %s",
        config.name, data.root, data.num_items, data.num_train_sequences, steps_per_epoch, device, amp or "fp32",
    )

    history_path = run_dir / "metrics.jsonl"
    history_path.write_text("")
    step, best_score, best_epoch, best_state, stale = 0, -math.inf, -1, None, 0
    best_valid: dict = {}
    sequences_seen, train_seconds = 0, 0.0
    epochs_run = 0
    model.train()
    for epoch in range(config.train.epochs):
        epochs_run = epoch + 1
        epoch_started = time.perf_counter()
        stream = data.sequences(stream_options, epoch=epoch)
        loader = sequence_loader(stream, stream_options, config.train.batch_size, config.data.num_workers, pin_memory=device.type == "cuda")
        for batch in loader:
            items = batch.items.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                parts = compute_loss(model, items, config, generator)
            grad_norm = stepper.step(parts.total)
            step += 1
            sequences_seen += items.shape[0]
            if step % config.train.log_every == 0 or step == 1:
                row = {"step": step, "epoch": epoch, "loss": parts.total.item(), "loss_tail": parts.tail.item(),
                       "loss_masked": parts.masked.item(), "lr": stepper.lr, "grad_norm": grad_norm}
                _append(history_path, row)
                log.info("step %d epoch %d loss %.4f (tail %.4f masked %.4f) lr %.2e", step, epoch, row["loss"], row["loss_tail"], row["loss_masked"], row["lr"])
            if step >= total_steps:
                break
        train_seconds += time.perf_counter() - epoch_started
        limit = config.train.time_limit_minutes
        out_of_time = limit is not None and time.perf_counter() - started > 60 * limit
        if out_of_time:
            log.info("time limit of %.1f minutes reached after epoch %d", limit, epoch)
        finished = step >= total_steps or epoch + 1 == config.train.epochs or out_of_time
        if (epoch + 1) % config.train.eval_every == 0 or finished:
            valid = evaluate(valid_set)
            _append(history_path, {"step": step, "epoch": epoch, "valid": valid})
            log.info("epoch %d valid HR@10 %.4f NDCG@10 %.4f (%.0f seq/s)", epoch, valid["HR@10"], valid["NDCG@10"], sequences_seen / train_seconds)
            if valid[EARLY_STOP_METRIC] > best_score:
                best_score, best_epoch, best_valid, stale = valid[EARLY_STOP_METRIC], epoch, valid, 0
                best_state = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
            else:
                stale += 1
                if stale >= config.train.patience:
                    log.info("early stop: no %s gain for %d evaluations", EARLY_STOP_METRIC, stale)
                    break
        if finished:
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    test = evaluate(test_set)
    popularity = popularity_baseline(data, config.data.max_len, config.eval)
    model.save_pretrained(run_dir / "model")
    metrics = {
        "name": config.name,
        "valid": best_valid,
        "test": test,
        "popularity": popularity,
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
        "steps": step,
        "train_seconds": round(train_seconds, 2),
        "sequences_per_s": round(sequences_seen / train_seconds, 1) if train_seconds else None,
        "total_seconds": round(time.perf_counter() - started, 2),
        "device": str(device),
        "precision": str(amp or "fp32"),
        "item_init": init_report["counts"],
    }
    _append(history_path, {"step": step, "test": test})
    with atomic_file(run_dir / "metrics.json") as handle:
        handle.write(json.dumps(metrics, indent=2) + "\n")
    print(f"\n{config.name}: test metrics (best epoch {best_epoch}, {epochs_run} epochs, {train_seconds:.0f} s training)")
    print(format_table({"seqrec": test, "popularity": popularity["test"]}, config.eval.ks))
    return TrainResult(run_dir, metrics)


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")
