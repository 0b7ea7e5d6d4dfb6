"""Device and precision choices, made once from the config."""

from __future__ import annotations

import torch

from seqrec import attention
from seqrec.errors import ConfigError


def resolve_device(requested: str, setting: str = "train.device") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a device this machine has; errors name `setting`."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{setting}: must be auto, cpu, cuda or cuda:N, got {requested!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}: {requested} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{setting}: {requested} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def cpu_supports_bf16() -> bool:
    cpu = torch.backends.cpu
    return cpu.get_cpu_capability() in ("AVX512", "AMX") or bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware runs it natively (Ampere+ GPUs, AVX-512/AMX CPUs), else fp32."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        # fp16 autocast needs loss scaling, which the DeepSpeed engine adds; GPUs only.
        if device.type != "cuda":
            raise ConfigError(f"train.precision: fp16 needs a CUDA device, not {device}; use bf16, fp32 or auto")
        return torch.float16
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()
    if precision == "bf16" and not supported:
        raise ConfigError(f"train.precision: bf16 is not supported on {device}; use fp32 or auto")
    return torch.bfloat16 if supported else None


def require_compile_toolchain(device: torch.device) -> None:
    """`model.compile` on a CPU: inductor writes C++ for each layer and builds it with the host's
    compiler at the first step. Checked at start, so a host without one fails there with the
    setting named, not after the data and model are set up with a compiler traceback."""
    if device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler
    except ImportError:  # a torch that moved them: the first compiled step reports it instead
        return
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler as error:
        raise ConfigError(
            f"model.compile: torch.compile on {device} builds C++ and found no working compiler ({error}); "
            "install one (e.g. g++, or name it in CXX) or set model.compile=false"
        ) from None


def attention_kernel(requested: str, device: torch.device) -> str:
    """transformers' attention implementation for `model.attention_kernel` on this device:
    auto is sdpa on GPUs and seqrec's own eager attention elsewhere (transformers' where this
    transformers cannot register it)."""
    if requested == "auto":
        if device.type == "cuda":
            return "sdpa"
        return attention.NAME if attention.register() else "eager"
    if requested == attention.NAME and not attention.register():
        raise ConfigError(f"model.attention_kernel: {attention.NAME!r} needs transformers 5 or later (BERT's attention registry); "
                          "use eager or sdpa")
    return requested


def peak_memory_mb(device: torch.device) -> tuple[float, float | None]:
    """This process's peak resident host memory and, on a GPU, the peak memory PyTorch allocated
    there, in MiB. The host figure is the kernel's high-water mark (ru_maxrss), so it counts what
    `keep_freed_host_memory` holds on to, not only live tensors."""
    import resource
    import sys

    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return host, gpu


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    Large tensors (the rows x catalogue scores, the embedding-table gradient) are above malloc's
    mmap threshold, so by default each step maps fresh pages and the kernel zero-fills them on
    first touch: on the efficiency benchmark that made a 54k-item scoring matmul 3x slower than
    the same matmul into a reused buffer. Served from the heap and never trimmed, the memory is
    reused step after step, as the CUDA caching allocator does on a GPU. The process keeps its
    peak resident size. Returns False where the C library is not glibc (nothing changed)."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
