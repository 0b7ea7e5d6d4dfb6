"""The feed-forward GELU as ATen's operator, and its choice by model.activation_kernel."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.utils import run_and_get_code
from transformers.activations import ACT2FN, GELUActivation

from seqrec.activation_kernel import ATenGELU, activation_kernel, gelu, use_aten_gelu
from seqrec.config import ModelConfig, ScratchBertConfig
from seqrec.model import build_model

TINY = ScratchBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _value_and_gradient(function, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = inputs.detach().requires_grad_(True)
    output = function(inputs)
    (output.float() * torch.linspace(-1, 1, output.shape[-1])).sum().backward()
    return output, inputs.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_operator_is_the_exact_gelu_forward_and_backward(dtype):
    inputs = (torch.randn(7, 48) * 3).to(dtype)
    expected_output, expected_gradient = _value_and_gradient(F.gelu, inputs)
    output, gradient = _value_and_gradient(gelu, inputs)
    assert output.dtype == gradient.dtype == dtype
    assert torch.equal(output, expected_output) and torch.equal(gradient, expected_gradient)
    torch.library.opcheck(gelu, (inputs.requires_grad_(True),))


class _FeedForward(nn.Module):
    """Outside torch.nn, so that torch.compile traces the whole forward (it skips torch.nn's own
    containers' frames)."""

    def __init__(self, activation: nn.Module):
        super().__init__()
        self.dense, self.activation, self.output = nn.Linear(16, 64), activation, nn.Linear(64, 16)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.output(self.activation(self.dense(inputs)))


def _compiled_step_code(module: nn.Module, inputs: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], str]:
    module.compile(dynamic=True)
    # Uncached, so the generated code is there to read on every run.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        result, code = run_and_get_code(lambda: _value_and_gradient(module, inputs))
    return result, "\n".join(code)


def test_compiled_the_gelu_is_called_not_generated_and_gives_eager_values():
    torch.manual_seed(0)
    feed_forward = _FeedForward(ATenGELU())
    compiled = copy.deepcopy(feed_forward)
    inputs = torch.randn(5, 16)
    (output, gradient), generated = _compiled_step_code(compiled, inputs)
    expected_output, expected_gradient = _value_and_gradient(feed_forward, inputs)
    assert "seqrec.gelu.default" in generated and "seqrec.gelu_backward.default" in generated
    assert ".erf()" not in generated
    assert torch.allclose(output, expected_output, atol=1e-6) and torch.allclose(gradient, expected_gradient, atol=1e-6)
    for got, expected in zip(compiled.parameters(), feed_forward.parameters()):
        assert torch.allclose(got.grad, expected.grad, atol=1e-6)
    # What it replaces: the compiler's own erf, forward and backward.
    _, generated = _compiled_step_code(_FeedForward(GELUActivation()), inputs)
    assert generated.count(".erf()") >= 2 and "seqrec.gelu" not in generated


def test_only_exact_gelus_are_replaced_and_the_state_dict_is_unchanged():
    config = ModelConfig(pretrained=None, scratch=TINY)
    model, _ = build_model(config, num_items=20, max_len=8)
    keys = set(model.state_dict())
    encoder = model.mlm.bert.encoder
    encoder.layer[1].intermediate.intermediate_act_fn = ACT2FN["gelu_new"]
    assert use_aten_gelu(encoder) == 1
    assert isinstance(encoder.layer[0].intermediate.intermediate_act_fn, ATenGELU)
    assert not isinstance(encoder.layer[1].intermediate.intermediate_act_fn, ATenGELU)
    assert set(model.state_dict()) == keys


def test_auto_is_aten_for_compiled_cpu_layers_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert activation_kernel("auto", cpu, compiled=True) == "aten"
    assert activation_kernel("auto", cpu, compiled=False) == "torch"
    assert activation_kernel("auto", cuda, compiled=True) == "torch"
    assert activation_kernel("aten", cuda, compiled=False) == "aten"
    assert activation_kernel("torch", cpu, compiled=True) == "torch"


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"compile": True}, ATenGELU),
    ({"compile": True, "activation_kernel": "torch"}, GELUActivation),
    ({}, GELUActivation),
    ({"activation_kernel": "aten"}, ATenGELU),
])
def test_build_model_applies_the_chosen_kernel_to_every_feed_forward_layer(overrides, expected):
    model, _ = build_model(ModelConfig(pretrained=None, scratch=TINY, **overrides), num_items=20, max_len=8)
    assert all(type(layer.intermediate.intermediate_act_fn) is expected for layer in model.mlm.bert.encoder.layer)
