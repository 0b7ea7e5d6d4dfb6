"""model.query=mask_and_previous: the state scored at a mask token is its own plus the state of
the position before it, in training and in the (sharded) evaluator alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqrec.config import ModelConfig, ScratchBertConfig, load_config
from seqrec.data.split import EvalSet
from seqrec.errors import ConfigError
from seqrec.evaluate import evaluate_model, history_batches, model_scorer
from seqrec.model import MASK_ITEM, build_model
from seqrec.sharded_eval import _user_vectors
from tests.conftest import REPO

NUM_ITEMS = 25


def _model(query: str):
    torch.manual_seed(0)
    scratch = ScratchBertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model, _ = build_model(ModelConfig(pretrained=None, scratch=scratch, query=query, dropout=0.0), NUM_ITEMS, max_len=12)
    return model.eval()


def test_the_scored_state_adds_the_previous_position_and_nothing_at_position_zero():
    model = _model("mask_and_previous")
    items = torch.randint(1, NUM_ITEMS + 1, (3, 6), generator=torch.Generator().manual_seed(1))
    items[1, 4:] = 0
    items[:, 0] = MASK_ITEM
    items[0, 3] = MASK_ITEM
    hidden = model.encode(items)
    rows, columns = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 3, 3, 5])
    states = hidden[rows, columns] + torch.where((columns > 0).unsqueeze(1), hidden[rows, (columns - 1).clamp_min(0)], 0.0)
    expected = model.item_scores(states)
    assert torch.allclose(model(items, rows * items.shape[1] + columns), expected, atol=1e-5)
    plain = _model("mask")
    plain.load_state_dict(model.state_dict())
    own = plain(items, rows * items.shape[1] + columns)
    assert torch.allclose(own[0], expected[0], atol=1e-5)  # position 0 has no previous state
    assert not torch.allclose(own[1:], expected[1:], atol=1e-3)


def test_the_evaluator_scores_the_same_states_as_the_model():
    model = _model("mask_and_previous")
    histories = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in histories])])
    eval_set = EvalSet(np.arange(3), offsets, np.concatenate(histories).astype(np.int32), np.array([10, 11, 12], dtype=np.int32))
    metrics = evaluate_model(model, eval_set, 2, 8, (1, 5, 10), False, torch.device("cpu"))
    items, targets, _ = next(history_batches(eval_set, 3, 8, append_mask=True))
    scores = model_scorer(model, None)(items)
    ranks = (scores >= scores.gather(1, (targets.long() - 1).unsqueeze(1))).sum(dim=1)
    for k in (1, 5, 10):
        assert metrics[f"HR@{k}"] == pytest.approx((ranks <= k).float().mean().item())
    assert metrics["MRR"] == pytest.approx((1.0 / ranks.float()).mean().item(), abs=1e-6)
    # The evaluator's user vectors themselves: the mask token's state plus the last item's.
    hidden = model.encode(items)
    tails = (items != 0).sum(dim=1) - 1
    expected = hidden[torch.arange(3), tails] + hidden[torch.arange(3), tails - 1]
    assert torch.allclose(_user_vectors(model, items, 2, False, None), expected, atol=1e-5)


def test_query_is_validated_and_next_item_models_query_their_last_item():
    with pytest.raises(ConfigError, match="model.query: must be one of mask, mask_and_previous"):
        load_config(REPO / "configs" / "tiny.yaml", ["model.query=previous"])
    assert load_config(REPO / "configs" / "tiny.yaml", []).model.query == "mask_and_previous"
    scratch = ScratchBertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    for objective, query in (("next_item", "mask"), ("masked", "mask_and_previous")):
        config = ModelConfig(pretrained=None, scratch=scratch, attention="causal", causal_objective=objective, query="mask_and_previous")
        assert build_model(config, NUM_ITEMS, max_len=12)[0].query == query


def test_the_export_records_the_query_and_recommend_scores_as_training_does(tmp_path):
    import json

    from seqrec.model import ITEMS_META_FILE
    from seqrec.recommend import Recommender

    model = _model("mask_and_previous")
    with torch.no_grad():
        model.mlm.bert.encoder.layer[-1].output.LayerNorm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / ITEMS_META_FILE).read_text())["query"] == "mask_and_previous"
    (tmp_path / "model" / "items.tsv").write_text("item_id\toriginal_id\ttitle\n" + "".join(f"{k}\t{k}\t\n" for k in range(1, NUM_ITEMS + 1)))
    rows = torch.tensor([[4, 9, 2, MASK_ITEM], [7, MASK_ITEM, 0, 0]])
    expected = model_scorer(model, None)(rows)
    assert torch.allclose(Recommender(tmp_path / "model").scores(rows), expected, atol=1e-4)
