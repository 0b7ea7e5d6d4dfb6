"""Vocabulary extension, item-embedding initialisation, attention variants, HF round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM, AutoTokenizer

from seqrec.config import ModelConfig, ScratchBertConfig
from seqrec.errors import ConfigError
from seqrec.model import MASK_ITEM, build_model, positions_from_end

TINY = ScratchBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _tiny(num_items=30, **overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig(pretrained=None, scratch=TINY, **overrides), num_items, max_len=16)


def test_item_tokens_are_real_tokenizer_tokens_after_the_base_vocabulary():
    model, _ = _tiny()
    vocab = model.vocab
    assert model.tokenizer.convert_tokens_to_ids("[item_1]") == vocab.first_item_token
    assert model.tokenizer.convert_tokens_to_ids("[item_30]") == vocab.first_item_token + 29
    assert model.mlm.get_input_embeddings().weight.shape[0] == vocab.first_item_token + 30
    tokens = vocab.tokens(torch.tensor([[1, 30, MASK_ITEM, 0]]))
    assert tokens.tolist() == [[vocab.first_item_token, vocab.first_item_token + 29, vocab.mask_token_id, vocab.pad_token_id]]


def test_mean_init_is_base_mean_plus_small_noise():
    model, report = _tiny(item_init="mean", item_init_noise=0.0)
    weight = model.mlm.get_input_embeddings().weight.detach()
    base_mean = weight[: model.vocab.first_item_token].mean(0)
    assert torch.allclose(model.item_embeddings().detach(), base_mean.expand(30, -1))
    assert report["counts"] == {"mean": 30, "random": 0, "text": 0}
    noisy, _ = _tiny(item_init="mean", item_init_noise=0.02)
    spread = (noisy.item_embeddings().detach() - base_mean).std().item()
    assert 0.01 < spread < 0.03


def test_null_noise_matches_the_spread_of_the_pretrained_word_pieces():
    """MiniLM's word pieces spread ~0.055 per dimension, well apart from the 0.02 default, so the
    test fails if null fell back to a fixed scale."""
    model, report = build_model(ModelConfig(item_init="mean", item_init_noise=None, keep_layers=1), 200, max_len=16)
    weight = model.mlm.get_input_embeddings().weight.detach()
    base = weight[: model.vocab.first_item_token]
    expected = base.std(dim=0).mean().item()
    assert expected > 0.04
    assert report["noise_std"] == pytest.approx(expected)
    spread = (model.item_embeddings().detach() - base.mean(0)).std().item()
    assert spread == pytest.approx(expected, rel=0.05)


def test_item_init_noise_is_checked_at_load():
    from seqrec.config import load_config

    assert load_config(None, ["model.item_init_noise=null"]).model.item_init_noise is None
    with pytest.raises(ConfigError, match="model.item_init_noise: must be >= 0 or null"):
        load_config(None, ["model.item_init_noise=-0.1"])


def test_random_init_uses_the_initializer_range():
    model, report = _tiny(item_init="random")
    assert report["counts"]["random"] == 30
    assert model.item_embeddings().detach().std().item() == pytest.approx(0.02, rel=0.2)


def test_text_init_is_the_mean_wordpiece_embedding_of_the_title_with_fallback():
    titles = ["toy story", "", "heat"]
    model, report = build_model(ModelConfig(item_init="text", item_init_noise=0.0, keep_layers=1), 3, max_len=16, titles=titles)
    assert report["counts"] == {"mean": 1, "random": 0, "text": 2}
    assert report["items_by_rule"] == {"mean": [2], "text": [1, 3]}
    weight = model.mlm.get_input_embeddings().weight.detach()
    ids = model.tokenizer("toy story", add_special_tokens=False)["input_ids"]
    assert torch.allclose(model.item_embeddings()[0].detach(), weight[ids].mean(0), atol=1e-6)


def test_packaged_minilm_loads_offline_and_keeps_first_k_layers():
    model, _ = build_model(ModelConfig(keep_layers=2), 10, max_len=50)
    assert model.mlm.config.hidden_size == 384
    assert len(model.mlm.bert.encoder.layer) == 2 == model.mlm.config.num_hidden_layers
    assert model.vocab.first_item_token == 30522


def test_random_weights_give_the_same_architecture_freshly_initialised():
    pretrained, _ = build_model(ModelConfig(keep_layers=1), 5, max_len=10)
    scratch, _ = build_model(ModelConfig(keep_layers=1, weights="random"), 5, max_len=10)
    a = pretrained.mlm.bert.encoder.layer[0].attention.self.query.weight
    b = scratch.mlm.bert.encoder.layer[0].attention.self.query.weight
    assert a.shape == b.shape and not torch.allclose(a, b)


@pytest.mark.parametrize(
    ("dropout", "attention_dropout", "expected"),
    [(None, None, (0.1, 0.1)), (0.2, None, (0.2, 0.2)), (0.2, 0.0, (0.2, 0.0)), (None, 0.3, (0.1, 0.3))],
)
def test_dropout_settings_reach_the_bert_config(dropout, attention_dropout, expected):
    model, _ = _tiny(dropout=dropout, attention_dropout=attention_dropout)
    config = model.mlm.config
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == expected
    layer = model.mlm.bert.encoder.layer[0]
    assert (layer.output.dropout.p, layer.attention.self.dropout.p) == expected


def _loss_and_gradients(model, recomputed: list) -> tuple[float, dict[str, torch.Tensor]]:
    from seqrec.losses import LossWeights, MaskedItemObjective

    for index, layer in enumerate(model.mlm.bert.encoder.layer):
        layer.attention.register_forward_hook(lambda *_, index=index: recomputed.append(index))
    model.train()
    generator = torch.Generator().manual_seed(1)
    items = torch.randint(1, 31, (8, 16), generator=generator)
    items[:4, 10:] = 0
    torch.manual_seed(5)  # the dropout masks
    parts = MaskedItemObjective(model, 0.3)(items, torch.rand((8, 16), generator=generator)).combine(LossWeights(1.0, 1.0))
    parts.total.backward()
    return parts.total.item(), {name: p.grad.to_dense() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("every", "recomputed_layers"), [(1, [0, 1]), (2, [0])])
def test_activation_checkpointing_recomputes_layers_and_trains_the_same(every, recomputed_layers):
    """With dropout on, so the recompute must replay the forward pass's dropout masks."""
    plain_calls, checkpointed_calls = [], []
    loss, gradients = _loss_and_gradients(_tiny(dropout=0.1)[0], plain_calls)
    checkpointed_loss, checkpointed = _loss_and_gradients(_tiny(dropout=0.1, activation_checkpointing=every)[0], checkpointed_calls)
    assert plain_calls == [0, 1]
    assert checkpointed_calls == [0, 1, *reversed(recomputed_layers)]  # the backward pass recomputes the last layer first
    assert checkpointed_loss == loss
    assert gradients.keys() == checkpointed.keys()
    assert all(torch.equal(gradients[name], checkpointed[name]) for name in gradients)


