"""Evaluate one tiny model with the item-sharded evaluator (plain and under a ZeRO-3 engine);
rank 0 saves ranks, top-K and metrics. Launched by tests with 1, 2 and 3 processes."""

from __future__ import annotations

import sys

import numpy as np
import torch

from seqrec import distributed
from seqrec.config import load_config
from seqrec.data.split import EvalSet
from seqrec.engine import TrainingEngine, plan_batches
from seqrec.losses import MaskedItemObjective
from seqrec.model import build_model
from seqrec.sharded_eval import evaluate_sharded

NUM_ITEMS, MAX_LEN, BLOCK = 50, 10, 7
TIED = (12, 13, 14, 15)  # zero embeddings and equal bias: exact score ties
# Block boundaries: 2 ranks split items after id 28, 3 ranks after ids 14 and 35.
BOUNDARY_TARGETS = (28, 29, 14, 15, 35, 36, 1, 50, 13)


def eval_set(users: int = 61, seed: int = 5) -> EvalSet:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 14, size=users)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    history = rng.integers(1, NUM_ITEMS + 1, size=int(offsets[-1])).astype(np.int32)
    targets = rng.integers(1, NUM_ITEMS + 1, size=users).astype(np.int32)
    targets[: len(BOUNDARY_TARGETS)] = BOUNDARY_TARGETS
    history[offsets[3]] = targets[3]  # a target the user had consumed before: never excluded
    return EvalSet(np.arange(users, dtype=np.int64), offsets, history, targets)


def model_for_test():
    config = load_config(None, [
        "model.pretrained=null", "model.scratch.hidden_size=16", "model.scratch.intermediate_size=32",
        "model.scratch.num_attention_heads=2", f"data.max_len={MAX_LEN}", "train.batch_size=6", "train.device=cpu",
        "train.precision=fp32", "distributed.zero_stage=3",
    ])
    torch.manual_seed(0)
    model, _ = build_model(config.model, NUM_ITEMS, MAX_LEN)
    embedding, bias = model.scoring_parameters()
    with torch.no_grad():
        rows = [model.vocab.first_item_token + item - 1 for item in TIED]
        # Zero rows score exactly their bias in any summation order; identical non-zero rows
        # at different offsets of an item block can round apart (seen on an AVX-512 EPYC).
        embedding[rows] = 0.0
        bias[rows] = 0.25
    return model, config


def main(out: str) -> None:
    info = distributed.init("cpu", timeout_minutes=5)
    data = eval_set()
    model, config = model_for_test()
    plain = evaluate_sharded(model, data, 16, MAX_LEN, (1, 5, 10, 20), True, torch.device("cpu"), item_block=BLOCK, encode_batch=4)
    engine = TrainingEngine(MaskedItemObjective(model, 0.3), config, plan_batches(config, info.world_size), 1, None)
    lookups = []
    table = engine.model.mlm.get_input_embeddings()
    hook = table.register_forward_pre_hook(lambda module, args: lookups.append(module.weight.numel()))
    zero3 = evaluate_sharded(engine.model, data, 16, MAX_LEN, (1, 5, 10, 20), True, torch.device("cpu"), zero3=True, item_block=BLOCK, encode_batch=4)
    hook.remove()
    # The item table's module never ran (so ZeRO-3 never gathered it) and it is still partitioned.
    table_untouched = not lookups and table.weight.numel() < table.weight.ds_numel
    if info.is_main:
        torch.save({"table_untouched": table_untouched, **{name: {"ranks": torch.from_numpy(result.ranks), "top_items": torch.from_numpy(result.top_items),
                           "top_scores": torch.from_numpy(result.top_scores), "metrics": result.metrics}
                    for name, result in (("plain", plain), ("zero3", zero3))}}, out)


if __name__ == "__main__":
    main(sys.argv[1])
    distributed.finish()
