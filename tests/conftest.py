"""Shared fixtures: the real-data rule, CLI runner, and a tiny prepared dataset."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import pytest

from seqrec.cli import main

REPO = Path(__file__).resolve().parent.parent


def bench_module(script: str) -> ModuleType:
    """A bench/ script loaded as a module (bench/ is not a package), for its helpers."""
    spec = importlib.util.spec_from_file_location(f"bench_{script}", REPO / "bench" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def data_dir() -> Path:
    return Path(os.environ.get("SEQREC_DATA_DIR", REPO.parent / "shared" / "data"))


def require_data(relative: str) -> Path:
    """A file of the shared real datasets: skip with the reason when absent, fail under SEQREC_REQUIRE_DATA=1."""
    path = data_dir() / relative
    if not path.exists():
        reason = f"real dataset {path} not found (set SEQREC_DATA_DIR to the shared data folder)"
        if os.environ.get("SEQREC_REQUIRE_DATA") == "1":
            pytest.fail(reason + "; SEQREC_REQUIRE_DATA=1 makes this a failure")
        pytest.skip(reason)
    return path


def logged_steps(run_dir: Path) -> list[int]:
    """The training steps in a run's metrics.jsonl, in order, read while its trainer may still be
    appending (a line being written is left out)."""
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row:
            steps.append(row["step"])
    return steps


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    def run(*args) -> CliResult:
        code = main([str(arg) for arg in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """The tiny synthetic preset, prepared into several shards."""
    root = tmp_path_factory.mktemp("tiny")
    assert main(["synth", "--preset", "tiny", "--out", str(root / "tiny.csv"), "--quiet"]) == 0
    assert main(["prepare", str(root / "tiny.csv"), "--out", str(root / "prepared"), "--shard-size", "37", "--quiet"]) == 0
    return root / "prepared"
