"""Train a tiny model N steps under each ZeRO stage (and with activation checkpointing under ZeRO-0
and partitioned ZeRO-3) on fixed global batches; rank 0 saves the
per-step global losses, gradient norms, the final weights and their moving average (as
train.ema_decay keeps it). Launched by tests with 1 and with 2 processes. The clip is far below
the gradient norm, so every step is clipped: by the job under ZeRO-0, by DeepSpeed's optimisers
under ZeRO 1-3."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from seqrec import distributed
from seqrec.config import load_config
from seqrec.ema import WeightAverage
from seqrec.engine import TrainingEngine, plan_batches
from seqrec.losses import LossWeights, MaskedItemObjective
from seqrec.model import build_model
from seqrec.train import optimizer_step

NUM_ITEMS, GLOBAL_BATCH, WIDTH, STEPS, GRAD_CLIP, EMA_DECAY = 40, 8, 12, 6, 0.05, 0.5


def global_batches(seed: int = 123):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        lengths = torch.randint(2, WIDTH + 1, (GLOBAL_BATCH,), generator=generator)
        items = torch.randint(1, NUM_ITEMS + 1, (GLOBAL_BATCH, WIDTH), generator=generator)
        items[torch.arange(WIDTH).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
        yield items, torch.rand((GLOBAL_BATCH, WIDTH), generator=generator)


def train(stage: int, info, deepspeed_json: Path | None = None, *overrides: str) -> tuple[list[float], list[float], dict | None, dict | None, int]:
    config = load_config(None, [
        *([f"distributed.deepspeed_config={deepspeed_json}"] if deepspeed_json else []), *overrides,
        "model.pretrained=null", "model.dropout=0.0", "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64",
        f"data.max_len={WIDTH}", f"train.batch_size={GLOBAL_BATCH}", "train.precision=fp32", "train.device=cpu",
        "optim.warmup_steps=2", "optim.lr=0.01", f"optim.grad_clip={GRAD_CLIP}", f"distributed.zero_stage={stage}",
    ])
    plan = plan_batches(config, info.world_size)
    torch.manual_seed(0)
    model, _ = build_model(config.model, NUM_ITEMS, WIDTH)
    engine = TrainingEngine(MaskedItemObjective(model, config.loss.mask_prob), config, plan, STEPS, None)
    # Forward passes of the first layer's attention: one a step, two where checkpointing recomputes it.
    attention_calls = []
    model.mlm.bert.encoder.layer[0].attention.register_forward_hook(lambda *_: attention_calls.append(1))
    average = WeightAverage(list(engine.model.parameters()), EMA_DECAY, partitioned=engine.zero_stage == 3)
    losses, grad_norms = [], []
    rows = slice(info.rank * plan.micro_batch, (info.rank + 1) * plan.micro_batch)
    for items, draws in global_batches():
        parts = optimizer_step(engine, [items[rows]], [draws[rows]], LossWeights(1.0, 1.0), info.world_size)
        total = parts.total.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / info.world_size)
        grad_norms.append(engine.grad_norm)
        average.update(len(losses))
    with average.applied():
        averaged = engine.full_state_dict()
    return losses, grad_norms, engine.full_state_dict(), averaged, len(attention_calls)


def main(out: str) -> None:
    info = distributed.init("cpu", timeout_minutes=5)
    results = {stage: train(stage, info) for stage in (0, 1, 2, 3)}
    # The tiny model's weights are all under ZeRO-3's persistence threshold, so stage 3 above
    # keeps them whole on every rank; with the threshold at 0 each rank holds only its partition.
    partitioned = Path(out).with_suffix(f".zero3-partitioned-rank{info.rank}.json")
    partitioned.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    results["3-partitioned"] = train(3, info, partitioned)
    # Recomputing each layer in the backward pass must train the same model, also where ZeRO-3
    # has to gather every layer's weights a second time for the recompute.
    results["0-checkpointed"] = train(0, info, None, "model.activation_checkpointing=1")
    results["3-partitioned-checkpointed"] = train(3, info, partitioned, "model.activation_checkpointing=1")
    if info.is_main:
        torch.save({stage: {"losses": torch.tensor(losses), "grad_norms": torch.tensor(norms), "weights": weights, "averaged": averaged,
                            "attention_calls": calls}
                    for stage, (losses, norms, weights, averaged, calls) in results.items()}, out)


if __name__ == "__main__":
    main(sys.argv[1])
    distributed.finish()
