"""Resumable DeepSpeed checkpoints: complete-or-invisible, the last K kept.

Layout under <run_dir>/checkpoints/:
    step_00000120/            DeepSpeed's files (model, optimiser, scheduler: every rank's part)
        trainer_state.json    loop position (step, epoch, batches consumed, early-stopping state)
        rng_rank<r>.pt        that rank's masking generator and torch RNG states
        average_rank<r>.pt    that rank's weight average (train.ema_decay), when there is one
        COMPLETE              written last, by rank 0, after every rank finished writing
    universal-step_00000120/  only while a resume under another ZeRO layout or number of
                              processes loads it (seqrec/universal.py)
A directory without COMPLETE (a save cut short by a kill) is never resumed from, and is removed
by the next successful save. Assumes the run directory is on a filesystem every rank sees.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch

from seqrec import distributed
from seqrec.atomic import atomic_file
from seqrec.errors import ConfigError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if _TAG.match(path.name) and (path / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda path: int(_TAG.match(path.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(spec: str | None, root: Path) -> Path | None:
    """`auto`: the newest complete checkpoint if any; a path: that checkpoint (must be complete)."""
    if spec in (None, "never"):
        return None
    if spec == "auto":
        return latest_checkpoint(root)
    path = Path(spec)
    if not (path / COMPLETE_MARKER).is_file():
        raise ConfigError(f"--resume: {path} is not a complete seqrec checkpoint (no {COMPLETE_MARKER} marker)")
    return path


def average_file(directory: Path, rank: int) -> Path:
    return directory / f"average_rank{rank}.pt"


def save(engine, root: Path, step: int, trainer_state: dict, rng_state: dict[str, torch.Tensor], keep: int,
         averages: dict[str, torch.Tensor] | None = None) -> Path:
    """Collective: every rank writes its part; rank 0 marks it complete, then prunes."""
    tag = tag_for(step)
    directory = root / tag
    rank = torch.distributed.get_rank()
    if rank == 0:
        if directory.exists():  # an incomplete earlier attempt at this very step
            shutil.rmtree(directory)
        root.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(rng_state, directory / f"rng_rank{rank}.pt")
    if averages is not None:
        torch.save(averages, average_file(directory, rank))
    distributed.barrier()
    if rank == 0:
        with atomic_file(directory / TRAINER_STATE) as handle:
            handle.write(json.dumps(trainer_state, indent=2) + "\n")
        with atomic_file(directory / COMPLETE_MARKER) as handle:
            handle.write(f"{step}\n")
        _prune(root, keep, directory)
        log.info("checkpoint %s saved (keeping the last %d)", directory, keep)
    distributed.barrier()
    return directory


def read_trainer_state(directory: Path) -> dict:
    """The loop position a checkpoint holds (read before anything is loaded, to check it fits)."""
    return json.loads((directory / TRAINER_STATE).read_text())


def load(engine, directory: Path) -> None:
    """Restore model, optimiser and scheduler with DeepSpeed's own loader: into the ZeRO layout and
    number of processes that wrote them (ZeRO-0: any number). Other layouts: seqrec/universal.py."""
    path, _ = engine.load_checkpoint(str(directory.parent), tag=directory.name, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise ConfigError(f"--resume: DeepSpeed could not load {directory}")


def rank_state(directory: Path, rank: int) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """The RNG states and the weight average that rank `rank` of the writing run saved (None where
    it saved none)."""
    rng_file = directory / f"rng_rank{rank}.pt"
    saved_average = average_file(directory, rank)
    rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    averages = torch.load(saved_average, weights_only=True) if saved_average.is_file() else None
    return rng, averages


def _prune(root: Path, keep: int, newest: Path) -> None:
    complete = complete_checkpoints(root)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for path in root.iterdir():
        match = _TAG.match(path.name)
        if match and path != newest and not (path / COMPLETE_MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)
