"""Masked item modeling under the causal mask (model.causal_objective=masked): every masked target
is predicted from the items before it through a mask token, and the model is queried the same way."""

from __future__ import annotations

import json

import pytest
import torch

from seqrec.config import ModelConfig, ScratchBertConfig, load_config
from seqrec.errors import ConfigError
from seqrec.losses import MaskedItemObjective
from seqrec.masking import IGNORE_LABEL, mask_from_draws, mask_items
from seqrec.model import ITEMS_META_FILE, MASK_ITEM, build_model
from seqrec.recommend import Recommender
from tests.conftest import REPO

NUM_ITEMS = 30


def _model(objective: str):
    torch.manual_seed(0)
    scratch = ScratchBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config = ModelConfig(pretrained=None, scratch=scratch, attention="causal", causal_objective=objective, dropout=0.0)
    model, _ = build_model(config, NUM_ITEMS, max_len=16)
    return model.eval()


def test_a_masked_position_is_scored_from_the_items_before_it_only():
    model = _model("masked")
    assert model.causal and not model.next_item
    items = torch.randint(1, NUM_ITEMS + 1, (1, 10), generator=torch.Generator().manual_seed(1))
    batch = mask_items(items, 0.3, torch.Generator().manual_seed(2))
    batch.inputs[0, 4], batch.labels[0, 4] = MASK_ITEM, items[0, 4]
    position = torch.tensor([4])
    before = model(batch.inputs, position, batch.labels.flatten()[position])
    changed = batch.inputs.clone()
    changed[0, 5:] = torch.randint(1, NUM_ITEMS + 1, (5,), generator=torch.Generator().manual_seed(3))
    assert model(changed, position, batch.labels.flatten()[position]).item() == pytest.approx(before.item(), abs=1e-6)
    changed[0, 2] = (changed[0, 2] % NUM_ITEMS) + 1
    assert model(changed, position, batch.labels.flatten()[position]).item() != pytest.approx(before.item(), abs=1e-6)


def test_the_objective_trains_masked_positions_and_the_tail_not_every_next_item():
    items = torch.randint(1, NUM_ITEMS + 1, (4, 8), generator=torch.Generator().manual_seed(4))
    draws = torch.rand(items.shape, generator=torch.Generator().manual_seed(5))
    masked = MaskedItemObjective(_model("masked"), 0.3)(items, draws)
    next_item = MaskedItemObjective(_model("next_item"), 0.3)(items, draws)
    targets = (mask_from_draws(items, draws, 0.3).labels != IGNORE_LABEL).sum()
    assert masked.tail_mean.item() > 0 and next_item.tail_mean.item() == 0
    assert 4 <= masked.masked_count.item() < items.numel() - 4
    assert masked.masked_count.item() == targets.item()  # exactly the masked positions, tails included
    assert next_item.masked_count.item() == 4 * 7  # every position but each row's last


def test_the_export_says_how_the_model_is_queried(tmp_path):
    for objective, query in (("masked", "mask_and_previous"), ("next_item", "last_item")):
        _model(objective).save_pretrained(tmp_path / objective)
        assert json.loads((tmp_path / objective / ITEMS_META_FILE).read_text())["query"] == query


def test_the_next_item_objective_needs_causal_attention():
    with pytest.raises(ValueError, match="needs causal attention"):
        from seqrec.model import SeqRecModel

        bidirectional = _model("masked")
        SeqRecModel(bidirectional.mlm, bidirectional.tokenizer, bidirectional.vocab, causal=False, next_item=True)
    with pytest.raises(ConfigError, match="model.causal_objective: must be one of next_item, masked"):
        load_config(REPO / "configs" / "tiny.yaml", ["model.causal_objective=sideways"])


def test_exports_without_query_keep_their_old_meaning(tmp_path):
    model = _model("next_item")
    model.save_pretrained(tmp_path / "old")
    meta_path = tmp_path / "old" / ITEMS_META_FILE
    meta = json.loads(meta_path.read_text())
    del meta["query"]
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "old" / "items.tsv").write_text("item_id\toriginal_id\ttitle\n" + "".join(f"{k}\t{k}\t\n" for k in range(1, NUM_ITEMS + 1)))
    assert Recommender(tmp_path / "old").next_item