def test_activation_checkpointing_without_per_layer_recompute_is_a_clear_error(monkeypatch):
    """transformers before 4.53 checkpoints BERT's layers all or none, from the encoder."""
    import transformers.modeling_layers

    class UnrelatedLayer(torch.nn.Module):
        pass

    monkeypatch.setattr(transformers.modeling_layers, "GradientCheckpointingLayer", UnrelatedLayer)
    with pytest.raises(ConfigError, match=r"model.activation_checkpointing: needs transformers >= 4.53.*this is transformers \d"):
        _tiny(activation_checkpointing=1)


def test_activation_checkpointing_is_checked_at_load():
    from seqrec.config import load_config

    assert load_config(None, ["model.activation_checkpointing=2"]).model.activation_checkpointing == 2
    with pytest.raises(ConfigError, match="model.activation_checkpointing: must be >= 0"):
        load_config(None, ["model.activation_checkpointing=-1"])


def test_sequence_longer_than_positions_is_a_clear_error():
    with pytest.raises(ConfigError, match="data.max_len: 600 exceeds the model's max_position_embeddings \\(512\\)"):
        build_model(ModelConfig(keep_layers=1), 5, max_len=600)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        build_model(ModelConfig(pretrained=None, scratch=TINY, max_position_embeddings=8), 5, max_len=16)
    with pytest.raises(ConfigError, match="keep_layers: 9 exceeds"):
        build_model(ModelConfig(keep_layers=9), 5, max_len=10)


