"""Warm start from an export: trained rows follow their original ids into a renumbered catalogue,
new items start from the trained rows, the encoder and head come across unchanged, and
settings that would change what the weights mean are refused."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from seqrec.cli import main
from seqrec.config import ModelConfig, ScratchBertConfig, load_config
from seqrec.errors import ConfigError
from seqrec.evaluate import model_scorer
from seqrec.model import MASK_ITEM, build_model
from seqrec.recommend import Recommender
from tests.conftest import REPO

TINY = ScratchBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
OLD_IDS = [f"sku-{k}" for k in range(1, 31)]


def _export(directory, original_ids=OLD_IDS, **overrides):
    """A tiny model with distinct item rows and biases, as `seqrec export` writes it."""
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(pretrained=None, scratch=TINY, **overrides), len(original_ids), max_len=16)
    with torch.no_grad():
        model.item_embeddings().normal_(0.0, 0.3)
        model.mlm.cls.predictions.bias[model.vocab.item_rows] = torch.randn(len(original_ids))
    model.eval().save_pretrained(directory, max_len=16)
    (directory / "items.tsv").write_text(
        "item_id\toriginal_id\ttitle\n" + "".join(f"{k}\t{original}\t\n" for k, original in enumerate(original_ids, start=1)))
    return model


def _warm(directory, original_ids, **overrides):
    config = ModelConfig(warm_start=str(directory), **overrides)
    return build_model(config, len(original_ids), max_len=16, original_ids=original_ids)


def test_trained_rows_follow_their_original_ids_and_new_items_start_at_the_trained_mean(tmp_path):
    old = _export(tmp_path)
    new_ids = ["sku-7", "new-a", "sku-2", "new-b", "sku-30"]
    model, report = _warm(tmp_path, new_ids, item_init_noise=0.0)
    old_rows, old_bias = old.item_embeddings().detach(), old.mlm.cls.predictions.bias[old.vocab.item_rows].detach()
    rows, bias = model.item_embeddings().detach(), model.mlm.cls.predictions.bias[model.vocab.item_rows].detach()
    for new, previous in ((0, 6), (2, 1), (4, 29)):
        assert torch.equal(rows[new], old_rows[previous])
        assert bias[new] == old_bias[previous]
    for new in (1, 3):
        assert torch.allclose(rows[new], old_rows.mean(dim=0), atol=1e-6)
        assert bias[new] == pytest.approx(float(old_bias.mean()), abs=1e-6)
    assert report["counts"] == {"carried": 3, "mean": 2}
    assert report["dropped"] == 27
    assert report["items_by_rule"] == {"carried": [1, 3, 5], "mean": [2, 4]}
    # The catalogue's tokens replace the export's: the same layout as on a base BERT.
    assert model.vocab.first_item_token == old.vocab.first_item_token
    assert len(model.tokenizer) == model.vocab.first_item_token + 5
    assert model.tokenizer.convert_tokens_to_ids("[item_5]") == model.vocab.first_item_token + 4
    assert model.tokenizer.convert_tokens_to_ids("[item_6]") == model.tokenizer.unk_token_id
    assert model.mlm.get_input_embeddings().weight.shape[0] == model.vocab.first_item_token + 5
    old_state, new_state = old.mlm.state_dict(), model.mlm.state_dict()
    encoder = [name for name in old_state if name.startswith("bert.encoder.") or "position_embeddings" in name]
    assert encoder and all(torch.equal(old_state[name], new_state[name]) for name in encoder)
    # Everything the export trained counts as loaded: the encoder takes optim.pretrained_lr_scale.
    assert {id(p) for p in model.pretrained_parameters()} >= {id(p) for n, p in model.mlm.named_parameters() if n.startswith("bert.encoder.")}


@pytest.mark.parametrize("overrides", [{}, {"attention": "causal"}, {"positions": "from_end", "item_head": "transform", "query": "mask"}])
def test_the_same_catalogue_scores_exactly_as_the_export(tmp_path, overrides):
    old = _export(tmp_path, **overrides)
    model, report = _warm(tmp_path, OLD_IDS, **overrides)
    assert report["counts"] == {"carried": 30, "mean": 0}
    model.eval()
    next_item = overrides.get("attention") == "causal"
    items = torch.tensor([[3, 9, 4, 17, 22, 5], [8, 2, 0, 0, 0, 0]])
    if not next_item:
        items = torch.cat([items, torch.zeros(2, 1, dtype=torch.long)], dim=1)
        items[0, 6], items[1, 2] = MASK_ITEM, MASK_ITEM
    with torch.no_grad():
        expected, got = model_scorer(old, None)(items), model_scorer(model, None)(items)
        exported = Recommender(tmp_path).scores(items)
    assert torch.equal(got, expected)
    assert torch.allclose(got, exported, atol=1e-5)


def test_random_rule_and_the_rows_own_spread(tmp_path):
    old = _export(tmp_path)
    new_ids = [f"new-{k}" for k in range(400)] + ["sku-1"]
    spread = float(old.item_embeddings().detach().std(dim=0).mean())
    _, report = _warm(tmp_path, new_ids, item_init_noise=None)
    assert report["noise_std"] == pytest.approx(spread)
    model, report = _warm(tmp_path, new_ids, item_init="random")
    assert report["counts"] == {"carried": 1, "random": 400}
    assert float(model.item_embeddings()[:400].detach().std()) == pytest.approx(model.mlm.config.initializer_range, rel=0.05)


@pytest.mark.parametrize("overrides, field", [
    ({"attention": "causal"}, "model.attention"),
    ({"item_head": "transform"}, "model.item_head"),
    ({"positions": "from_end"}, "model.positions"),
    ({"query": "mask"}, "model.query"),
])
def test_settings_that_change_what_the_weights_mean_must_match_the_export(tmp_path, overrides, field):
    _export(tmp_path)
    with pytest.raises(ConfigError, match=f"{field}: .* was trained with"):
        _warm(tmp_path, OLD_IDS, **overrides)


def test_causal_objective_must_match_a_causal_export(tmp_path):
    _export(tmp_path, attention="causal")
    with pytest.raises(ConfigError, match="model.causal_objective: .* was trained with next_item, got masked"):
        _warm(tmp_path, OLD_IDS, attention="causal", causal_objective="masked")


def test_unusable_exports_and_settings_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.warm_start: .*: no such directory"):
        _warm(tmp_path / "absent", OLD_IDS)
    with pytest.raises(ConfigError, match="model.warm_start: .*not a seqrec model"):
        _warm(tmp_path, OLD_IDS)
    _export(tmp_path)
    with pytest.raises(ConfigError, match="no item of the dataset is in .*items.tsv.*different item ids"):
        _warm(tmp_path, ["other-1", "other-2"])
    (tmp_path / "items.tsv").write_text("item_id\toriginal_id\ttitle\n1\tsku-1\t\n")
    with pytest.raises(ConfigError, match="items.tsv: 1 items, the model has 30"):
        _warm(tmp_path, OLD_IDS)
    (tmp_path / "seqrec_items.json").write_text("{not json")
    with pytest.raises(ConfigError, match="seqrec_items.json: unreadable"):
        _warm(tmp_path, OLD_IDS)
    with pytest.raises(ConfigError, match="model.warm_start: must lie outside this job's run directory"):
        load_config(None, [f"model.warm_start={tmp_path / 'run' / 'model'}", f"run_dir={tmp_path / 'run'}"])
    for setting, message in (("model.item_init=text", "model.item_init: text is not available"),
                             ("model.weights=random", "model.weights: must be pretrained")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [f"model.warm_start={tmp_path}", setting])


def _split_log(source, old_path, new_path):
    """The earlier 80% of a log by time, and the whole log with 10 items removed: a later
    retraining sees new items and has lost some old ones."""
    rows = list(csv.DictReader(open(source)))
    cut = sorted(int(row["timestamp"]) for row in rows)[int(0.8 * len(rows))]
    retired = {row["item_id"] for row in rows[:200]}
    retired = set(sorted(retired)[:10])
    for path, kept in ((old_path, [row for row in rows if int(row["timestamp"]) < cut]),
                       (new_path, [row for row in rows if row["item_id"] not in retired])):
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["user_id", "item_id", "timestamp"])
            writer.writeheader()
            writer.writerows(kept)


def test_retraining_on_a_newer_log_from_an_export(tmp_path):
    """The whole path from the command line: train on last period's log, prepare the new log (its
    own item numbering), train from the first run, export that run from its checkpoint, and
    evaluate it."""
    assert main(["synth", "--preset", "tiny", "--items", "150", "--out", str(tmp_path / "log.csv"), "--quiet"]) == 0
    _split_log(tmp_path / "log.csv", tmp_path / "old.csv", tmp_path / "new.csv")
    for name in ("old", "new"):
        assert main(["prepare", str(tmp_path / f"{name}.csv"), "--out", str(tmp_path / name), "--quiet"]) == 0
    base = [str(REPO / "configs" / "tiny.yaml"), "--set", "tracking.wandb=disabled", "--set", "train.epochs=2"]
    assert main(["train", "--config", *base, "--set", f"data.dataset={tmp_path / 'old'}", "--set", f"run_dir={tmp_path / 'run-old'}"]) == 0
    # A finished run's directory serves as well as its export: its model/ is one.
    assert main(["train", "--config", *base, "--set", f"data.dataset={tmp_path / 'new'}", "--set", f"run_dir={tmp_path / 'run-new'}",
                 "--set", f"model.warm_start={tmp_path / 'run-old'}"]) == 0

    report = json.loads((tmp_path / "run-new" / "item_init.json").read_text())
    old_ids = [line.split("\t")[1] for line in (tmp_path / "old" / "items.tsv").read_text().splitlines()[1:]]
    new_ids = [line.split("\t")[1] for line in (tmp_path / "new" / "items.tsv").read_text().splitlines()[1:]]
    shared = set(old_ids) & set(new_ids)
    assert report["counts"] == {"carried": len(shared), "mean": len(set(new_ids) - shared)}
    assert report["dropped"] == len(set(old_ids) - shared) > 0 and report["counts"]["mean"] > 0
    metrics = json.loads((tmp_path / "run-new" / "metrics.json").read_text())
    assert metrics["item_init"] == report["counts"]

    # A checkpoint of the warm-started run rebuilds its model through the export it started from.
    assert main(["export", str(tmp_path / "run-new"), str(tmp_path / "export-new"), "--checkpoint", "auto", "--quiet"]) == 0
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(tmp_path / "export-new"), "--dataset", str(tmp_path / "new"), "--split", "test",
                 "--output", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())

    # `evaluate` (and `recommend`) take a finished run's directory as well.
    # As the run evaluated itself (its precision, its batch): the same scores, so the same metrics.
    assert main(["evaluate", "--model", str(tmp_path / "run-old"), "--dataset", str(tmp_path / "old"), "--split", "test",
                 "--precision", "auto", "--batch-size", "128", "--output", str(out), "--quiet"]) == 0
    trained = json.loads((tmp_path / "run-old" / "metrics.json").read_text())["test"]
    assert json.loads(out.read_text())["metrics"]["NDCG@10"] == pytest.approx(trained["NDCG@10"], abs=1e-9)
