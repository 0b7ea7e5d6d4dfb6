"""Cross-entropy over the full item catalogue, fused with the scoring matmul.

The logits of M scored rows against N items are the largest tensor of a training step. Written
as `F.cross_entropy(logits.float(), labels)`, autograd keeps an fp32 copy of them, an fp32
log-softmax of the same size, and in backward a zero-filled one-hot and an fp32 softmax
gradient: four M x N fp32 tensors, freshly allocated every step. On a 54k-item catalogue those
passes, not the matmuls, took most of the step on CPU (page faults on each new buffer), and on
a GPU they bound the batch size long before the model does.

Here the scores are built once, in the compute dtype, without the bias (a broadcast bias in
the matmul made the CPU GEMM about a quarter slower). Each cache-sized block of rows is then
taken to fp32, the bias added, and its softmax computed with one exponential per score; the
probabilities overwrite the scores in place and are what backward keeps. Backward turns them
into the gradient (minus one at the label, times the incoming gradient) block by block, again
in place. Peak extra memory: one M x N tensor in the compute dtype plus one fp32 block.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

_BLOCK_ELEMENTS = {"cuda": 1 << 26}  # fp32 elements per row block; CPU default keeps it in L2
_CPU_BLOCK_ELEMENTS = 1 << 19


def catalog_cross_entropy(hidden: torch.Tensor, table: torch.Tensor, bias: torch.Tensor, rows: slice, labels: torch.Tensor) -> torch.Tensor:
    """Per-row losses [M] (fp32) of `hidden` [M, H] scored against `table[rows]` + `bias[rows]`,
    labels in 0..N-1 (offsets into `rows`). Gradients reach the whole `table` and `bias` (zero
    outside `rows`), so a tied embedding matrix needs no separate slice backward.
    Under autocast the matmuls run in the autocast dtype, as `F.linear` would."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, table.dtype)
    block = _BLOCK_ELEMENTS.get(device_type, _CPU_BLOCK_ELEMENTS)
    return _CatalogCrossEntropy.apply(hidden, table, bias, labels, rows.start, rows.stop, compute_dtype, block)


class _CatalogCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, table, bias, labels, start, stop, compute_dtype, block_elements):
        with torch.autocast(hidden.device.type, enabled=False):
            weight = table[start:stop].to(compute_dtype)
            features = hidden.to(compute_dtype)
            scores = features @ weight.t()
            item_bias = bias[start:stop].float()
            target = scores.gather(1, labels.unsqueeze(1)).squeeze(1).float() + item_bias[labels]
            log_normaliser = torch.empty(scores.shape[0], dtype=torch.float32, device=scores.device)
            block_rows = max(1, block_elements // max(1, scores.shape[1]))
            for first in range(0, scores.shape[0], block_rows):
                # bf16 + fp32 bias promotes to fp32: the conversion and the add are one pass.
                block = torch.add(scores[first : first + block_rows], item_bias)
                peak = block.amax(dim=1, keepdim=True)
                total = block.sub_(peak).exp_().sum(dim=1, keepdim=True)
                log_normaliser[first : first + block_rows] = (peak + total.log()).squeeze(1)
                scores[first : first + block_rows] = block.mul_(total.reciprocal_())
        ctx.save_for_backward(features, weight, scores, labels)
        ctx.layout = (start, stop, block_rows, hidden.dtype, table.shape, table.dtype, bias.shape, bias.dtype)
        return log_normaliser - target

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses):
        features, weight, probabilities, labels = ctx.saved_tensors
        start, stop, block_rows, hidden_dtype, table_shape, table_dtype, bias_shape, bias_dtype = ctx.layout
        scale = grad_losses.float()
        with torch.autocast(features.device.type, enabled=False):
            # (softmax - one_hot(label)) x incoming gradient, written over the probabilities; the
            # bias gradient (column sums) is taken from the fp32 blocks on the way.
            column_sums = torch.zeros(probabilities.shape[1], dtype=torch.float32, device=probabilities.device)
            for first in range(0, probabilities.shape[0], block_rows):
                last = min(first + block_rows, probabilities.shape[0])
                block_scale = scale[first:last, None]
                gradient = torch.mul(probabilities[first:last], block_scale)
                gradient[torch.arange(last - first, device=gradient.device), labels[first:last]] -= block_scale.squeeze(1)
                column_sums += gradient.sum(dim=0)
                probabilities[first:last] = gradient
            grad_scores = probabilities
            grad_hidden = grad_table = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_hidden = (grad_scores @ weight).to(hidden_dtype)
            if ctx.needs_input_grad[1]:
                grad_table = _embed_rows(grad_scores.t() @ features, start, stop, table_shape, table_dtype)
            if ctx.needs_input_grad[2]:
                grad_bias = _embed_rows(column_sums, start, stop, bias_shape, bias_dtype)
        return grad_hidden, grad_table, grad_bias, None, None, None, None, None


def _embed_rows(values: torch.Tensor, start: int, stop: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` holding `values` at rows start:stop and zeros elsewhere, zeroing only
    the rows outside (the catalogue is most of a tied table)."""
    full = torch.empty(shape, dtype=dtype, device=values.device)
    full[:start].zero_()
    full[stop:].zero_()
    full[start:stop] = values
    return full
