"""Full-catalogue leave-one-out evaluation: exact target ranks, then HR@K, NDCG@K and MRR.

Ranks are pessimistic: an item scoring exactly the target's score ranks ahead of it, so a
model that scores everything equally gets the worst rank, not the best. Items in the user's
history are excluded from the ranking (by default) except the target itself, which keeps its
place even when the user had consumed it before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from seqrec import progress
from seqrec.data.prepared import PreparedDataset
from seqrec.data.sequences import gather_prefixes, right_pad
from seqrec.data.split import EvalSet
from seqrec.data.stream import StreamOptions
from seqrec.masking import tail_positions
from seqrec.model import MASK_ITEM, SeqRecModel

Scorer = Callable[[torch.Tensor], torch.Tensor]  # padded item batch [B, L] -> scores [B, num_items]


def history_batches(
    eval_set: EvalSet, batch_size: int, max_len: int, append_mask: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch: model input [B, L] (right-padded, most recent items kept, MASK_ITEM appended if
    asked), targets [B], and the FULL history [B, H] for exclusion (0 = pad)."""
    keep = max_len - 1 if append_mask else max_len
    for start in range(0, len(eval_set), batch_size):
        rows = np.arange(start, min(start + batch_size, len(eval_set)))
        items, lengths = _recent_items(eval_set, rows, keep, extra=int(append_mask))
        if append_mask:
            items[np.arange(len(rows)), lengths] = MASK_ITEM
        full, _ = _recent_items(eval_set, rows, None)
        yield torch.from_numpy(items), torch.from_numpy(eval_set.targets[rows].astype(np.int64)), torch.from_numpy(full)


def _recent_items(eval_set: EvalSet, rows: np.ndarray, keep: int | None, extra: int = 0) -> tuple[np.ndarray, np.ndarray]:
    ends = eval_set.offsets[rows + 1]
    lengths = ends - eval_set.offsets[rows]
    if keep is not None:
        lengths = np.minimum(lengths, keep)
    _, recent = gather_prefixes(ends - lengths, eval_set.history, np.arange(len(rows)), lengths)
    return right_pad(recent, lengths, int(lengths.max()) + extra), lengths


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
    """1-based pessimistic rank of each target among all items; `history` items (<= 0 = pad) excluded."""
    scores = scores.float()
    rows = torch.arange(scores.shape[0], device=scores.device)
    if history is not None:
        excluded = torch.zeros(scores.shape[0], scores.shape[1] + 1, dtype=torch.bool, device=scores.device)
        # An indexed write: scatter_ along dim 1 passes over the whole matrix on the CPU.
        excluded[rows.unsqueeze(1).expand_as(history), history.clamp(min=0)] = True
        excluded = excluded[:, 1:]
        excluded[rows, targets - 1] = False
        scores = scores.masked_fill(excluded, float("-inf"))
    target_scores = scores[rows, targets - 1].unsqueeze(1)
    return (scores >= target_scores).sum(dim=1)


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    ranks = np.asarray(ranks, dtype=np.float64)
    if len(ranks) == 0:
        return {}
    metrics: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        metrics[f"HR@{k}"] = float(hit.mean())
        metrics[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean())
    metrics["MRR"] = float((1.0 / ranks).mean())
    return metrics


