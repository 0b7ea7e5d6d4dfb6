"""Warm start: a model initialised from an earlier `seqrec export`, to retrain on a newer log.

The export supplies the architecture and every trained weight: encoder, positions, head and the
word-piece tokenizer. Items are matched by their original id (the `items.tsv` of the export and
of the new dataset), because a newly prepared dataset numbers its items afresh:
- an item both catalogues hold keeps its trained row and output bias, whatever its new number;
- a new item starts as `model.item_init` says, relative to the trained rows: `mean`, the mean of
  the export's item rows plus Gaussian noise (`model.item_init_noise`; null: the rows' own mean
  per-dimension spread), or `random`, BERT's initializer. Its bias is the export's mean item bias:
  trained biases carry popularity (the long tail's are low), so a bias of 0 would rank every new
  item above most trained ones;
- an item only the export holds is dropped.
The settings that decide what the weights mean (attention, objective, head, query, positions)
must be the export's: a mismatch stops the job at start, naming the field.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM

from seqrec.config import ModelConfig
from seqrec.data.prepared import ITEMS_FILE
from seqrec.errors import ConfigError, SeqrecError
from seqrec.hf_files import open_model_directory, quiet_transformers, read_model_items

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ExportedItems:
    """The trained item rows of an export, by original id."""

    directory: Path
    original_ids: list[str]
    rows: torch.Tensor  # [items, hidden]
    bias: torch.Tensor  # [items]


def load_export(config: ModelConfig, overrides: dict) -> tuple[BertForMaskedLM, object, ExportedItems]:
    """The export's BERT and word-piece tokenizer with the item tokens taken out (so the caller
    adds the new dataset's items as it adds them to a base BERT), and the item rows taken out."""
    directory = Path(config.warm_start)
    if not directory.is_dir():
        raise ConfigError(f"model.warm_start: {directory}: no such directory (a `seqrec export` output or a finished run)")
    try:
        directory, meta = open_model_directory(directory)
        num_items, first_item_token = int(meta["num_items"]), int(meta["first_item_token"])
        original_ids, _ = read_model_items(directory, num_items)
    except SeqrecError as exc:
        raise ConfigError(f"model.warm_start: {exc}") from exc
    _check_settings(config, meta, directory)
    with quiet_transformers():
        tokenizer = _base_tokenizer(directory, first_item_token)
        mlm = AutoModelForMaskedLM.from_pretrained(directory, use_safetensors=True, **overrides)
    if not isinstance(mlm, BertForMaskedLM):
        raise ConfigError(f"model.warm_start: {directory} is a {type(mlm).__name__}, seqrec needs a BERT")
    table = mlm.get_input_embeddings().weight
    if table.shape[0] != first_item_token + num_items:
        raise ConfigError(f"model.warm_start: {directory}: {table.shape[0]} token rows, its {ITEMS_FILE} and "
                          f"seqrec_items.json say {first_item_token} + {num_items}")
    items = slice(first_item_token, first_item_token + num_items)
    exported = ExportedItems(directory, original_ids, table[items].detach().float().clone(),
                             mlm.cls.predictions.bias[items].detach().float().clone())
    mlm.resize_token_embeddings(first_item_token, mean_resizing=False)
    return mlm, tokenizer, exported


