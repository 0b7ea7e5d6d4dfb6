"""`seqrec evaluate`: an exported model's metrics on a prepared dataset's validation or test split.

The model is read as a plain Hugging Face directory (`seqrec.recommend.Recommender`), so this
checks what users deploy, not the training process's live weights, under the training
protocol: the same histories, mask, full-catalogue ranks and popularity baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from seqrec.data.prepared import PreparedDataset
from seqrec.errors import SeqrecError
from seqrec.evaluate import metrics_from_ranks, popularity_baseline, rank_all
from seqrec.recommend import Recommender
from seqrec.runtime import autocast_dtype

SPLITS = ("valid", "test")


@dataclass
class ExportEvaluation:
    split: str
    users: int
    model: dict[str, float]
    popularity: dict[str, float]


def evaluate_export(
    model_dir: Path, dataset_dir: Path, split: str = "test", batch_size: int = 256, ks=(1, 5, 10, 20),
    exclude_history: bool = True, device: str = "cpu", precision: str = "fp32",
) -> ExportEvaluation:
    """`precision` as `train.precision` (fp32, bf16, auto); the training run validated in its own."""
    if split not in SPLITS:
        raise SeqrecError(f"--split: must be one of {', '.join(SPLITS)}, got {split!r}")
    recommender = Recommender(model_dir, device, autocast_dtype(precision, torch.device(device)))
    data = PreparedDataset.open(dataset_dir)
    _check_same_items(recommender, data, model_dir, dataset_dir)
    eval_set = data.eval_set(split)
    ranks = rank_all(
        recommender.scores, eval_set, batch_size, recommender.max_len, append_mask=not recommender.next_item,
        exclude_history=exclude_history, device=recommender.device,
    )
    popularity = popularity_baseline(data, recommender.max_len, batch_size, tuple(ks), exclude_history, splits=(split,))[split]
    return ExportEvaluation(split, len(eval_set), metrics_from_ranks(ranks, tuple(ks)), popularity)


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
