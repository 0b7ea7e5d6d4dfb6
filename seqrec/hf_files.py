"""Hugging Face model directories as seqrec reads and writes them: the items file recorded beside
an export's weights, and loading without transformers' load reports."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from transformers.utils import logging as hf_logging

from seqrec.data.prepared import ITEMS_FILE, read_tsv
from seqrec.errors import SeqrecError

ITEMS_META_FILE = "seqrec_items.json"
RUN_MODEL_DIR = "model"  # a run's best model, a directory like an export's, under its run directory


def model_directory(path: Path) -> Path:
    """A seqrec model directory given as itself (an export, a run's model/) or as a finished run's
    directory, which keeps its best model in model/."""
    path = Path(path)
    if not (path / ITEMS_META_FILE).is_file() and (path / RUN_MODEL_DIR / ITEMS_META_FILE).is_file():
        return path / RUN_MODEL_DIR
    return path


def read_items_meta(model_dir: Path) -> dict:
    """The token layout and scoring settings `SeqRecModel.save_pretrained` recorded beside an export's weights."""
    path = Path(model_dir) / ITEMS_META_FILE
    if not path.is_file():
        raise SeqrecError(f"{model_dir}: not a seqrec model (no {ITEMS_META_FILE}); export one with `seqrec export`")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SeqrecError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(meta, dict) or not {"num_items", "first_item_token"} <= set(meta):
        raise SeqrecError(f"{path}: not a seqrec items file (needs num_items and first_item_token)")
    # Exports from before these settings were written: causal ones were all next-item models, and
    # every one scored through the MLM transform, with positions from the start.
    meta.setdefault("attention", "bidirectional")
    meta.setdefault("query", "last_item" if meta["attention"] == "causal" else "mask")
    meta.setdefault("head", "transform")
    meta.setdefault("positions", "from_start")
    return meta


def open_model_directory(path: Path) -> tuple[Path, dict]:
    """A seqrec model directory (see `model_directory`) and its items meta. Weights are loaded
    from safetensors only, so a directory without them is refused here."""
    directory = model_directory(path)
    meta = read_items_meta(directory)
    if not (directory / "model.safetensors").is_file():
        raise SeqrecError(f"{directory}: no model.safetensors; seqrec loads weights from safetensors only")
    return directory, meta


def read_model_items(model_dir: Path, num_items: int) -> tuple[list[str], list[str]]:
    """Original id and title of the model's items 1..N, from the items.tsv beside its weights."""
    path = Path(model_dir) / ITEMS_FILE
    if not path.is_file():
        raise SeqrecError(f"{path}: missing; export the model with `seqrec export`")
    rows = read_tsv(path, 3)
    if len(rows) != num_items:
        raise SeqrecError(f"{path}: {len(rows)} items, the model has {num_items}")
    return [row[1] for row in rows], [row[2] for row in rows]


@contextlib.contextmanager
def quiet_transformers():
    """transformers prints load reports and tie warnings for the (expected) fresh MLM head."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        hf_logging.enable_progress_bar()
