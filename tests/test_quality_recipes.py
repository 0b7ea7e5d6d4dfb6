"""The quality benchmark's recipes are valid configs, and `--set` overrides win over them."""

import importlib.util
from pathlib import Path

import pytest

from seqrec.config import load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_config(quality, recipe, overrides=()):
    common = ["train.batch_size=512", "optim.weight_decay=0.5"]
    return load_config(REPO / "configs" / "demo.yaml", quality.recipe_overrides(recipe, 2, common, list(overrides), "beauty"))


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
    assert config.loss.prefix_prob == 0.0


def test_overrides_apply_after_the_recipe(quality):
    config = recipe_config(quality, "sasrec", ["optim.weight_decay=1.0", "model.scratch.hidden_size=128"])
    assert config.optim.weight_decay == 1.0 and config.model.scratch.hidden_size == 128
    assert recipe_config(quality, "default", ["model.weights=random"]).model.weights == "random"
    assert recipe_config(quality, "default").optim.weight_decay == 0.5
    assert recipe_config(quality, "default").name == "quality-beauty-default"