def rank_all(scorer: Scorer, eval_set: EvalSet, batch_size: int, max_len: int, append_mask: bool, exclude_history: bool, device) -> np.ndarray:
    """Target ranks by scoring each batch of users against the whole catalogue at once: the dense
    reference that the item-sharded evaluator is tested against."""
    ranks = []
    bar = progress.bar(total=-(-len(eval_set) // batch_size), desc="evaluating", unit="batch")
    for items, targets, history in history_batches(eval_set, batch_size, max_len, append_mask):
        bar.update()
        items, targets = items.to(device), targets.to(device)
        scores = scorer(items)
        excluded = history.to(device) if exclude_history else None
        ranks.append(target_ranks(scores, targets, excluded).cpu().numpy())
    bar.close()
    return np.concatenate(ranks) if ranks else np.zeros(0)


def model_scorer(model: SeqRecModel, autocast_dtype: torch.dtype | None) -> Scorer:
    def score(items: torch.Tensor) -> torch.Tensor:
        with torch.autocast(items.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            rows = torch.arange(items.shape[0], device=items.device)
            return model(items, rows * items.shape[1] + tail_positions(items)).float()

    return score


def evaluate_model(model: SeqRecModel, eval_set: EvalSet, batch_size: int, max_len: int, ks, exclude_history: bool, device, autocast_dtype=None, zero3: bool = False) -> dict[str, float]:
    """Metrics of `model`: the item-sharded evaluator, which on one process is the plain one."""
    from seqrec.sharded_eval import evaluate_sharded

    return evaluate_sharded(model, eval_set, batch_size, max_len, ks, exclude_history, device, autocast_dtype, zero3).metrics


def popularity_ranks(item_counts: np.ndarray, eval_set: EvalSet, exclude_history: bool) -> np.ndarray:
    """`target_ranks` of the most-popular scorer (item k scores item_counts[k]) without a users x items matrix.

    Every user shares one score vector, so a target's pessimistic rank is the number of items at
    least as popular (one binary search in the sorted counts) less the user's distinct history
    items, other than the target, that are at least as popular. Memory is O(items + interactions)
    where scoring a batch of B users would materialise B x items scores and masks."""
    popularity = np.asarray(item_counts, dtype=np.float64)[1:]
    targets = eval_set.targets.astype(np.int64)
    target_scores = popularity[targets - 1]
    at_least_as_popular = len(popularity) - np.searchsorted(np.sort(popularity), target_scores, side="left")
    if not exclude_history or len(eval_set.history) == 0:
        return at_least_as_popular
    lengths = np.diff(eval_set.offsets)
    owner = np.repeat(np.arange(len(eval_set), dtype=np.int64), lengths)
    items = eval_set.history.astype(np.int64)
    pairs = np.unique(owner * (len(popularity) + 1) + items)  # distinct (user, item)
    owner, items = pairs // (len(popularity) + 1), pairs % (len(popularity) + 1)
    kept = (items > 0) & (items != targets[owner])
    owner, items = owner[kept], items[kept]
    outranking = popularity[items - 1] >= target_scores[owner]
    return at_least_as_popular - np.bincount(owner[outranking], minlength=len(eval_set))


def evaluate_popularity(item_counts: np.ndarray, eval_set: EvalSet, ks, exclude_history: bool) -> dict[str, float]:
    """Most-popular baseline: items ranked by training frequency (item_counts[k] for item k)."""
    return metrics_from_ranks(popularity_ranks(item_counts, eval_set, exclude_history), tuple(ks))


def train_item_counts(data: PreparedDataset) -> np.ndarray:
    """Interactions per item in the training shards (index 0 = padding), for the popularity baseline."""
    counts = np.zeros(data.num_items + 1, dtype=np.int64)
    for sample in data.sequences(StreamOptions(max_len=10**9, shuffle_buffer=0)):
        counts += np.bincount(sample.items, minlength=len(counts))
    return counts


def popularity_baseline(data: PreparedDataset, ks, exclude_history: bool, splits=("valid", "test")) -> dict[str, dict[str, float]]:
    """Most-popular metrics on the given splits, under the same protocol as the model."""
    counts = train_item_counts(data)
    return {split: evaluate_popularity(counts, data.eval_set(split), ks, exclude_history) for split in splits}


def format_table(rows: dict[str, dict[str, float]], ks) -> str:
    columns = [name for k in ks for name in (f"HR@{k}", f"NDCG@{k}")] + ["MRR"]
    width = max(len(name) for name in rows) + 2
    lines = ["".ljust(width) + "".join(f"{c:>9}" for c in columns)]
    for name, metrics in rows.items():
        lines.append(name.ljust(width) + "".join(f"{metrics.get(c, math.nan):9.4f}" for c in columns))
    return "\n".join(lines)
