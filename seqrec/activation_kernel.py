"""The encoder's GELU as an operator `torch.compile` calls instead of generating.

BERT's feed-forward activation is the exact (erf) GELU over a [tokens, 4 x hidden] matrix, the
largest elementwise pass of a layer. Under `torch.compile` on a CPU, inductor writes that pass
itself, with ATen's vectorised erf (a division and an exp per element), while eager PyTorch hands
it to oneDNN's JIT eltwise kernel. On the 2-core AMX Xeon in bf16 the compiled forward and
backward took 1.44-2.03x as long as ATen's (bench/cpu_kernels.py: 64.7 ms against 28.4 ms at
9,216 x 4,096), and BERT-large width's compiled ML-1M step ran 1.083-1.087x faster with the GELU
left to ATen in two runs (`details.activation_kernel_ab` in bench/results/efficiency.json,
alternating rounds). So under `model.activation_kernel: aten` the activation is a custom
operator, forward and backward, which the compiler calls as it is: the same ATen kernels as
eager mode, hence the same values. GPUs keep the compiler's own kernel, which fuses the
activation with its neighbours at memory speed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import GELUActivation

NAME = "aten"


@torch.library.custom_op("seqrec::gelu", mutates_args=())
def gelu(input: torch.Tensor) -> torch.Tensor:
    """The exact GELU, ATen's kernel."""
    return torch.ops.aten.gelu(input)


@gelu.register_fake
def _gelu_shape(input: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(input)


@torch.library.custom_op("seqrec::gelu_backward", mutates_args=())
def gelu_backward(grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """The exact GELU's input gradient, ATen's kernel (a custom operator too, or the compiler
    would write the backward's erf itself)."""
    return torch.ops.aten.gelu_backward(grad_output.to(input.dtype), input)


@gelu_backward.register_fake
def _gelu_backward_shape(grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(input)


def _save_input(ctx, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _gelu_input_gradient(ctx, grad_output: torch.Tensor) -> torch.Tensor:
    (input,) = ctx.saved_tensors
    return gelu_backward(grad_output, input)


gelu.register_autograd(_gelu_input_gradient, setup_context=_save_input)


class ATenGELU(nn.Module):
    """transformers' `GELUActivation` (exact GELU) through the `seqrec::gelu` operator."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return gelu(input)


def is_exact_gelu(activation: nn.Module) -> bool:
    return type(activation) is GELUActivation and activation.act is nn.functional.gelu


def use_aten_gelu(encoder: nn.Module) -> int:
    """Replaces each feed-forward activation under `encoder` that is the exact GELU with
    `ATenGELU` (no parameters, so state dicts are unchanged); returns how many. Other
    activations (the tanh approximation, ReLU) are left as they are."""
    count = 0
    for module in encoder.modules():
        activation = getattr(module, "intermediate_act_fn", None)
        if isinstance(activation, nn.Module) and is_exact_gelu(activation):
            module.intermediate_act_fn = ATenGELU()
            count += 1
    return count


def activation_kernel(requested: str, device: torch.device, compiled: bool) -> str:
    """The kernel `model.activation_kernel` names: auto is aten for CPU layers that
    `model.compile` compiles (eager PyTorch runs ATen's kernel anyway), torch elsewhere."""
    if requested == "auto":
        return NAME if device.type == "cpu" and compiled else "torch"
    return requested
