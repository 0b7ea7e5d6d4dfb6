"""The token-major linear layer against nn.Linear, and its choice by model.linear_kernel."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from seqrec import linear_kernel
from seqrec.config import ModelConfig, ScratchBertConfig
from seqrec.errors import ConfigError
from seqrec.linear_kernel import TokenMajorLinear, transposed_copy, use_token_major_linears, weight_gradient
from seqrec.model import build_model

# Wide enough for the feed-forward layers to take the token-major path, small enough for a test.
WIDE = ScratchBertConfig(hidden_size=512, num_hidden_layers=1, num_attention_heads=8, intermediate_size=1024)


def _feed_forward() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512), nn.Linear(512, 512), nn.Linear(512, 96, bias=False))


def _reference_and_token_major() -> tuple[nn.Sequential, nn.Sequential]:
    reference = _feed_forward()
    token_major = copy.deepcopy(reference)
    use_token_major_linears(token_major)
    return reference, token_major


def _assert_within_bf16_rounding(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Products of bf16 operands summed in another order: off by a small share of the largest entry."""
    got, expected = (gradient.to_dense() if gradient.is_sparse else gradient for gradient in (got, expected))
    assert float((got - expected).abs().max()) <= 0.02 * float(expected.abs().max()) + 1e-12, name


def _gradients(module: nn.Module, inputs: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    inputs = inputs.detach().requires_grad_(True)
    weights = torch.linspace(-1, 1, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        output = module(inputs)
    (output.float() * weights).sum().backward()
    return output, [inputs.grad, *(parameter.grad for parameter in module.parameters())]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_transposed_copy_is_a_contiguous_transpose_also_of_a_strided_view(dtype):
    matrix = torch.randn(37, 53).to(dtype)
    for source in (matrix, matrix[:, ::2], matrix.t()):
        copied = transposed_copy(source)
        assert copied.is_contiguous()
        assert torch.equal(copied, source.t())
    torch.library.opcheck(transposed_copy, (matrix,))


def test_the_weight_gradient_is_the_transposed_product_whichever_operand_is_copied():
    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in ((96, 40), (40, 96)):
        grad_output = torch.randn(300, out_features, generator=generator).bfloat16()
        inputs = torch.randn(300, in_features, generator=generator).bfloat16()
        expected = grad_output.float().t() @ inputs.float()
        got = weight_gradient(grad_output, inputs)
        assert got.shape == (out_features, in_features)
        torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-1)


def test_only_rectangular_layers_at_least_512_wide_take_the_token_major_path():
    module = _feed_forward()
    assert use_token_major_linears(module) == 2
    assert [type(layer) for layer in module] == [TokenMajorLinear, nn.GELU, TokenMajorLinear, nn.Linear, nn.Linear]
    assert use_token_major_linears(module) == 0  # already swapped: nothing left to do


def test_under_bf16_autocast_gradients_match_nn_linear_to_bf16_rounding():
    reference, token_major = _reference_and_token_major()
    inputs = torch.randn(4, 75, 512, generator=torch.Generator().manual_seed(1))
    expected_output, expected = _gradients(reference, inputs, autocast=True)
    output, got = _gradients(token_major, inputs, autocast=True)
    # nn.Linear's forward, to rounding: DeepSpeed's ZeRO-3 replaces F.linear process-wide (an
    # earlier test may have), and under autocast its replacement rounds the bias add apart.
    torch.testing.assert_close(output.float(), expected_output.float(), rtol=1e-2, atol=1e-2)
    for name, got_gradient, expected_gradient in zip(["input", *(n for n, _ in reference.named_parameters())], got, expected):
        assert got_gradient.dtype == expected_gradient.dtype == torch.float32, name
        assert got_gradient.is_contiguous(), name
        _assert_within_bf16_rounding(got_gradient, expected_gradient, name)


def test_in_fp32_and_without_gradients_the_layer_is_nn_linear_exactly():
    reference, token_major = _reference_and_token_major()
    inputs = torch.randn(3, 9, 512, generator=torch.Generator().manual_seed(2))
    expected_output, expected = _gradients(reference, inputs, autocast=False)
    output, got = _gradients(token_major, inputs, autocast=False)
    assert torch.equal(output, expected_output)
    for got_gradient, expected_gradient in zip(got, expected):
        assert torch.equal(got_gradient, expected_gradient)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(token_major(inputs), reference(inputs))


def test_a_compiled_token_major_layer_trains_like_the_eager_one():
    eager = _feed_forward()
    use_token_major_linears(eager)
    compiled = copy.deepcopy(eager)
    compiled.compile(dynamic=True)
    inputs = torch.randn(2, 33, 512, generator=torch.Generator().manual_seed(3))
    expected_output, expected = _gradients(eager, inputs, autocast=True)
    output, got = _gradients(compiled, inputs, autocast=True)
    torch.testing.assert_close(output.float(), expected_output.float(), rtol=2e-2, atol=2e-2)
    for index, (got_gradient, expected_gradient) in enumerate(zip(got, expected)):
        _assert_within_bf16_rounding(got_gradient, expected_gradient, f"gradient {index}")


def test_auto_picks_token_major_only_on_amx_cpus_and_a_request_needs_onednn_bf16(monkeypatch):
    assert linear_kernel.linear_kernel("auto", torch.device("cuda")) == "torch"
    assert linear_kernel.linear_kernel("torch", torch.device("cpu")) == "torch"
    monkeypatch.setattr(linear_kernel, "available", lambda: True)
    monkeypatch.setattr(linear_kernel, "_has_amx", lambda: True)
    assert linear_kernel.linear_kernel("auto", torch.device("cpu")) == linear_kernel.NAME
    monkeypatch.setattr(linear_kernel, "_has_amx", lambda: False)
    assert linear_kernel.linear_kernel("auto", torch.device("cpu")) == "torch"
    monkeypatch.setattr(linear_kernel, "available", lambda: False)
    assert linear_kernel.linear_kernel("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ConfigError, match="model.linear_kernel: 'token_major' needs PyTorch's oneDNN with bf16"):
        linear_kernel.linear_kernel("token_major", torch.device("cpu"))


def test_a_wide_model_on_token_major_linears_keeps_its_parameter_names_and_trains_alike(monkeypatch):
    monkeypatch.setattr(linear_kernel, "available", lambda: True)
    models, losses = {}, {}
    for kernel in ("torch", "token_major"):
        torch.manual_seed(0)
        model, _ = build_model(ModelConfig(pretrained=None, scratch=WIDE, linear_kernel=kernel, dropout=0.0), 40, max_len=16)
        items = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.encode(items)
        loss = hidden.float().square().mean()
        loss.backward()
        models[kernel], losses[kernel] = model, float(loss.detach())
    swapped = [name for name, module in models["token_major"].mlm.named_modules() if isinstance(module, TokenMajorLinear)]
    assert sorted(swapped) == ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense"]
    assert not any(isinstance(module, TokenMajorLinear) for module in models["torch"].mlm.modules())
    assert list(models["token_major"].state_dict()) == list(models["torch"].state_dict())
    assert losses["token_major"] == pytest.approx(losses["torch"], rel=1e-3)  # the same forward, to rounding (see above)
    for (name, got), (_, expected) in zip(models["token_major"].named_parameters(), models["torch"].named_parameters()):
        if expected.grad is None:
            assert got.grad is None, name
            continue
        _assert_within_bf16_rounding(got.grad, expected.grad, name)
