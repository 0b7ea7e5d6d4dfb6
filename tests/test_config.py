"""Job config: YAML + overrides into typed dataclasses, validated with field-naming errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqrec.config import JobConfig, load_config
from seqrec.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), JobConfig)


def test_overrides_are_typed_and_nested(tmp_path):
    config = load_config(CONFIGS / "tiny.yaml", ["train.epochs=7", "loss.mask_prob=0.2", "model.keep_layers=null", "optim.betas=[0.9, 0.95]", "optim.lr=3e-4"])
    assert config.train.epochs == 7
    assert config.optim.lr == 3e-4
    assert config.loss.mask_prob == 0.2
    assert config.model.keep_layers is None
    assert config.optim.betas == (0.9, 0.95)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.mask_prob=1.5", "loss.mask_prob: must be in (0, 1), got 1.5"),
        ("model.attention=sideways", "model.attention: must be one of bidirectional, causal, got 'sideways'"),
        ("train.epochs=many", "train.epochs: must be int, got 'many'"),
        ("optim.lr=fast", "optim.lr: must be float, got 'fast'"),
        ("model.attention_kernel=flash", "model.attention_kernel: must be one of auto, eager, sdpa, seqrec, got 'flash'"),
        ("model.linear_kernel=fused", "model.linear_kernel: must be one of auto, torch, token_major, got 'fused'"),
        ("model.activation_kernel=onednn", "model.activation_kernel: must be one of auto, torch, aten, got 'onednn'"),
        ("train.epoch=3", "train.epoch: unknown field"),
        ("eval.ks=[1, 5]", "eval.ks: must include 10"),
        ("train.precision=fp8", "train.precision: must be one of auto, bf16, fp16, fp32"),
        ("loss.prefix_prob=1.5", "loss.prefix_prob: must be in [0, 1]"),
        ("train.min_epochs=4", "train.min_epochs: must be in [0, train.epochs=3], got 4"),
        ("loss.label_smoothing=1.0", "loss.label_smoothing: must be in [0, 1)"),
        ("model.attention_dropout=1.0", "model.attention_dropout: must be in [0, 1) or null"),
        ("model.scratch.hidden_size=33", "model.scratch.hidden_size: must be a multiple of num_attention_heads"),
        ("epochs", "must look like section.field=value"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "tiny.yaml", [override])
    assert message in str(error.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_launcher_reports_config_errors_without_traceback(tmp_path):
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, str(CONFIGS.parent / "launcher" / "train.py"), "--config", str(CONFIGS / "tiny.yaml"), "--set", "loss.mask_prob=2"],
        capture_output=True, text=True,
    )
    assert run.returncode == 2
    assert "loss.mask_prob: must be in (0, 1)" in run.stderr and "Traceback" not in run.stderr


def test_readme_config_reference_names_every_field():
    """Every config field a user can set appears in the README's configuration reference."""
    import dataclasses
    import re

    readme = (CONFIGS.parent / "README.md").read_text()
    table = readme.split("### Configuration reference", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([a-z_]+(?:\.[a-z_*]+)*)`", table))

    def fields(instance, prefix=""):
        for item in dataclasses.fields(instance):
            value = getattr(instance, item.name)
            if dataclasses.is_dataclass(value) and prefix:
                yield f"{prefix}{item.name}.*"
            elif dataclasses.is_dataclass(value):
                yield from fields(value, f"{item.name}.")
            else:
                yield prefix + item.name

    missing = sorted(set(fields(JobConfig())) - documented)
    assert not missing, f"README configuration reference lacks {missing}"
