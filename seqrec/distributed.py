"""Process-group setup and the few collectives the training loop needs.

One entry point for every launcher: `deepspeed` and `torchrun` export RANK/WORLD_SIZE/LOCAL_RANK
and MASTER_ADDR/MASTER_PORT; SLURM's `srun` exports SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and
the node list, from which the rendezvous is derived here; a plain `python launcher/train.py`
becomes a world of one. NCCL on GPUs, gloo on CPU. Control decisions (does every rank still have
data, stop early) travel over a gloo group so they never force a GPU synchronisation.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import importlib
import logging
import os
import re
import socket
import subprocess
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seqrec.errors import ConfigError
from seqrec.runtime import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_control_group = None
# What started the process group this process joined. Joining sets RANK and WORLD_SIZE in the
# environment, which a later run in the same process (bench/quality.py trains several) would
# otherwise take for a launcher's.
_launcher: str | None = None


def launch_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for this process, whatever launched it."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun/deepspeed"
        resolved = {key: env[key] for key in ("RANK", "WORLD_SIZE")}
        resolved["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
        resolved["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
        resolved["MASTER_PORT"] = env.get("MASTER_PORT", "29500")
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env and "SLURM_STEP_ID" in env and env.get("SLURM_STEP_ID") != "batch":
        # Inside an `srun` step; the batch script itself (one process) falls through to a world of one.
        launcher = "srun"
        resolved = {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")),
            "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
        }
    else:
        launcher = "single process"
        resolved = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": env.get("MASTER_PORT") or str(_free_port())}
    resolved["LAUNCHER"] = launcher
    return resolved


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as 'gpu[003-005,009],cpu01' -> 'gpu003'."""
    if not nodelist:
        return "127.0.0.1"
    try:
        names = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30).stdout.split()
        if names:
            return names[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not first:
        return nodelist
    prefix, ranges = first.group(1), first.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


@contextlib.contextmanager
def _without_shared_memory_inference_op():
    """DeepSpeed's torch backend JIT-compiles a C++ shared-memory all-reduce on CPU hosts when it
    starts. Only tensor-parallel inference calls it (`inference_all_reduce`), never ZeRO
    training, yet building it needs a C++ compiler at run time (a slim image without one
    cannot start) and ~45 s on each new machine or environment path. So it is not built."""
    # Not `from deepspeed.comm import torch`: that package re-exports the torch module itself.
    deepspeed_torch_backend = importlib.import_module("deepspeed.comm.torch")
    builder = getattr(deepspeed_torch_backend, "build_shm_op", None)
    if builder is None:  # a DeepSpeed that no longer builds it here
        yield
        return
    deepspeed_torch_backend.build_shm_op = lambda: None
    try:
        yield
    finally:
        deepspeed_torch_backend.build_shm_op = builder


def init(device_type: str, timeout_minutes: float, device_setting: str = "train.device") -> DistInfo:
    """Join (or create) the process group. Idempotent: the group lives until the process exits
    (DeepSpeed caches its groups, so a second group in one process would confuse it). On CUDA,
    a process whose local rank has no GPU of its own is refused before joining, with an error
    naming `device_setting`."""
    global _control_group, _launcher
    resolved = launch_environment()
    launcher = resolved.pop("LAUNCHER")
    if device_type == "cuda":
        # From the resolved launch (srun's SLURM_LOCALID too): torch's own refusal ("device_id
        # cuda:1 is out of range") names neither the setting nor the way out.
        local_rank, visible = int(resolved["LOCAL_RANK"]), torch.cuda.device_count()
        if local_rank >= visible:
            raise ConfigError(
                f"{device_setting}: this process is local rank {local_rank}, but the node has {visible} CUDA device(s): "
                f"launch at most {visible} process(es) per node (--nproc_per_node / --num_gpus / --ntasks-per-node), "
                f"or set {device_setting}=cpu"
            )
    for key, value in resolved.items():
        os.environ.setdefault(key, value)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        import deepspeed
        from deepspeed.utils import logger as deepspeed_logger

        deepspeed_logger.setLevel(logging.WARNING)
        # DeepSpeed still calls the collectives torch renamed; the warning repeats every step.
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+.? is deprecated", category=FutureWarning)

        with _without_shared_memory_inference_op():
            deepspeed.init_distributed(
                dist_backend=backend, auto_mpi_discovery=False, timeout=datetime.timedelta(minutes=timeout_minutes),
                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
            )
        atexit.register(shutdown)
        _launcher = _launcher or launcher  # a process is started once, so the first join tells by what
    if _control_group is None:
        _control_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    backend = dist.get_backend()
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), backend, _launcher or launcher)
    log.debug("rank %d of %d (local %d), %s, launched by %s", info.rank, info.world_size, info.local_rank, backend, info.launcher)
    return info


def start(requested_device: str, timeout_minutes: float, device_setting: str = "train.device") -> tuple[torch.device, DistInfo]:
    """Resolve the device, join the process group, and pin this rank's GPU as the current CUDA
    device (so bare `.cuda()` calls and NCCL land on it)."""
    device = resolve_device(requested_device, device_setting)
    info = init(device.type, timeout_minutes, device_setting)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device, info


def shutdown() -> None:
    global _control_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None


def finish() -> None:
    """Orderly end of a successful job: wait for every rank, then tear the group down. Left to
    interpreter exit, gloo's connection threads can die mid-teardown and abort the process.
    A world of one has no peers to wait for and keeps its group (DeepSpeed caches it)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=_control_group)
        shutdown()


def all_true(flag: bool) -> bool:
    """True when `flag` holds on every rank (a CPU collective: no device synchronisation)."""
    return all_true_each([flag])[0]


def all_true_each(flags: list[bool]) -> list[bool]:
    """For each flag, whether it holds on every rank: several agreements in one CPU collective."""
    values = torch.tensor([1 if flag else 0 for flag in flags], dtype=torch.int32)
    dist.all_reduce(values, op=dist.ReduceOp.MIN, group=_control_group)
    return [bool(value) for value in values.tolist()]


def gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's `values`, indexed by rank (a CPU collective)."""
    local = torch.tensor(values, dtype=torch.float64)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local, group=_control_group)
    return [row.tolist() for row in gathered]


def gather_objects(value) -> list:
    """Every rank's `value` (picklable), indexed by rank, on every rank."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value, group=_control_group)
    return gathered


def broadcast_object(value, src: int = 0):
    holder = [value]
    dist.broadcast_object_list(holder, src=src, group=_control_group)
    return holder[0]


def barrier() -> None:
    dist.barrier(group=_control_group)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