def carry_items(table: torch.Tensor, bias: torch.Tensor, exported: ExportedItems, original_ids: list[str] | None,
                config: ModelConfig, initializer_range: float) -> dict:
    """Fill the item rows `table` [N, hidden] and `bias` [N] of the new catalogue (original ids
    of items 1..N) from the export; returns the report of which rule each item got."""
    if original_ids is None or len(original_ids) != table.shape[0]:
        raise SeqrecError(f"model.warm_start needs the original id of each of the {table.shape[0]} items")
    index = {original: row for row, original in enumerate(exported.original_ids)}
    source = torch.tensor([index.get(original, -1) for original in original_ids], dtype=torch.long)
    carried = source >= 0
    if not bool(carried.any()):
        raise ConfigError(
            f"model.warm_start: no item of the dataset is in {exported.directory / ITEMS_FILE} (e.g. dataset {original_ids[0]!r}, "
            f"export {exported.original_ids[0]!r}): the two logs use different item ids"
        )
    n, hidden = table.shape
    generator = torch.Generator().manual_seed(0)
    draws = torch.randn(n, hidden, generator=generator)
    noise_std = None
    if config.item_init == "random":
        new = draws * initializer_range
    else:
        noise_std = float(exported.rows.std(dim=0).mean()) if config.item_init_noise is None else config.item_init_noise
        new = exported.rows.mean(dim=0, keepdim=True) + draws * noise_std
    new[carried] = exported.rows[source[carried]]
    new_bias = torch.full((n,), float(exported.bias.mean()))
    new_bias[carried] = exported.bias[source[carried]]
    with torch.no_grad():
        table.copy_(new.to(table.dtype))
        bias.copy_(new_bias.to(bias.dtype))
    dropped = len(exported.original_ids) - int(carried.sum())
    counts = {"carried": int(carried.sum()), config.item_init: int((~carried).sum())}
    report = {
        "requested": config.item_init,
        "warm_start": str(exported.directory),
        "noise_std": noise_std,
        "counts": counts,
        "dropped": dropped,
        "items_by_rule": {rule: (torch.nonzero(chosen).flatten() + 1).tolist()
                          for rule, chosen in (("carried", carried), (config.item_init, ~carried)) if bool(chosen.any())},
    }
    log.info("warm start from %s: %d items carried over, %d new (%s), %d of the export's dropped",
             exported.directory, counts["carried"], n - counts["carried"], config.item_init, dropped)
    return report


def _check_settings(config: ModelConfig, meta: dict, directory: Path) -> None:
    exported = {"model.attention": meta["attention"], "model.item_head": meta["head"], "model.positions": meta["positions"]}
    wanted = {"model.attention": config.attention, "model.item_head": config.item_head, "model.positions": config.positions}
    query = meta["query"]
    next_item = config.attention == "causal" and config.causal_objective == "next_item"
    if exported["model.attention"] == "causal" and config.attention == "causal":
        exported["model.causal_objective"] = "next_item" if query == "last_item" else "masked"
        wanted["model.causal_objective"] = config.causal_objective
    if query != "last_item" and not next_item:
        exported["model.query"], wanted["model.query"] = query, config.query
    for name, value in exported.items():
        if wanted[name] != value:
            raise ConfigError(f"{name}: {directory} was trained with {value}, got {wanted[name]}; model.warm_start needs the export's setting")


def _base_tokenizer(directory: Path, first_item_token: int):
    """The export's tokenizer without its item tokens: the same normalisation and word pieces,
    so the new catalogue's tokens are added as they were to the base BERT."""
    missing = [name for name in _TOKENIZER_FILES if not (directory / name).is_file()]
    if missing:
        raise ConfigError(f"model.warm_start: {directory}: no {', '.join(missing)}")
    try:
        fast = json.loads((directory / "tokenizer.json").read_text())
        settings = json.loads((directory / "tokenizer_config.json").read_text())
        fast["added_tokens"] = [token for token in fast["added_tokens"] if token["id"] < first_item_token]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"model.warm_start: {directory}: unreadable tokenizer files ({exc})") from exc
    if "added_tokens_decoder" in settings:
        settings["added_tokens_decoder"] = {key: value for key, value in settings["added_tokens_decoder"].items()
                                            if int(key) < first_item_token}
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "tokenizer.json").write_text(json.dumps(fast))
        (Path(scratch) / "tokenizer_config.json").write_text(json.dumps(settings))
        tokenizer = AutoTokenizer.from_pretrained(scratch)
    if len(tokenizer) != first_item_token:
        raise ConfigError(f"model.warm_start: {directory}: its tokenizer holds {len(tokenizer)} tokens before the items, "
                          f"seqrec_items.json says the items start at {first_item_token}")
    return tokenizer
