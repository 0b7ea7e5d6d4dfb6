"""Hugging Face model directories as seqrec reads and writes them: the items file recorded beside
an export's weights, and loading without transformers' load reports."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from transformers.utils import logging as hf_logging

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
    return meta


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
