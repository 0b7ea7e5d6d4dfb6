"""The DeepSpeed engine under the training loop: config merging, ZeRO setup, consolidated weights.

The job config is the single source of truth for batch sizes, optimiser, schedule, clipping
and precision; the DeepSpeed JSON contributes what only DeepSpeed knows (ZeRO stage, buckets,
offload, communication). A JSON that states a batch size or optimiser must agree with the job
or the run stops with an error naming both values.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import record_function

from seqrec.config import JobConfig
from seqrec.errors import ConfigError
from seqrec.optim import build_scheduler, optimizer_over, parameter_groups

log = logging.getLogger(__name__)

PHASES = ("seqrec.forward", "seqrec.backward", "seqrec.clip_gradients", "seqrec.optimizer_step")

REPO_ROOT = Path(__file__).resolve().parent.parent
_OWNED_BY_JOB = {
    "optimizer": "optim.*",
    "scheduler": "optim.warmup_steps/schedule",
    "fp16": "train.precision",
    "amp": "train.precision",
}


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int
    accumulation: int
    world_size: int


def plan_batches(config: JobConfig, world_size: int) -> BatchPlan:
    train = config.train
    micro = train.micro_batch_size
    if micro is None:
        if train.batch_size % world_size:
            raise ConfigError(
                f"train.batch_size: {train.batch_size} is not divisible by the world size {world_size}; "
                "set train.micro_batch_size or a batch size that is a multiple of the number of processes"
            )
        micro = train.batch_size // world_size
    if train.batch_size % (micro * world_size):
        raise ConfigError(
            f"train.batch_size: {train.batch_size} must equal micro_batch_size ({micro}) x accumulation x world size "
            f"({world_size}); {train.batch_size} is not a multiple of {micro * world_size}"
        )
    return BatchPlan(train.batch_size, micro, train.batch_size // (micro * world_size), world_size)


def load_deepspeed_json(spec: str | None) -> tuple[dict, Path | None]:
    if spec is None:
        return {"zero_optimization": {"stage": 0}}, None
    path = Path(spec)
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if not path.is_file():
        raise ConfigError(f"distributed.deepspeed_config: {spec} not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be an object")
    return raw, path


def deepspeed_config(config: JobConfig, plan: BatchPlan, autocast: torch.dtype | None) -> dict:
    """The DeepSpeed config for this job: the JSON file merged with the job's own settings."""
    raw, path = load_deepspeed_json(config.distributed.deepspeed_config)
    where = path or "built-in DeepSpeed config"
    for key, owner in _OWNED_BY_JOB.items():
        if key in raw and raw[key] and (not isinstance(raw[key], dict) or raw[key].get("enabled", True)):
            raise ConfigError(f"{where}: '{key}' is set by the job config ({owner}); remove it from the DeepSpeed JSON")
    batches = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
    }
    for key, value in batches.items():
        if key in raw and raw[key] != "auto" and raw[key] != value:
            raise ConfigError(
                f"{where}: {key}={raw[key]} disagrees with the job config, which gives {value} "
                f"(train.batch_size={plan.global_batch}, micro {plan.micro_batch} x accumulation {plan.accumulation} "
                f"x world {plan.world_size}); set batch sizes in the job config only, or 'auto'"
            )
    merged = dict(raw)
    merged.update(batches)
    zero = dict(merged.get("zero_optimization") or {})
    if config.distributed.zero_stage is not None:
        zero["stage"] = config.distributed.zero_stage
    zero.setdefault("stage", 0)
    merged["zero_optimization"] = zero
    merged["gradient_clipping"] = 0.0 if job_clips_gradients(merged, autocast) else config.optim.grad_clip
    # The optimiser is the job's (fused torch AdamW); ZeRO partitions its state all the same.
    merged["zero_allow_untested_optimizer"] = True
    if autocast is not None and not deepspeed_bf16(raw):
        merged["torch_autocast"] = {"enabled": True, "dtype": "float16" if autocast == torch.float16 else "bfloat16"}
    merged.setdefault("steps_per_print", 10**9)
    merged.setdefault("wall_clock_breakdown", False)
    return merged


def deepspeed_bf16(ds_config: dict) -> bool:
    """Whether DeepSpeed's own bf16 mode is on (a "bf16" section in its JSON), not autocast."""
    return bool((ds_config.get("bf16") or {}).get("enabled"))


def job_clips_gradients(merged: dict, autocast: torch.dtype | None) -> bool:
    """Whether the job, not DeepSpeed, clips the gradients (`optim.grad_clip`).

    Under ZeRO-0 DeepSpeed clips a client optimiser's gradients one parameter at a time, a norm
    and a multiply per tensor, and reports no norm (the logged grad_norm was NaN). The job
    clips them instead with one fused foreach norm between DeepSpeed's backward (which has
    already all-reduced them at the accumulation boundary) and its step, and logs that norm.
    DeepSpeed keeps the clipping where its own optimiser holds the gradients: ZeRO 1-3 (flat
    partitions), its bf16 optimiser, fp16 (unscaled first), and unmanaged accumulation (where
    the all-reduce happens inside step())."""
    return (
        merged["zero_optimization"]["stage"] == 0
        and autocast != torch.float16
        and not deepspeed_bf16(merged)
        and merged.get("managed_gradient_accumulation", True) is not False
    )


