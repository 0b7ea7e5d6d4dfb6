"""Linear layers whose weight gradient multiplies token-major copies on CPUs.

A linear layer's weight gradient is `grad_output.T @ input`: the token dimension is the product's
inner dimension, and PyTorch hands the product a transposed operand. On CPUs that is the slow path
of oneDNN's bf16 matmul: on the 2-core AMX Xeon, BERT-large feed-forward shapes (9,216 tokens x
1,024 x 4,096) ran the weight gradient at 1,117 GFLOP/s as nn.Linear computes it against 1,626
token-major, copy included (bench/cpu_kernels.py, bench/results/cpu_kernels.json), while the
forward and input-gradient products ran at 2,000-2,400 in ad-hoc probes. So the weight gradient
here is the same product after a transposing copy of one operand: the narrower of `grad_output`
and `input` (transposing the narrower input also costs transposing the [in, out] result back).
PyTorch's own transposing copy is itself slow for 2-byte types (21 ms for 9,216 x 1,024 bf16),
so the copy goes through oneDNN's reorder (4 ms).
A custom operator carries it so that `torch.compile` keeps the copy instead of folding it back
into a transposed view.

Only the layers where the copy pays for itself take this path (`takes_token_major`: the
feed-forward layers of encoders at least 512 wide), and only for CPU training in bf16 (autocast
or bf16 weights); elsewhere, and without gradients, the layer is `nn.Linear` itself. The bias
gradient is summed in fp32 (PyTorch's sums in bf16), so gradients differ from `nn.Linear`'s by
rounding only. GPUs' matmul libraries take transposed operands at full speed, so nothing
changes there.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from seqrec.errors import ConfigError

NAME = "token_major"


@functools.cache
def available() -> bool:
    """Whether this PyTorch has oneDNN with bf16 support on this CPU (the reorder behind the copy)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@torch.library.custom_op("seqrec::transposed_copy", mutates_args=())
def transposed_copy(matrix: torch.Tensor) -> torch.Tensor:
    """A contiguous [n, m] copy of an [m, n] matrix."""
    if matrix.device.type == "cpu" and matrix.dtype in (torch.bfloat16, torch.float32) and available():
        return torch._mkldnn_transpose(matrix.contiguous().to_mkldnn(), 0, 1).to_dense()
    return matrix.t().contiguous()


@transposed_copy.register_fake
def _transposed_copy_shape(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.new_empty((matrix.shape[1], matrix.shape[0]))


def weight_gradient(grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """`grad_output.T @ input` for [tokens, out] and [tokens, in] matrices, the product from a
    token-major copy of the narrower operand."""
    tokens, out_features = grad_output.shape
    in_features = input.shape[1]
    if tokens * out_features <= tokens * in_features + in_features * out_features:
        return transposed_copy(grad_output) @ input
    return transposed_copy(transposed_copy(input) @ grad_output)


class _TokenMajorLinearFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.bfloat16)
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        return F.linear(input, weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_output: torch.Tensor):
        input, weight = ctx.saved_tensors
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = (grad_rows @ weight).view(*grad_output.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_weight = weight_gradient(grad_rows, input.reshape(-1, input.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0, dtype=torch.float32)
        return grad_input, grad_weight, grad_bias


class TokenMajorLinear(nn.Linear):
    """`nn.Linear` whose weight gradient takes the token-major path in CPU bf16 training."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self._token_major(input):
            return _TokenMajorLinearFunction.apply(input, self.weight, self.bias)
        return F.linear(input, self.weight, self.bias)

    def _token_major(self, input: torch.Tensor) -> bool:
        if input.device.type != "cpu" or not torch.is_grad_enabled() or not self.weight.requires_grad:
            return False
        if torch.is_autocast_enabled("cpu"):
            return torch.get_autocast_dtype("cpu") == torch.bfloat16
        return input.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16


# The narrowest side of the layers that take the token-major path (see takes_token_major).
MIN_FEATURES = 512


def takes_token_major(layer: nn.Linear) -> bool:
    """Whether the token-major weight gradient pays for its copy in this layer: rectangular
    layers (BERT's feed-forward ones) at least `MIN_FEATURES` wide on both sides.

    The weight gradient alone on the AMX Xeon in bf16 at 2,560 and 9,216 tokens, nn.Linear's
    time over token-major's (bench/cpu_kernels.py, bench/results/cpu_kernels.json): 1,024 ->
    4,096 1.20-1.39x, 4,096 -> 1,024 1.46-1.53x, 3,072 -> 768 1.27-1.36x, 512 -> 2,048 and back
    1.11-1.28x, 768 -> 3,072 even. Square layers (attention's projections) lose at 512 and 768
    (0.49-0.55x: the transposed product is fast there) and tie or gain a little at 1,024
    (1.02-1.17x), which a whole compiled BERT-large step did not show (0.98-1.01x, an ad-hoc A/B).
    At MiniLM's 384, 384 -> 1,536 loses (0.66-0.89x) and 1,536 -> 384 gains alone (1.31-1.42x) but
    not in a whole step once the custom backward's own passes are paid (the ML-1M 2-layer step
    0.99x in an ad-hoc interleaved A/B), so MiniLM keeps nn.Linear."""
    return layer.in_features != layer.out_features and min(layer.in_features, layer.out_features) >= MIN_FEATURES


def use_token_major_linears(module: nn.Module) -> int:
    """Turns each plain `nn.Linear` under `module` that `takes_token_major` into a
    `TokenMajorLinear`, in place (the same parameters, names and hooks: only the class
    changes); returns how many."""
    count = 0
    for child in module.modules():
        if type(child) is nn.Linear and takes_token_major(child):
            child.__class__ = TokenMajorLinear
            count += 1
    return count


def _has_amx() -> bool:
    init_amx = getattr(torch.cpu, "_init_amx", None)
    try:
        return bool(init_amx and init_amx())
    except RuntimeError:
        return False


def linear_kernel(requested: str, device: torch.device) -> str:
    """The kernel `model.linear_kernel` names on this device: auto is token_major on CPUs with
    AMX whose oneDNN runs bf16 (where the slow transposed operand was measured), torch
    elsewhere."""
    if requested == "auto":
        return NAME if device.type == "cpu" and available() and _has_amx() else "torch"
    if requested == NAME and not available():
        raise ConfigError(f"model.linear_kernel: {NAME!r} needs PyTorch's oneDNN with bf16 on this CPU; use torch or auto")
    return requested
