"""model.item_head=direct: hidden states meet the item rows without the MLM transform, in training,
in the sharded evaluator and in the exported model alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seqrec.config import ModelConfig, ScratchBertConfig, load_config
from seqrec.data.split import EvalSet
from seqrec.errors import ConfigError
from seqrec.evaluate import evaluate_model, history_batches, model_scorer
from seqrec.losses import LossWeights, MaskedItemObjective
from seqrec.model import ITEMS_META_FILE, MASK_ITEM, build_model
from seqrec.optim import build_optimizer
from seqrec.recommend import Recommender
from tests.conftest import REPO

NUM_ITEMS = 25


def _model(item_head: str):
    torch.manual_seed(0)
    scratch = ScratchBertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model, _ = build_model(ModelConfig(pretrained=None, scratch=scratch, item_head=item_head, query="mask", dropout=0.0), NUM_ITEMS, max_len=12)
    with torch.no_grad():
        model.mlm.cls.predictions.bias.normal_()
    return model.eval()


def _items():
    items = torch.randint(1, NUM_ITEMS + 1, (3, 6), generator=torch.Generator().manual_seed(1))
    items[1, 4:] = 0
    items[torch.arange(3), (items != 0).sum(dim=1) - 1] = MASK_ITEM
    return items


def test_direct_scores_are_the_hidden_state_times_the_item_rows_plus_bias():
    model, items = _model("direct"), _items()
    tails = (items != 0).sum(dim=1) - 1
    hidden = model.encode(items)[torch.arange(3), tails]
    rows = model.vocab.item_rows
    expected = hidden @ model.mlm.get_input_embeddings().weight[rows].T + model.mlm.cls.predictions.bias[rows]
    positions = torch.arange(3) * items.shape[1] + tails
    assert torch.allclose(model(items, positions), expected, atol=1e-5)
    labels = torch.tensor([3, 7, 11])
    assert torch.allclose(model(items, positions, labels), F.cross_entropy(expected, labels - 1, reduction="none"), atol=1e-5)
    transformed = _model("transform")
    assert not torch.allclose(transformed(items, positions), expected, atol=1e-3)


def test_the_unused_transform_is_frozen_and_left_out_of_the_optimiser():
    model = _model("direct").train()
    transform = list(model.mlm.cls.predictions.transform.parameters())
    assert transform and not any(parameter.requires_grad for parameter in transform)
    optimiser = build_optimizer(model, load_config(None, []).optim)
    optimised = {id(parameter) for group in optimiser.param_groups for parameter in group["params"]}
    assert not optimised & {id(parameter) for parameter in transform}
    items = torch.randint(1, NUM_ITEMS + 1, (4, 6), generator=torch.Generator().manual_seed(2))
    sums = MaskedItemObjective(model, 0.3)(items, torch.rand(items.shape, generator=torch.Generator().manual_seed(3)))
    sums.combine(LossWeights(1.0, 1.0)).total.backward()
    assert all(parameter.grad is None for parameter in transform)


def test_the_export_records_the_head_and_recommend_scores_as_training_does(tmp_path):
    model = _model("direct")
    model.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / ITEMS_META_FILE).read_text())["head"] == "direct"
    (tmp_path / "model" / "items.tsv").write_text("item_id\toriginal_id\ttitle\n" + "".join(f"{k}\t{k}\t\n" for k in range(1, NUM_ITEMS + 1)))
    history = [4, 9, 2]
    expected = model_scorer(model, None)(torch.tensor([history + [MASK_ITEM]]))[0]
    scores = Recommender(tmp_path / "model").scores(torch.tensor([history + [MASK_ITEM]]))[0]
    assert torch.allclose(scores, expected, atol=1e-4)


def test_the_export_is_a_plain_masked_lm_whose_item_logits_are_the_direct_scores(tmp_path):
    from transformers import AutoModelForMaskedLM

    model = _model("direct")
    with torch.no_grad():
        final = model.mlm.bert.encoder.layer[-1].output.LayerNorm
        final.weight.uniform_(0.3, 1.5)
        final.bias.normal_()
    model.save_pretrained(tmp_path / "model")
    plain = AutoModelForMaskedLM.from_pretrained(tmp_path / "model").eval()
    items = _items()
    tokens = model.vocab.tokens(items)
    with torch.no_grad():
        logits = plain(input_ids=tokens, attention_mask=(items != 0).long()).logits[..., model.vocab.item_rows]
        tails = (items != 0).sum(dim=1) - 1
        expected = model(items, torch.arange(3) * items.shape[1] + tails)
    assert torch.allclose(logits[torch.arange(3), tails], expected, atol=1e-4, rtol=1e-5)
    # The live model is untouched: its transform stays frozen and unused.
    assert not any(parameter.requires_grad for parameter in model.mlm.cls.predictions.transform.parameters())


def test_a_final_layer_norm_with_zero_gain_cannot_be_exported_as_a_direct_head(tmp_path):
    from seqrec.errors import SeqrecError

    model = _model("direct")
    with torch.no_grad():
        model.mlm.bert.encoder.layer[-1].output.LayerNorm.weight[3] = 0.0
    with pytest.raises(SeqrecError, match="near-.zero entries"):
        model.save_pretrained(tmp_path / "model")


def test_the_sharded_evaluator_ranks_with_the_direct_head():
    model = _model("direct")
    histories = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in histories])])
    eval_set = EvalSet(np.arange(3), offsets, np.concatenate(histories).astype(np.int32), np.array([10, 11, 12], dtype=np.int32))
    metrics = evaluate_model(model, eval_set, 2, 8, (1, 10), False, torch.device("cpu"))
    items, targets, _ = next(history_batches(eval_set, 3, 8, append_mask=True))
    scores = model_scorer(model, None)(items)
    target_scores = scores.gather(1, (targets.long() - 1).unsqueeze(1))
    ranks = (scores >= target_scores).sum(dim=1)  # pessimistic ties, as the evaluator counts
    assert metrics["HR@10"] == pytest.approx((ranks <= 10).float().mean().item())
    assert metrics["HR@1"] == pytest.approx((ranks <= 1).float().mean().item())


def test_item_head_is_validated():
    with pytest.raises(ConfigError, match="model.item_head: must be one of transform, direct"):
        load_config(REPO / "configs" / "tiny.yaml", ["model.item_head=linear"])
