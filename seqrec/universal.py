"""Resuming a checkpoint under another ZeRO layout or another number of processes.

ZeRO-1/2 checkpoints hold the optimiser state in per-process flat partitions, ZeRO-3 ones the
weights too, so DeepSpeed loads them only into the layout and number of processes that wrote
them. DeepSpeed's universal format holds one whole tensor per parameter and state (fp32 weight,
Adam's two moments, step), which any layout can take its part of. Every layout converts into it
and loads from it:

    written ZeRO-1..3: DeepSpeed's converter (ds_to_universal)    written ZeRO-0: `_write_replicated`
    into ZeRO-1..3:    DeepSpeed's universal loading               into ZeRO-0:    `_load_replicated`

DeepSpeed's converter writes ZeRO-1/2 and ZeRO-3 checkpoints in two dialects, and each of its
loaders reads only its own; `_normalise` makes one folder that both read. The converted copy is
written next to the run's checkpoints and removed once every rank has loaded it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
import time
from pathlib import Path

import torch

from seqrec import distributed
from seqrec.errors import ConfigError
from seqrec.optim import ParameterGroup

log = logging.getLogger(__name__)

REPLICATED, FLAT, PARAMETERS = "ZeRO-0", "ZeRO-1/2", "ZeRO-3"
_ZERO = "zero"
_OPTIMIZER_STATE = "optimizer_state.pt"
_MODEL_STATES = "mp_rank_00_model_states.pt"
_PARTITIONED_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
_MOMENTS = ("exp_avg", "exp_avg_sq")


def written_layout(directory: Path) -> str:
    """The layout of a DeepSpeed checkpoint, from the files it holds."""
    if any(directory.glob("zero_pp_rank_*_model_states.pt")):
        return PARAMETERS
    if any(directory.glob("*zero_pp_rank_*_optim_states.pt")):
        return FLAT
    return REPLICATED


def layout_of(zero_stage: int, deepspeed_bf16: bool) -> str:
    """The layout a run writes. DeepSpeed's own bf16 optimiser partitions its fp32 master
    weights across processes even at stage 0."""
    if zero_stage == 3:
        return PARAMETERS
    return FLAT if zero_stage > 0 or deepspeed_bf16 else REPLICATED


def needed(written: str, written_world: int, target: str, world: int) -> bool:
    """Whether loading takes the universal route. A ZeRO-0 checkpoint is one full copy that
    DeepSpeed loads into ZeRO-0 on any number of processes; every other pair loads natively only
    into the same layout and number of processes."""
    if written == target == REPLICATED:
        return False
    return written != target or written_world != world


def resume(engine, directory: Path, written: str, target: str, groups: list[ParameterGroup], scratch: Path) -> None:
    """Collective: rank 0 converts `directory` into `scratch`, every rank loads its part of the
    weights, optimiser state and schedule, and rank 0 removes `scratch` again."""
    main = torch.distributed.get_rank() == 0
    failure = None
    if main:
        log.info("converting %s (%s) to DeepSpeed's universal format for this run's %s layout", directory, written, target)
        started = time.perf_counter()
        try:
            convert(directory, written, groups, scratch)
            log.info("converted in %.1f s", time.perf_counter() - started)
        except ConfigError as exc:
            failure = str(exc)
        except Exception as exc:  # unreadable files, a full disk: still every rank's error
            failure = f"--resume: could not convert {directory} to DeepSpeed's universal format in {scratch}: {exc}"
    # Every rank raises the conversion's error, instead of waiting for a load that never comes.
    failure = distributed.broadcast_object(failure)
    if failure is not None:
        raise ConfigError(failure)
    try:
        saved_groups = _saved_groups(scratch, engine)
        if target == REPLICATED:
            _load_replicated(engine, scratch, groups, saved_groups)
        else:
            _load_partitioned(engine, scratch, saved_groups)
        distributed.barrier()
    finally:
        if main:
            shutil.rmtree(scratch, ignore_errors=True)


def convert(directory: Path, written: str, groups: list[ParameterGroup], out: Path) -> None:
    """Write the universal form of `directory` to `out`, complete or not at all."""
    # Built inside a staging folder: DeepSpeed's converter also writes a `latest_universal`
    # file beside its output, which would otherwise land among the run's checkpoints.
    staging = out.with_name(out.name + ".partial")
    for stale in (out, staging):
        shutil.rmtree(stale, ignore_errors=True)
    built = staging / "universal"
    try:
        if written == REPLICATED:
            _write_replicated(directory, groups, built)
        else:
            _convert_partitioned(directory, built)
        _normalise(built, written)
        built.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _convert_partitioned(directory: Path, out: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    # One worker: the converter's process pool would fork this trainer, threads and process
    # group included. seqrec's checkpoints carry no universal-format marker (the converter asks
    # for one only to know the client meant it), hence inject_missing_state.
    args = argparse.Namespace(
        input_folder=str(directory), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            ds_to_universal.main(args)
    except Exception as exc:
        raise ConfigError(f"--resume: DeepSpeed could not convert {directory} to its universal format: {exc}") from exc
    log.debug("ds_to_universal: %s", printed.getvalue())


def _write_replicated(directory: Path, groups: list[ParameterGroup], out: Path) -> None:
    """A ZeRO-0 checkpoint in the universal layout: its module state gives the weights, its
    optimiser state (torch's, indexed in parameter-group order) the moments and steps."""
    saved = torch.load(directory / _MODEL_STATES, map_location="cpu", weights_only=False)
    module, optimizer = saved["module"], saved.get("optimizer")
    names = [name for group in groups for name in group.names]
    if optimizer is None or sum(len(group["params"]) for group in optimizer["param_groups"]) != len(names):
        raise ConfigError(
            f"--resume: {directory} holds an optimiser state that does not match this model's {len(names)} trained "
            "parameters; resume with the model and optimiser settings that wrote it"
        )
    zero = out / _ZERO
    for index, name in enumerate(names):
        folder = zero / name
        folder.mkdir(parents=True)
        torch.save({"param": module[name].float()}, folder / "fp32.pt")
        state = optimizer["state"].get(index)
        if state:
            for key in _MOMENTS:
                torch.save({"param": state[key].float()}, folder / f"{key}.pt")
            torch.save(torch.tensor(float(state["step"])), folder / "step.pt")
    torch.save(
        {
            "param_groups": [{key: value for key, value in group.items() if key != "params"} for group in optimizer["param_groups"]],
            "ds_version": saved.get("ds_version", _deepspeed_version()),
        },
        zero / _OPTIMIZER_STATE,
    )
    shutil.copy2(directory / _MODEL_STATES, out / _MODEL_STATES)


def _normalise(out: Path, written: str) -> None:
    """One folder for both of DeepSpeed's universal loaders: ZeRO-1/2's reads a dict per tensor,
    a step file per parameter and the optimiser's groups at the top level; ZeRO-3's reads the
    step from a nested torch optimiser state; each looks for the model states under its own name.
    Only the ZeRO-3 converter writes bare tensors and no step files."""
    zero = out / _ZERO
    optimizer_state = torch.load(zero / _OPTIMIZER_STATE, map_location="cpu", weights_only=False)
    nested = optimizer_state.get("optimizer_state_dict")
    folders = [path for path in zero.iterdir() if path.is_dir()]
    if written == PARAMETERS:
        step = next(iter(nested["state"].values())).get("step") if isinstance(nested, dict) and nested.get("state") else None
        for folder in folders:
            for key in ("fp32", *_MOMENTS):
                file = folder / f"{key}.pt"
                if file.is_file():
                    torch.save({"param": torch.load(file, map_location="cpu", weights_only=False)}, file)
            if (folder / "exp_avg.pt").is_file() and step is not None:
                torch.save(torch.as_tensor(step, dtype=torch.float32), folder / "step.pt")
    else:
        step_file = next((folder / "step.pt" for folder in folders if (folder / "step.pt").is_file()), None)
        step = None if step_file is None else torch.load(step_file, weights_only=False)
    if step is None:
        raise ConfigError(f"--resume: {out} holds no optimiser step: the checkpoint was written before any step")
    groups = optimizer_state.get("param_groups") or nested["param_groups"]
    optimizer_state["param_groups"] = groups
    optimizer_state["optimizer_state_dict"] = {"state": {0: {"step": torch.as_tensor(step, dtype=torch.float32)}}, "param_groups": groups}
    # ZeRO-3's state has no version, which ZeRO-1's loader requires; the folder is in the format
    # of the DeepSpeed that converted it.
    optimizer_state.setdefault("ds_version", _deepspeed_version())
    torch.save(optimizer_state, zero / _OPTIMIZER_STATE)
    present = [out / name for name in (_MODEL_STATES, _PARTITIONED_MODEL_STATES) if (out / name).is_file()]
    for name in (_MODEL_STATES, _PARTITIONED_MODEL_STATES):
        if not (out / name).is_file():
            shutil.copy2(present[0], out / name)
    for extra in out.glob("zero_pp_rank_*_model_states.pt"):
        if extra.name != _PARTITIONED_MODEL_STATES:
            extra.unlink()


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def _saved_groups(folder: Path, engine) -> list[dict]:
    """Each saved parameter group's settings, checked to be as many as this run's groups."""
    saved = torch.load(folder / _ZERO / _OPTIMIZER_STATE, map_location="cpu", weights_only=False)["param_groups"]
    live = len(engine.optimizer.param_groups)
    if len(saved) != live:
        raise ConfigError(
            f"--resume: the checkpoint has {len(saved)} optimiser parameter groups, this run {live}: resume with the optimiser "
            "settings that wrote it (optim.pretrained_lr_scale, weight decays)"
        )
    return [{key: value for key, value in group.items() if key != "params"} for group in saved]


def _restore_group_settings(engine, saved_groups: list[dict]) -> None:
    """Each parameter group's own settings and step counter. DeepSpeed's ZeRO-3 loader copies the
    first group's settings to every group, which would decay biases and LayerNorm weights, and
    gives every group one shared step tensor, which the fused AdamW then advances once per group
    each step, so its bias correction runs ahead (seen: losses apart from the second step on).
    The loader also leaves each step on the CPU, where the fused (and capturable) kernels want it
    on their parameter's device, as torch's own `load_state_dict` puts it (seen on an H200: "state_steps
    is on cpu, different from other tensors on cuda:0" at the first step after resuming)."""
    for group, settings in zip(engine.optimizer.param_groups, saved_groups):
        group.update(settings)
    # Every state, not only those of the parameters in param_groups: ZeRO-3 swaps each sub-group's
    # partition into its group just for that sub-group's step.
    inner = engine.optimizer.optimizer
    kernel_reads_device = any(group.get("fused") or group.get("capturable") for group in inner.param_groups)
    for parameter, state in inner.state.items():
        if torch.is_tensor(state.get("step")):
            device = parameter.device if kernel_reads_device else torch.device("cpu")
            state["step"] = state["step"].to(device=device, dtype=torch.float32, copy=True)


def _load_partitioned(engine, folder: Path, saved_groups: list[dict]) -> None:
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = False
    if path is None:
        raise ConfigError(f"--resume: DeepSpeed could not load the universal form of the checkpoint at {folder}")
    _restore_group_settings(engine, saved_groups)


def _load_replicated(engine, folder: Path, groups: list[ParameterGroup], saved_groups: list[dict]) -> None:
    """Into a ZeRO-0 run, whose optimiser is torch's own: weights, then moments and steps by
    index in parameter-group order, then the schedule and DeepSpeed's step counters."""
    zero = folder / _ZERO
    state: dict[int, dict[str, torch.Tensor]] = {}
    indices: list[list[int]] = []
    index = 0
    with torch.no_grad():
        for group in groups:
            indices.append(list(range(index, index + len(group.parameters))))
            for name, parameter in zip(group.names, group.parameters):
                where = zero / name
                if not (where / "fp32.pt").is_file():
                    raise ConfigError(f"--resume: the checkpoint holds no weight for {name}: resume with the model that wrote it")
                weight = torch.load(where / "fp32.pt", map_location="cpu", weights_only=False)["param"]
                if weight.numel() != parameter.numel():
                    raise ConfigError(f"--resume: {name} has {weight.numel()} values in the checkpoint, {parameter.numel()} in this model")
                parameter.copy_(weight.view_as(parameter))
                if (where / "exp_avg.pt").is_file():
                    state[index] = {
                        key: torch.load(where / f"{key}.pt", map_location="cpu", weights_only=False)["param"].view_as(parameter)
                        for key in _MOMENTS
                    }
                    state[index]["step"] = torch.as_tensor(float(torch.load(where / "step.pt", weights_only=False)), dtype=torch.float32)
                index += 1
    engine.optimizer.load_state_dict({"state": state, "param_groups": [{**settings, "params": own} for settings, own in zip(saved_groups, indices)]})
    model_states = torch.load(folder / _MODEL_STATES, map_location="cpu", weights_only=False)
    engine.lr_scheduler.load_state_dict(model_states["lr_scheduler"])
    engine.global_steps = model_states.get("global_steps", engine.global_steps)
    engine.global_samples = model_states.get("global_samples", engine.global_samples)
    engine.skipped_steps = model_states.get("skipped_steps", engine.skipped_steps)

