"""`seqrec evaluate` on an exported model: started as several ranks it splits the catalogue between
them and reports and writes exactly what one process does; `--predictions` holds every evaluated
user's top-K list in original ids, as `seqrec recommend` ranks them."""

from __future__ import annotations

import json

import pytest
import torch

from seqrec.cli import main, without_launcher_rank_flag
from seqrec.config import load_config
from seqrec.data.prepared import PreparedDataset
from seqrec.recommend import Recommender
from seqrec.sharded_eval import default_item_block, item_range
from seqrec.train import run
from tests.conftest import REPO
from tests.test_distributed import torchrun

TOP_K = 7


def _main(*args) -> int:
    return main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def wide_export(tmp_path_factory):
    """A model exported from a short run on a catalogue wide enough (600 items, 3 item blocks)
    that two ranks each own part of it."""
    root = tmp_path_factory.mktemp("wide")
    assert _main("synth", "--preset", "tiny", "--items", "600", "--users", "400", "--out", root / "log.csv", "--quiet") == 0
    assert _main("prepare", root / "log.csv", "--out", root / "prepared", "--shard-size", "100", "--quiet") == 0
    config = load_config(REPO / "configs" / "tiny.yaml", [
        f"data.dataset={root / 'prepared'}", f"run_dir={root / 'run'}", "train.max_steps=6", "tracking.wandb=disabled",
    ])
    run(config)
    assert _main("export", root / "run", root / "export", "--quiet") == 0
    return root / "export", root / "prepared"


def _evaluate_args(model, dataset, out, *extra):
    return ["evaluate", "--model", model, "--dataset", dataset, "--split", "test", "--output", out / "metrics.json",
            "--predictions", out / "predictions.jsonl", "--top-k", TOP_K, "--quiet", *extra]


