"""`seqrec export`: a run (its best model, or any DeepSpeed checkpoint) as a standard HF directory.

The output loads with plain `AutoModelForMaskedLM.from_pretrained(OUT_DIR)`: config, safetensors
weights, the tokenizer with one token per item, plus `seqrec_items.json` (token layout) and
`items.tsv` (item id, original id, title) for `seqrec recommend`.

From a checkpoint, ZeRO-0/1/2 files hold the full fp32 module; ZeRO-3 partitions are merged by
DeepSpeed's zero_to_fp32. Those optimiser files are pickles: export only checkpoints you wrote.
A checkpoint holds the trained weights; with train.ema_decay the run's model is their average,
which its checkpoints carry only per rank for resuming, so a checkpoint exports the former.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import yaml

from seqrec import checkpoint
from seqrec.atomic import atomic_directory
from seqrec.config import load_config
from seqrec.data.prepared import ITEMS_FILE, PreparedDataset
from seqrec.errors import SeqrecError
from seqrec.hf_files import RUN_MODEL_DIR
from seqrec.model import build_model

log = logging.getLogger(__name__)

_OBJECTIVE_PREFIX = "model."  # the engine wraps SeqRecModel in the training objective


def export(run_dir: Path, out: Path, from_checkpoint: str | None = None, force: bool = False) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SeqrecError(f"{run_dir}: no such run directory")
    if out.exists() and not force:
        raise SeqrecError(f"{out}: exists; pass --force to replace it")
    if from_checkpoint is None:
        source = run_dir / RUN_MODEL_DIR
        if not (source / "config.json").is_file():
            raise SeqrecError(f"{run_dir}: no final model (the run has not finished); export a checkpoint with --checkpoint auto")
        with atomic_directory(out, replace=force) as staging:
            for path in source.iterdir():
                shutil.copy2(path, staging / path.name)
            _ensure_items(staging, run_dir)
        return out
    directory = checkpoint.resolve_resume(from_checkpoint, run_dir / "checkpoints")
    if directory is None:
        raise SeqrecError(f"{run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
    config = load_config(run_dir / "config.yaml")
    data = PreparedDataset.open(config.data.dataset)
    original_ids, titles = data.items()
    model, _ = build_model(config.model, data.num_items, config.data.max_len, titles, original_ids=original_ids)
    state = _checkpoint_state(directory)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids") and "decoder" not in key]
    if missing or unexpected:
        raise SeqrecError(f"{directory}: does not match the run's model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    with atomic_directory(out, replace=force) as staging:
        model.save_pretrained(staging, max_len=config.data.max_len)
        shutil.copy2(data.root / ITEMS_FILE, staging / ITEMS_FILE)
    log.info("exported %s (step %s) to %s", directory, directory.name.removeprefix("step_").lstrip("0"), out)
    if config.train.ema_decay is not None:
        log.warning("%s: the run averaged its weights (train.ema_decay=%s); this export holds the checkpoint's trained "
                    "weights, not the average the run validates and keeps in %s", directory, config.train.ema_decay, run_dir / RUN_MODEL_DIR)
    return out


def _checkpoint_state(directory: Path) -> dict[str, torch.Tensor]:
    full_module = directory / "mp_rank_00_model_states.pt"
    if full_module.is_file():
        module = torch.load(full_module, map_location="cpu", weights_only=True)["module"]
        if all(value.dtype == torch.float32 for value in module.values() if value.is_floating_point()):
            return _strip(module)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return _strip(get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name))


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key.removeprefix(_OBJECTIVE_PREFIX): value.float() if value.is_floating_point() else value for key, value in state.items()}


def _ensure_items(staging: Path, run_dir: Path) -> None:
    if (staging / ITEMS_FILE).is_file():
        return
    dataset = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["dataset"]
    shutil.copy2(Path(dataset) / ITEMS_FILE, staging / ITEMS_FILE)
