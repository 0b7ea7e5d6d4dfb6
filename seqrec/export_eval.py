"""`seqrec evaluate`: an exported model's metrics on a prepared dataset's validation or test split,
and optionally every evaluated user's top-K list.

The model is read as a plain Hugging Face directory (`seqrec.recommend.Recommender`), so this
checks what users deploy, not the training process's live weights, under the training
protocol: the same histories, mask, full-catalogue ranks and popularity baseline. Ranking goes
through the evaluator training validates with (`seqrec.sharded_eval`): started by `torchrun`,
`deepspeed` or `srun`, the ranks split the catalogue between them, and any number of ranks gives
the same ranks and lists bit for bit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqrec import distributed
from seqrec.config import DistributedConfig
from seqrec.data.prepared import PreparedDataset
from seqrec.data.split import MIN_EVAL_LENGTH, EvalSet
from seqrec.errors import SeqrecError
from seqrec.evaluate import popularity_baseline
from seqrec.recommend import Recommender
from seqrec.runtime import autocast_dtype
from seqrec.sharded_eval import EvalOutput, evaluate_sharded

SPLITS = ("valid", "test")


@dataclass
class ExportEvaluation:
    split: str
    popularity: dict[str, float] | None  # on the main rank only
    data: PreparedDataset
    eval_set: EvalSet
    output: EvalOutput  # each user's target rank and top-K list, on every rank
    world_size: int
    is_main: bool  # the rank that reports

    @property
    def users(self) -> int:
        return len(self.eval_set)

    @property
    def model(self) -> dict[str, float]:
        return self.output.metrics


def _launched_as_ranks() -> bool:
    """Whether `torchrun`, `deepspeed` or `srun` started this process as one of several ranks."""
    return int(distributed.launch_environment()["WORLD_SIZE"]) > 1


def evaluate_export(
    model_dir: Path, dataset_dir: Path, split: str = "test", batch_size: int = 256, ks=(1, 5, 10, 20),
    exclude_history: bool = True, device: str = "cpu", precision: str = "fp32", top_k: int | None = None,
) -> ExportEvaluation:
    """`precision` as `train.precision` (fp32, bf16, auto); the training run validated in its own.
    Launched as several ranks, this joins their process group (each rank on its own GPU)."""
    if split not in SPLITS:
        raise SeqrecError(f"--split: must be one of {', '.join(SPLITS)}, got {split!r}")
    is_main, world_size = True, 1
    if _launched_as_ranks():
        # This rank's own GPU; the Recommender resolves (and checks) the device either way.
        device, info = distributed.start(device, DistributedConfig().timeout_minutes, device_setting="--device")
        is_main, world_size = info.is_main, info.world_size
        if not is_main:
            logging.getLogger("seqrec").setLevel(logging.WARNING)
    recommender = Recommender(model_dir, device)
    data = PreparedDataset.open(dataset_dir)
    _check_same_items(recommender, data, model_dir, dataset_dir)
    eval_set = data.eval_set(split)
    if len(eval_set) == 0:
        raise SeqrecError(f"{dataset_dir}: no user with at least {MIN_EVAL_LENGTH} interactions, so the {split} split is empty")
    output = evaluate_sharded(
        recommender.seqrec_model(), eval_set, batch_size, recommender.max_len, tuple(ks), exclude_history,
        recommender.device, autocast_dtype(precision, recommender.device), top_k=top_k and min(top_k, recommender.num_items),
    )
    popularity = None
    if is_main:
        popularity = popularity_baseline(data, tuple(ks), exclude_history, splits=(split,))[split]
    return ExportEvaluation(split, popularity, data, eval_set, output, world_size, is_main)


def prediction_rows(evaluation: ExportEvaluation) -> Iterator[dict]:
    """One row per evaluated user, in the split's order, in original ids: the target, its exact
    (pessimistic) rank, and the top-K items with their scores, best first. Excluded history
    items never appear; a list is shorter than K only when fewer items were left to rank."""
    item_ids, _ = evaluation.data.items()
    user_ids = evaluation.data.user_ids()
    output = evaluation.output
    ranked = (output.top_items >= 1) & (output.top_items <= len(item_ids)) & np.isfinite(output.top_scores)
    for row, (user, target, rank) in enumerate(zip(evaluation.eval_set.users, evaluation.eval_set.targets, output.ranks)):
        keep = ranked[row]
        yield {
            "user": user_ids[user],
            "target": item_ids[target - 1],
            "rank": int(rank),
            "items": [item_ids[item - 1] for item in output.top_items[row][keep].tolist()],
            "scores": [round(score, 6) for score in output.top_scores[row][keep].tolist()],
        }


def write_predictions(evaluation: ExportEvaluation, handle) -> None:
    for row in prediction_rows(evaluation):
        handle.write(json.dumps(row) + "\n")


def _check_same_items(recommender: Recommender, data: PreparedDataset, model_dir: Path, dataset_dir: Path) -> None:
    """Item k of the model must be item k of the dataset, or every rank would be of another item."""
    dataset_ids, _ = data.items()
    if dataset_ids == recommender.original_ids:
        return
    if len(dataset_ids) != len(recommender.original_ids):
        detail = f"{len(dataset_ids)} items against the model's {len(recommender.original_ids)}"
    else:
        first = next(k for k, (a, b) in enumerate(zip(dataset_ids, recommender.original_ids)) if a != b)
        detail = f"item {first + 1} is {dataset_ids[first]!r} there and {recommender.original_ids[first]!r} in the model"
    raise SeqrecError(f"{dataset_dir}: not the item catalogue {model_dir} was trained on ({detail})")