@pytest.fixture(scope="module")
def one_and_two_ranks(wide_export, tmp_path_factory):
    model, dataset = wide_export
    one, two = tmp_path_factory.mktemp("one-rank"), tmp_path_factory.mktemp("two-ranks")
    # On the CPU wherever a GPU is present too: the GPU test compares against these, and two
    # ranks on a one-GPU machine have no device for the second.
    assert _main(*_evaluate_args(model, dataset, one, "--device", "cpu")) == 0
    result = torchrun(2, "-m", "seqrec", *_evaluate_args(model, dataset, two, "--device", "cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    return one, two, result


def test_the_catalogue_really_splits_across_two_ranks(wide_export):
    num_items = PreparedDataset.open(wide_export[1]).num_items
    block = default_item_block(num_items)
    first, second = item_range(num_items, 0, 2, block), item_range(num_items, 1, 2, block)
    assert first[1] - first[0] > 0 and second[1] - second[0] > 0 and second == (first[1], num_items)


def test_two_ranks_write_what_one_process_writes(one_and_two_ranks):
    one, two, result = one_and_two_ranks
    assert (two / "predictions.jsonl").read_bytes() == (one / "predictions.jsonl").read_bytes()
    metrics_one, metrics_two = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    assert metrics_two == metrics_one
    assert metrics_one["metrics"]["NDCG@10"] > 0
    # Only the main rank reports: one table, one line about the predictions.
    assert result.stdout.count("popularity") == 1 and "on 2 ranks" in result.stdout
    assert result.stdout.count(f"top-{TOP_K} lists") == 1


def test_predictions_are_each_users_top_k_in_original_ids(one_and_two_ranks, wide_export):
    one, _, _ = one_and_two_ranks
    model, dataset = wide_export
    data = PreparedDataset.open(dataset)
    test = data.eval_set("test")
    item_ids, _ = data.items()
    user_ids = data.user_ids()
    rows = [json.loads(line) for line in (one / "predictions.jsonl").read_text().splitlines()]
    assert [row["user"] for row in rows] == [user_ids[user] for user in test.users]
    assert [row["target"] for row in rows] == [item_ids[target - 1] for target in test.targets]
    histories = [{item_ids[item - 1] for item in test.history[test.offsets[row] : test.offsets[row + 1]]} for row in range(len(test))]
    hits = 0
    for row, history in zip(rows, histories):
        assert len(row["items"]) == len(row["scores"]) == TOP_K
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert not (set(row["items"]) & (history - {row["target"]})), "a history item was recommended"
        if row["rank"] <= TOP_K:
            hits += 1
            assert row["items"].index(row["target"]) + 1 <= row["rank"]
        else:
            assert row["target"] not in row["items"]
    assert 0 < hits < len(rows)

    # The lists are what `seqrec recommend` gives for the same histories (which leaves a repeated
    # target out with the rest of the history, so users whose target is new).
    recommender = Recommender(model)
    new_targets = [index for index in range(len(rows)) if rows[index]["target"] not in histories[index]]
    assert len(new_targets) >= 5
    for index in new_targets[:5]:
        history = test.history[test.offsets[index] : test.offsets[index + 1]].tolist()
        recommended = recommender.recommend([history], TOP_K)[0]
        assert [rec.item for rec in recommended] == rows[index]["items"]
        assert [rec.score for rec in recommended] == pytest.approx(rows[index]["scores"], abs=1e-4)


def test_evaluate_refuses_bad_top_k_and_devices(wide_export, cli, tmp_path):
    model, dataset = wide_export
    result = cli("evaluate", "--model", model, "--dataset", dataset, "--top-k", "0")
    assert result.code == 2 and "--top-k: must be >= 1" in result.err
    result = cli("evaluate", "--model", model, "--dataset", dataset, "--device", "gpu")
    assert result.code == 2 and "--device: must be auto, cpu, cuda or cuda:N, got 'gpu'" in result.err
    result = cli("recommend", "--model", model, "--history", "1", "--device", "tpu")
    assert result.code == 2 and "--device: must be auto, cpu, cuda or cuda:N" in result.err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_evaluate_on_cuda_ranks_as_on_the_cpu(wide_export, one_and_two_ranks, tmp_path):
    model, dataset = wide_export
    assert _main(*_evaluate_args(model, dataset, tmp_path, "--device", "cuda")) == 0
    on_cpu = [json.loads(line) for line in (one_and_two_ranks[0] / "predictions.jsonl").read_text().splitlines()]
    on_gpu = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    # fp32 GEMMs round differently on the GPU: near-ties may swap, nothing more.
    same_rank = sum(a["rank"] == b["rank"] for a, b in zip(on_cpu, on_gpu))
    assert same_rank >= 0.97 * len(on_cpu)
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["NDCG@10"] == pytest.approx(
        json.loads((one_and_two_ranks[0] / "metrics.json").read_text())["metrics"]["NDCG@10"], abs=0.01)


def test_the_deepspeed_launchers_rank_flag_is_dropped_wherever_it_stands(wide_export, cli, tmp_path):
    # `deepspeed --module seqrec evaluate ...` runs `python -m seqrec --local_rank=0 evaluate ...`.
    assert without_launcher_rank_flag(["--local_rank=3", "evaluate", "--local-rank=0", "--top-k", "5"]) == ["evaluate", "--top-k", "5"]
    model, dataset = wide_export
    result = cli("--local_rank=0", "evaluate", "--model", model, "--dataset", dataset, "--quiet")
    assert result.code == 0, result.err
    assert "popularity" in result.out


def test_evaluate_refuses_an_empty_split(wide_export, cli, tmp_path):
    """A dataset with the model's catalogue but no user of 3 or more interactions."""
    model, dataset = wide_export
    item_ids, _ = PreparedDataset.open(dataset).items()
    rows = [f"{user},{item_ids[user % len(item_ids)]},{time}" for user in range(len(item_ids)) for time in range(2)]
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    assert cli("prepare", tmp_path / "log.csv", "--out", tmp_path / "short").code == 0
    result = cli("evaluate", "--model", model, "--dataset", tmp_path / "short")
    assert result.code == 2 and "so the test split is empty" in result.err, result.err