def test_missing_pretrained_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not a Hugging Face model directory"):
        build_model(ModelConfig(pretrained=str(tmp_path)), 5, max_len=10)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_causal_attention_hides_the_future(attention):
    model, _ = _tiny(attention=attention)
    model.eval()
    a = torch.tensor([[1, 2, 3, 4, 5]])
    b = torch.tensor([[1, 2, 3, 9, 10]])
    with torch.no_grad():
        same_prefix = torch.allclose(model.encode(a)[0, :3], model.encode(b)[0, :3], atol=1e-5)
    assert same_prefix == (attention == "causal")


def test_positions_from_end_count_back_from_each_rows_last_item():
    items = torch.tensor([[5, 6, 7, 0, 0], [1, 2, 3, 4, 5], [9, 0, 0, 0, 0]])
    assert positions_from_end(items).tolist() == [[2, 1, 0, 0, 0], [4, 3, 2, 1, 0], [0, 0, 0, 0, 0]]


@pytest.mark.parametrize("positions", ["from_start", "from_end"])
def test_from_end_positions_give_every_tail_the_same_input_embedding(positions):
    """What encode feeds the encoder at the tail: with from_end, the masked tail of a 2-item and
    of a 5-item history enter with the same embedding (same token, position 0); from the start
    they sit at positions 1 and 4."""
    model, _ = _tiny(positions=positions)
    model.eval()
    seen = []
    hook = model.mlm.bert.embeddings.register_forward_hook(lambda module, args, output: seen.append(output))
    rows = torch.tensor([[4, 8, 15, 16, MASK_ITEM], [4, MASK_ITEM, 0, 0, 0]])
    with torch.no_grad():
        model.encode(rows)
    hook.remove()
    same = torch.allclose(seen[0][0, 4], seen[0][1, 1], atol=1e-6)
    assert same == (positions == "from_end")


@pytest.mark.parametrize("positions", ["from_start", "from_end"])
def test_export_is_a_plain_hf_directory_whose_item_logits_are_the_trained_scores(tmp_path, positions):
    model, _ = _tiny(positions=positions)
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    items = torch.tensor([[3, 7, 11, MASK_ITEM]])
    with torch.no_grad():
        ours = model.item_scores(model.encode(items)[0, -1])
        tokens = model.vocab.tokens(items)
        position_ids = positions_from_end(items) if positions == "from_end" else None
        theirs = loaded(input_ids=tokens, attention_mask=torch.ones_like(tokens), position_ids=position_ids).logits[0, -1, model.vocab.item_rows]
    assert tokenizer.convert_tokens_to_ids("[item_7]") == model.vocab.first_item_token + 6
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (tmp_path / "model.safetensors").is_file()
    assert F.softmax(ours, -1).shape == (30,)


def test_recommend_from_an_export_applies_the_trained_position_scheme(tmp_path):
    """Histories of different lengths, batched and padded by the recommender, score as the
    trained model scores each one (only a from_end export needs position ids passed)."""
    from seqrec.evaluate import model_scorer
    from seqrec.recommend import Recommender

    model, _ = _tiny(positions="from_end")
    model.eval()
    model.save_pretrained(tmp_path, max_len=16)
    (tmp_path / "items.tsv").write_text("item_id\toriginal_id\ttitle\n" + "".join(f"{k}\tsku-{k}\tItem {k}\n" for k in range(1, 31)))
    recommender = Recommender(tmp_path)
    histories = [[3, 9, 4, 17, 22, 5], [8, 2]]
    recommendations = recommender.recommend(histories, k=5, exclude_history=False)
    for history, recs in zip(histories, recommendations):
        with torch.no_grad():
            expected = model_scorer(model, None)(torch.tensor([history + [MASK_ITEM]]))[0]
        top = torch.topk(expected, 5)
        assert [rec.item for rec in recs] == [f"sku-{item + 1}" for item in top.indices.tolist()]
        assert [rec.score for rec in recs] == pytest.approx(top.values.tolist(), abs=1e-4)