class TrainingEngine:
    """DeepSpeed engine plus what the loop asks of it: step, learning rate, norm, weights."""

    def __init__(self, objective: torch.nn.Module, config: JobConfig, plan: BatchPlan, total_steps: int, autocast: torch.dtype | None):
        import deepspeed

        self.plan = plan
        self.ds_config = deepspeed_config(config, plan, autocast)
        self.zero_stage = int(self.ds_config["zero_optimization"]["stage"])
        self.deepspeed_bf16 = deepspeed_bf16(self.ds_config)
        if config.model.compile and self.zero_stage == 3:
            raise ConfigError("model.compile: not supported with ZeRO-3 (its hooks gather partitioned weights); use stage 0-2 or compile: false")
        model = objective.model
        if self.zero_stage == 3:
            for parameter in model.scoring_parameters():
                deepspeed.zero.register_external_parameter(model, parameter)
        # Named, so a checkpoint can be converted to another ZeRO layout (seqrec/universal.py).
        self.parameter_groups = parameter_groups(objective, config.optim, model.pretrained_parameters())
        optimizer = optimizer_over(self.parameter_groups, config.optim)
        scheduler = build_scheduler(optimizer, config.optim, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=objective, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
        )
        self.objective = self.engine.module
        self.job_grad_clip = config.optim.grad_clip if job_clips_gradients(self.ds_config, autocast) else None
        self.clipped_parameters = [parameter for parameter in self.objective.parameters() if parameter.requires_grad]
        self._job_grad_norm: torch.Tensor | None = None
        if plan.world_size == 1 and self.zero_stage == 0:
            # One process has nothing to reduce, yet DeepSpeed would still flatten every gradient
            # into buckets and copy it back: two passes over all weights per step.
            self.engine.enable_backward_allreduce = False

    @property
    def model(self):
        return self.engine.module.model

    # Each phase of a step is a named range in torch.profiler traces (PHASES), so a profile shows
    # which phase holds the host when a GPU step is launch-bound.
    def forward(self, items: torch.Tensor, draws: torch.Tensor):
        with record_function(PHASES[0]):
            return self.engine(items, draws)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        with record_function(PHASES[1]):
            self.engine.backward(loss)
        if self.job_grad_clip and self.engine.is_gradient_accumulation_boundary():
            with record_function(PHASES[2]):
                self._job_grad_norm = self._clip_gradients()
        try:
            with record_function(PHASES[3]):
                self.engine.step()
        finally:
            self.optimizer.__dict__.pop("grad_scale", None)

    def _clip_gradients(self) -> torch.Tensor:
        """Clip to `optim.grad_clip` by global norm; returns the norm before clipping. A fused
        optimiser that takes a gradient divisor (as AMP's scaler uses it) gets the clipping as
        that divisor, so the gradients are scaled inside its single pass over the weights
        instead of in a pass of their own (memory-bound on CPU, where the tied table makes
        the gradients ~130 MB)."""
        if not getattr(self.optimizer, "_step_supports_amp_scaling", False):
            return torch.nn.utils.clip_grad_norm_(self.clipped_parameters, self.job_grad_clip, foreach=True)
        gradients = [parameter.grad for parameter in self.clipped_parameters if parameter.grad is not None]
        norm = torch.nn.utils.get_total_norm(gradients, foreach=True)
        # clip_grad_norm_'s factor, max_norm / (norm + 1e-6) capped at 1, as a divisor.
        self.optimizer.grad_scale = torch.clamp((norm + 1e-6) / self.job_grad_clip, min=1.0)
        return norm

    @property
    def planned_steps(self) -> int:
        return self.scheduler.lr_lambdas[0].total_steps

    def replan(self, total_steps: int) -> None:
        """Move the end of the learning-rate decay (every rank must pass the same value)."""
        for schedule in self.scheduler.lr_lambdas:
            schedule.total_steps = total_steps

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    @property
    def grad_norm(self) -> float:
        """The last step's gradient norm before clipping (NaN where none was taken: clipping off)."""
        if self.job_grad_clip is not None:
            return float(self._job_grad_norm) if self._job_grad_norm is not None else float("nan")
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """fp32 CPU copy of every model weight on rank 0 (None elsewhere); all ranks must call it."""
        model = self.model
        rank = dist.get_rank()
        if self.zero_stage != 3:
            if rank != 0:
                return None
            return {key: value.detach().to("cpu", torch.float32, copy=True) for key, value in model.state_dict().items()}
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        state: dict[str, torch.Tensor] = {}
        for name, parameter in model.named_parameters():
            with GatheredParameters([parameter], modifier_rank=None):
                if rank == 0:
                    state[name] = parameter.detach().to("cpu", torch.float32, copy=True)
        persistent = set(model.state_dict().keys())
        for name, buffer in model.named_buffers():
            if rank == 0 and name in persistent:
                state[name] = buffer.detach().to("cpu", copy=True)
        return state if rank == 0 else None

    def load_full_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        """Put rank 0's full weights into the model on every rank (collective)."""
        model = self.model
        rank = dist.get_rank()
        if self.zero_stage == 3:
            from deepspeed.runtime.zero.partition_parameters import GatheredParameters

            for name, parameter in model.named_parameters():
                with GatheredParameters([parameter], modifier_rank=0):
                    if rank == 0:
                        with torch.no_grad():
                            parameter.copy_(state[name])
            return
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if rank == 0:
                    parameter.copy_(state[name])
                dist.broadcast(parameter.data, src=0)
