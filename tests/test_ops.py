"""Operations: wandb round trip, export (final model and checkpoints), recommend."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForMaskedLM

from seqrec.config import load_config
from seqrec.recommend import Recommender
from seqrec.tracking import flatten, read_history, read_offline_history, wandb_mode
from seqrec.train import run
from tests.conftest import REPO


@pytest.fixture(scope="module")
def titled_dataset(tmp_path_factory):
    """A small log whose items have titles and string ids, prepared like a user's own data."""
    from seqrec.cli import main

    root = tmp_path_factory.mktemp("titled")
    assert main(["synth", "--preset", "tiny", "--out", str(root / "log.csv"), "--quiet"]) == 0
    lines = (root / "log.csv").read_text().splitlines()
    header, rows = lines[0].replace('"', "").split(","), [line.split(",") for line in lines[1:]]
    item_col = header.index("item_id")
    for row in rows:
        row[item_col] = f"sku-{row[item_col]}"
    (root / "log.csv").write_text("\n".join([",".join(header), *(",".join(row) for row in rows)]) + "\n")
    items = sorted({row[item_col] for row in rows})
    (root / "titles.tsv").write_text("".join(f"{item}\tProduct {item.upper()}\n" for item in items))
    out = root / "prepared"
    assert main(["prepare", str(root / "log.csv"), "--out", str(out), "--titles", str(root / "titles.tsv"), "--shard-size", "60", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def trained_run(titled_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    config = load_config(REPO / "configs" / "tiny.yaml", [
        f"data.dataset={titled_dataset}", f"run_dir={run_dir}", "train.epochs=2", "train.log_every=3",
        "train.checkpoint_every=5", "tracking.wandb=offline",
    ])
    return run(config)


def test_wandb_offline_history_equals_metrics_jsonl(trained_run):
    run_files = list((trained_run.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    logged = [row for row in read_offline_history(run_files[0]) if "final_metrics/_type" not in row]
    local = [flatten(row) for row in read_history(trained_run.run_dir)]
    assert logged == local
    assert any("loss_tail" in row and "grad_norm" in row and "sequences_per_s" in row for row in logged)
    # ZeRO-0 (this config): the norm is the job's clipping norm, not DeepSpeed's missing one (NaN).
    norms = [row["grad_norm"] for row in logged if "grad_norm" in row]
    assert norms and all(math.isfinite(norm) and norm > 0 for norm in norms), norms
    assert any("valid/NDCG@10" in row for row in logged) and any("test/NDCG@10" in row for row in logged)


@pytest.mark.parametrize("ending", ["finish", "stopped"])
def test_the_wandb_run_file_is_whole_when_the_tracker_closes(tmp_path, monkeypatch, ending):
    """wandb's service writes a run file's buffered records when it closes the run's stream, on a
    message `finish` sends without waiting. Dropping that message stands for the service not
    having got to it yet (a CI run read a file without its last step): the tracker's own wait
    must still leave every row on disk."""
    from wandb.sdk.lib.service import service_connection

    from seqrec.tracking import Tracker

    monkeypatch.setattr(service_connection.ServiceConnection, "inform_finish", lambda self, run_id: None)
    config = load_config(REPO / "configs" / "tiny.yaml", [f"run_dir={tmp_path}", "tracking.wandb=offline"])
    tracker = Tracker(config, tmp_path, is_main=True, resumed=False)
    tracker.reset_history(None)
    for step in range(1, 5):
        tracker.log({"step": step, "loss": 1.0 / step})
    if ending == "finish":
        tracker.finish({"test": {"NDCG@10": 0.5}}, {"seqrec": {"NDCG@10": 0.5}})
    else:
        tracker.stopped(4)
    run_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    logged = [row for row in read_offline_history(run_files[0]) if "final_metrics/_type" not in row]
    assert [row.get("step") for row in logged] == [1, 2, 3, 4]


def test_wandb_mode_is_online_only_when_logged_in(tmp_path):
    assert wandb_mode("disabled", {}) == "disabled"
    assert wandb_mode("auto", {}, netrc_path=tmp_path / "none") == "offline"
    assert wandb_mode("auto", {"WANDB_API_KEY": "x" * 40}) == "online"
    assert wandb_mode("auto", {"WANDB_MODE": "disabled", "WANDB_API_KEY": "x"}) == "disabled"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_mode("auto", {}, netrc_path=netrc) == "online"


def test_export_loads_with_plain_hf_and_recommends_with_titles(trained_run, tmp_path, cli):
    out = tmp_path / "export"
    result = cli("export", trained_run.run_dir, out)
    assert result.code == 0, result.err
    for name in ("config.json", "model.safetensors", "tokenizer.json", "items.tsv", "seqrec_items.json"):
        assert (out / name).is_file(), name
    assert AutoModelForMaskedLM.from_pretrained(out).config.vocab_size > 5

    history = "sku-1 sku-2 sku-3"
    result = cli("recommend", "--model", out, "--history", history, "-k", "5")
    assert result.code == 0, result.err
    lines = result.out.splitlines()[1:]
    assert len(lines) == 5 and all("Product SKU-" in line for line in lines)
    recommended = [line.split()[1] for line in lines]
    assert not set(recommended) & set(history.split())

    result = cli("recommend", "--model", out, "--history", "sku-1 nope-9 sku-2 zzz", "-k", "5")
    assert result.code == 2 and "unknown item ids ['nope-9', 'zzz']" in result.err
    assert cli("recommend", "--model", out, "--history", "sku-1 nope-9", "-k", "3", "--skip-unknown").code == 0


def test_recommend_file_input_writes_jsonl(trained_run, tmp_path, cli):
    model_dir = trained_run.run_dir / "model"
    histories = tmp_path / "histories.txt"
    histories.write_text("sku-1 sku-2\nsku-5\nunknown-1\n")
    output = tmp_path / "recs.jsonl"
    result = cli("recommend", "--model", model_dir, "--input", histories, "-k", "4", "--output", output, "--skip-unknown")
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["line"] for row in rows] == [1, 2, 3]
    assert len(rows[0]["recommendations"]) == 4 and rows[0]["recommendations"][0]["title"].startswith("Product")
    assert rows[2]["recommendations"] == [] and rows[2]["error"] == "no known item ids"
    # Without --output the same lines go to stdout, written batch by batch. One row at a time,
    # BLAS may take another kernel (an AMX Xeon's fp32 scores moved in the 7th digit), so the
    # scores are compared as numbers.
    streamed = cli("recommend", "--model", model_dir, "--input", histories, "-k", "4", "--skip-unknown", "--batch-size", "1")
    assert streamed.code == 0
    one_by_one = [json.loads(line) for line in streamed.out.splitlines()]
    assert [{**row, "recommendations": [{**rec, "score": pytest.approx(rec["score"], abs=1e-5)} for rec in row["recommendations"]]}
            for row in rows] == one_by_one
    assert cli("recommend", "--model", model_dir, "--input", histories, "-k", "4").code == 2


def _best_training_model(trained_run, dataset):
    """The run's best weights in the training model (not the export), with its config and data."""
    from safetensors.torch import load_file

    from seqrec.data.prepared import PreparedDataset
    from seqrec.model import build_model

    config = load_config(trained_run.run_dir / "config.yaml")
    data = PreparedDataset.open(dataset)
    model, _ = build_model(config.model, data.num_items, config.data.max_len)
    model.load_state_dict(load_file(str(trained_run.run_dir / "best_weights.safetensors")))
    return model.eval(), config, data


def test_recommend_scores_equal_the_training_models(trained_run, titled_dataset):
    from seqrec.evaluate import model_scorer
    from seqrec.model import MASK_ITEM

    model, _, _ = _best_training_model(trained_run, titled_dataset)
    history = [3, 9, 4]
    expected = model_scorer(model, None)(torch.tensor([history + [MASK_ITEM]]))[0]
    recommender = Recommender(trained_run.run_dir / "model")
    recs = recommender.recommend([history], k=5, exclude_history=False)[0]
    top = torch.topk(expected, 5)
    assert [rec.item for rec in recs] == [recommender.original_ids[i] for i in top.indices.tolist()]
    assert [rec.score for rec in recs] == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluate_on_the_export_reproduces_the_training_models_metrics(trained_run, titled_dataset, tmp_path, cli, split):
    """The plain HF directory users deploy ranks as the training model does, in the same precision."""
    from seqrec.evaluate import evaluate_model

    out = tmp_path / "export"
    assert cli("export", trained_run.run_dir, out).code == 0
    report = tmp_path / "report.json"
    result = cli("evaluate", "--model", out, "--dataset", titled_dataset, "--split", split, "--output", report)
    assert result.code == 0, result.err
    assert "seqrec" in result.out and "popularity" in result.out
    written = json.loads(report.read_text())

    model, config, data = _best_training_model(trained_run, titled_dataset)
    expected = evaluate_model(model, data.eval_set(split), 64, config.data.max_len, config.eval.ks, True, torch.device("cpu"))
    assert written["metrics"] == pytest.approx(expected, abs=1e-12)
    trained = json.loads((trained_run.run_dir / "metrics.json").read_text())
    assert written["popularity"] == pytest.approx(trained["popularity"][split], abs=1e-12)


def test_evaluate_refuses_another_catalogue_and_bad_options(trained_run, tiny_dataset, titled_dataset, cli):
    model = trained_run.run_dir / "model"
    result = cli("evaluate", "--model", model, "--dataset", tiny_dataset)
    assert result.code == 2 and "not the item catalogue" in result.err
    result = cli("evaluate", "--model", model, "--dataset", titled_dataset, "--ks", "10,x")
    assert result.code == 2 and "--ks" in result.err


def test_export_from_a_checkpoint_loads_with_plain_hf(trained_run, tmp_path, cli):
    result = cli("export", trained_run.run_dir, tmp_path / "from-checkpoint", "--checkpoint", "auto")
    assert result.code == 0, result.err
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "from-checkpoint")
    assert (tmp_path / "from-checkpoint" / "items.tsv").is_file()
    assert exported.get_input_embeddings().weight.shape[0] > 100
    assert cli("export", trained_run.run_dir, tmp_path / "from-checkpoint", "--checkpoint", "auto").code == 2  # exists, no --force


def test_export_errors_name_the_problem(tmp_path, cli):
    result = cli("export", tmp_path / "missing-run", tmp_path / "out")
    assert result.code == 2 and "no such run directory" in result.err
    (tmp_path / "run").mkdir()
    result = cli("export", tmp_path / "run", tmp_path / "out")
    assert result.code == 2 and "no final model" in result.err
    result = cli("recommend", "--model", tmp_path / "run", "--history", "1")
    assert result.code == 2 and "not a seqrec model" in result.err
    assert not (tmp_path / "out").exists()
