"""seqrec's eager attention against transformers' own, and its choice by model.attention_kernel."""

from __future__ import annotations

import pytest
import torch

from seqrec import attention
from seqrec.config import ModelConfig, ScratchBertConfig
from seqrec.errors import ConfigError
from seqrec.model import build_model
from seqrec.runtime import attention_kernel

REGISTERED = attention.register()
needs_registry = pytest.mark.skipif(not REGISTERED, reason="this transformers' BERT has no attention registry (before transformers 5): "
                                                           "auto keeps transformers' eager attention, tested elsewhere")


def eager_attention_forward(*args, **kwargs):
    from transformers.models.bert.modeling_bert import eager_attention_forward as transformers_eager

    return transformers_eager(*args, **kwargs)

TINY = ScratchBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


class _Layer(torch.nn.Module):
    pass


def _inputs(batch=3, heads=2, length=7, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, size, generator=generator, requires_grad=True) for _ in range(3))
    kept = torch.arange(length)[None, :] < torch.tensor([length, 4, 1])[:, None]  # row 2: one key
    additive = torch.zeros(batch, 1, length, length).masked_fill(~kept[:, None, None, :], torch.finfo(torch.float32).min)
    return q, k, v, kept[:, None, None, :].expand(batch, 1, length, length), additive


def _run(function, q, k, v, mask, training=False, dropout=0.0):
    layer = _Layer()
    layer.train(training)
    output, probabilities = function(layer, q, k, v, mask, scaling=q.shape[-1] ** -0.5, dropout=dropout)
    (output.float() * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
    gradients = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return output, probabilities, gradients


@needs_registry
def test_fp32_output_and_gradients_are_transformers_eager_attention():
    q, k, v, _, additive = _inputs()
    expected, expected_probabilities, expected_gradients = _run(eager_attention_forward, q, k, v, additive)
    output, probabilities, gradients = _run(attention.seqrec_attention, q, k, v, additive)
    assert output.dtype == torch.float32
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probabilities, expected_probabilities, rtol=1e-5, atol=1e-6)
    for got, want in zip(gradients, expected_gradients):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(probabilities.detach()[2, :, :, 1:].abs().max()) == 0.0  # masked keys get nothing


def test_a_boolean_mask_gives_what_the_additive_one_gives():
    q, k, v, kept, additive = _inputs(seed=1)
    from_additive, _, additive_gradients = _run(attention.seqrec_attention, q, k, v, additive)
    from_boolean, _, boolean_gradients = _run(attention.seqrec_attention, q, k, v, kept)
    torch.testing.assert_close(from_boolean, from_additive)
    for got, want in zip(boolean_gradients, additive_gradients):
        torch.testing.assert_close(got, want)


@needs_registry
def test_under_bf16_autocast_the_scores_stay_bf16_and_match_fp32_to_bf16_rounding():
    q, k, v, _, additive = _inputs(length=33, size=16, seed=2)
    reference, _, reference_gradients = _run(attention.seqrec_attention, q, k, v, additive)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, probabilities, gradients = _run(attention.seqrec_attention, q, k, v, additive)
        _, eager_probabilities, _ = _run(eager_attention_forward, q, k, v, additive)
    assert probabilities.dtype == torch.bfloat16
    assert eager_probabilities.dtype == torch.float32  # what this module is for
    torch.testing.assert_close(output.float(), reference, rtol=0.05, atol=0.02)
    torch.testing.assert_close(probabilities.float().sum(-1), torch.ones(3, 2, 33), rtol=0, atol=0.02)
    for got, want in zip(gradients, reference_gradients):
        assert float((got - want).norm() / want.norm()) < 0.02


def test_attention_dropout_applies_only_in_training():
    q, k, v, _, additive = _inputs(seed=3)
    evaluated, _, _ = _run(attention.seqrec_attention, q, k, v, additive, training=False, dropout=0.5)
    reference, _, _ = _run(attention.seqrec_attention, q, k, v, additive)
    torch.testing.assert_close(evaluated, reference)
    torch.manual_seed(0)
    _, dropped, _ = _run(attention.seqrec_attention, q, k, v, additive, training=True, dropout=0.5)
    assert 0.3 < float((dropped.detach() == 0).float().mean()) < 0.9  # dropped entries plus the masked keys


@needs_registry
def test_auto_picks_seqrec_attention_on_cpu_and_sdpa_on_gpus():
    assert attention_kernel("auto", torch.device("cpu")) == attention.NAME
    assert attention_kernel("auto", torch.device("cuda")) == "sdpa"
    assert attention_kernel("eager", torch.device("cpu")) == "eager"


def test_without_the_attention_registry_auto_falls_back_and_a_request_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(attention, "register", lambda: False)
    assert attention_kernel("auto", torch.device("cpu")) == "eager"
    with pytest.raises(ConfigError, match="model.attention_kernel: 'seqrec' needs transformers 5 or later"):
        attention_kernel("seqrec", torch.device("cpu"))


@needs_registry
@pytest.mark.parametrize("attention_mode", ["bidirectional", "causal"])
def test_a_model_on_seqrec_attention_computes_what_it_computes_on_eager(attention_mode):
    outputs = {}
    for kernel in ("eager", "seqrec"):
        torch.manual_seed(0)
        model, _ = build_model(ModelConfig(pretrained=None, scratch=TINY, attention=attention_mode, attention_kernel=kernel), 30, max_len=16)
        assert model.mlm.config._attn_implementation == kernel
        model.eval()
        items = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
        with torch.no_grad():
            outputs[kernel] = model.encode(items)
    torch.testing.assert_close(outputs["seqrec"], outputs["eager"], rtol=1e-5, atol=1e-5)


@needs_registry
def test_an_exported_config_names_no_attention_implementation(tmp_path):
    model, _ = build_model(ModelConfig(pretrained=None, scratch=TINY, attention_kernel="seqrec"), 30, max_len=16)
    model.mlm.save_pretrained(tmp_path)
    assert attention.NAME not in (tmp_path / "config.json").read_text()
