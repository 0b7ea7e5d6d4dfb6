"""The quality benchmark's recipes are valid configs, `--set` overrides win over them, and runs
side by side keep every row."""

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from seqrec.config import load_config
from tests.conftest import REPO, bench_module


@pytest.fixture(scope="module")
def quality():
    return bench_module("quality")


def recipe_config(quality, recipe, overrides=(), label=None):
    common = ["train.batch_size=512", "optim.weight_decay=0.5"]
    return load_config(REPO / "configs" / "demo.yaml", quality.recipe_overrides(recipe, 2, common, list(overrides), "beauty", label))


def test_every_recipe_is_a_valid_config(quality):
    assert set(quality.recipes(2)) == {"default", "scratch", "causal", "default-text", "sasrec"}
    for recipe in quality.recipes(2):
        config = recipe_config(quality, recipe)
        assert (config.model.attention == "causal") == (recipe in ("causal", "sasrec"))


def test_sasrec_recipe_is_the_published_shape(quality):
    config = recipe_config(quality, "sasrec")
    assert config.model.pretrained is None
    scratch = config.model.scratch
    assert (scratch.hidden_size, scratch.num_hidden_layers, scratch.num_attention_heads) == (64, 2, 1)
    assert (config.model.dropout, config.optim.weight_decay, config.train.batch_size) == (0.1, 0.0, 128)
    assert config.loss.prefix_prob == 0.0 and not config.loss.exclude_row_items


def test_overrides_apply_after_the_recipe(quality):
    config = recipe_config(quality, "sasrec", ["optim.weight_decay=1.0", "model.scratch.hidden_size=128"])
    assert config.optim.weight_decay == 1.0 and config.model.scratch.hidden_size == 128
    assert recipe_config(quality, "default", ["model.weights=random"]).model.weights == "random"
    assert recipe_config(quality, "default").optim.weight_decay == 0.5
    assert recipe_config(quality, "default").name == "quality-beauty-default"


def test_labelled_runs_of_one_recipe_get_their_own_run_directory(quality):
    assert recipe_config(quality, "default", label="gpu-6-layers").run_path != recipe_config(quality, "default").run_path
    assert recipe_config(quality, "default", label="gpu-6-layers").name == "quality-beauty-default-gpu-6-layers"


def _write_rows(quality, worker: int, rows_each: int) -> None:
    for index in range(rows_each):
        row = {"recipe": f"default (worker-{worker}-row-{index})", "test": {"HR@10": 0.1, "NDCG@10": 0.05},
               "valid": {"NDCG@10": 0.06}, "epochs": 1, "train_seconds": 1.0}
        quality._write("side-by-side", [row], {"SASRec+ (full CE)": (0.5, 0.3)}, None)


def test_runs_side_by_side_keep_every_row(quality, tmp_path, monkeypatch):
    """Each writer reads the rows, then writes them back with its own: without the lock, writers
    that read together drop each other's rows. The slow machine() widens that window."""
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    monkeypatch.setattr(quality, "machine", lambda: time.sleep(0.05) or "test machine")
    monkeypatch.setattr(quality, "versions", lambda: {})
    workers, rows_each = 4, 3
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_write_rows, args=(quality, worker, rows_each)) for worker in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    rows = json.loads((tmp_path / "quality_side-by-side.json").read_text())["results"]
    assert sorted(row["recipe"] for row in rows) == sorted(f"default (worker-{w}-row-{i})" for w in range(workers) for i in range(rows_each))
    table = (tmp_path / "quality_side-by-side.md").read_text().splitlines()
    assert sum(line.startswith("| default (worker-") for line in table) == workers * rows_each
    assert sorted(path.name for path in tmp_path.iterdir()) == ["quality_side-by-side.json", "quality_side-by-side.md"]


def _without_paths(config) -> dict:
    settings = config.to_dict()
    for key in ("name", "run_dir"):
        settings.pop(key)
    settings["data"].pop("dataset")
    return settings


@pytest.mark.parametrize("config_file, command", [
    ("beauty.yaml", "--dataset beauty --epochs 40 --recipes default --set train.patience=8 --set train.eval_every=2"),
    ("ml-1m.yaml", "--dataset ml-1m --epochs 30 --recipes default --set model.compile=true --set train.eval_every=2 --set train.patience=10"),
])
def test_a_dataset_config_is_the_benchmarks_measured_recipe(quality, config_file, command):
    """configs/<dataset>.yaml hands users the recipe behind the benchmark's figure for that
    dataset: both must train the same job, or the figures its comment quotes are not its own."""
    args = quality.parse_args(command.split())
    overrides = quality.recipe_overrides("default", args.keep_layers, quality.common_overrides(Path("shards") / args.dataset, args),
                                         args.overrides, args.dataset)
    measured = load_config(REPO / "configs" / "demo.yaml", overrides)
    shipped = load_config(REPO / "configs" / config_file)
    assert _without_paths(shipped) == _without_paths(measured)
    assert shipped.data.dataset == f"shards/{args.dataset}" and shipped.name == args.dataset


def test_the_benchmark_refuses_an_unknown_recipe_before_preparing_data(quality, capsys):
    with pytest.raises(SystemExit) as exited:
        quality.parse_args(["--dataset", "beauty", "--recipes", "default", "bert4rec"])
    assert exited.value.code == 2 and "unknown recipe(s) ['bert4rec']" in capsys.readouterr().err
