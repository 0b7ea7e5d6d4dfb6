"""Cross-entropy over the full item catalogue, fused with the scoring matmul.

The logits of M scored rows against N items are the largest tensor of a training step. Written
as `F.cross_entropy(logits.float(), labels)`, autograd keeps an fp32 copy of them, an fp32
log-softmax of the same size, and in backward a zero-filled one-hot and an fp32 softmax
gradient: four M x N fp32 tensors, freshly allocated every step. On a 54k-item catalogue those
passes, not the matmuls, took most of the step on CPU, and on a GPU they bound the batch size
long before the model does.

Here the scores are built once, in the compute dtype, and every later step works on that one
M x N tensor in place: the bias is added, the softmax (PyTorch's kernel, which accumulates in
fp32) overwrites them with the probabilities, and those are what backward keeps. Backward
subtracts one at each label (M entries), making them the gradient per unit of loss, and never
scales the matrix: the per-row loss scale s goes onto the thin operands instead,
    d hidden = s * ((P - Y) @ W),   d table rows = (P - Y)^T @ (s * hidden),   d bias = (P - Y)^T @ s,
so the matrix is read by the matmuls and by one matrix-vector product, and written by nothing
but the softmax. Peak extra memory: that one M x N tensor in the compute dtype.

The loss is -log of the label's probability as stored: in bf16 it carries that rounding (2^-8
relative, 0.004 in loss) besides the scores' own, and the bias is added in bf16 too (a GEMM
with the bias folded in ran far slower on CPU). It is capped at -log of the smallest normal
float (87.3), which only a label scored 87 nats below the row's best reaches. Gradients come
from the stored probabilities, as before.

Optionally each row's softmax leaves out given items other than its label (`excluded`): their
scores become -inf before the softmax, so their probabilities, and with them their gradients,
are exactly zero. The cost is two scatters of M x K entries into the M x N matrix.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def catalog_cross_entropy(hidden: torch.Tensor, table: torch.Tensor, bias: torch.Tensor, rows: slice, labels: torch.Tensor,
                          excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row losses [M] (fp32) of `hidden` [M, H] scored against `table[rows]` + `bias[rows]`,
    labels in 0..N-1 (offsets into `rows`). Gradients reach the whole `table` and `bias` (zero
    outside `rows`), so a tied embedding matrix needs no separate slice backward.
    Under autocast the matmuls run in the autocast dtype, as `F.linear` would.
    `excluded` [M, K] (offsets into `rows`, negative = none) lists items each row's softmax
    leaves out; a row's own label is never left out."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, table.dtype)
    return _CatalogCrossEntropy.apply(hidden, table, bias, labels, rows.start, rows.stop, compute_dtype, excluded)


class _CatalogCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, table, bias, labels, start, stop, compute_dtype, excluded=None):
        with torch.autocast(hidden.device.type, enabled=False):
            weight = table[start:stop].to(compute_dtype)
            features = hidden.to(compute_dtype)
            scores = features @ weight.t()
            scores += bias[start:stop].to(compute_dtype)
            if excluded is not None:
                _exclude(scores, excluded, labels)
            # In place: the kernel reads each row whole before it writes it (CPU and CUDA alike;
            # tests/test_catalog_loss.py holds it to the out-of-place result).
            probabilities = torch._softmax(scores, 1, False, out=scores)
            picked = probabilities.gather(1, labels.unsqueeze(1)).squeeze(1).float()
            losses = -picked.clamp_min(torch.finfo(torch.float32).tiny).log()
        ctx.save_for_backward(features, weight, probabilities, labels)
        ctx.layout = (start, stop, hidden.dtype, table.shape, table.dtype, bias.shape, bias.dtype)
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses):
        features, weight, probabilities, labels = ctx.saved_tensors
        start, stop, hidden_dtype, table_shape, table_dtype, bias_shape, bias_dtype = ctx.layout
        scale = grad_losses.float().unsqueeze(1)
        with torch.autocast(features.device.type, enabled=False):
            rows = torch.arange(probabilities.shape[0], device=probabilities.device)
            residual = probabilities.index_put_((rows, labels), probabilities.new_full((), -1.0), accumulate=True)
            grad_hidden = grad_table = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_hidden = ((residual @ weight).float() * scale).to(hidden_dtype)
            if ctx.needs_input_grad[1]:
                scaled_features = (features.float() * scale).to(residual.dtype)
                grad_table = _embed_rows(residual.t() @ scaled_features, start, stop, table_shape, table_dtype)
            if ctx.needs_input_grad[2]:
                grad_bias = _embed_rows((residual.t() @ scale.to(residual.dtype)).squeeze(1), start, stop, bias_shape, bias_dtype)
        return grad_hidden, grad_table, grad_bias, None, None, None, None, None


def _exclude(scores: torch.Tensor, excluded: torch.Tensor, labels: torch.Tensor) -> None:
    """Sets scores[m, excluded[m, k]] to -inf in place, except at each row's label. Empty slots
    (negative) point at the label, whose score is written back last."""
    label_columns = labels.unsqueeze(1)
    label_scores = scores.gather(1, label_columns)
    columns = torch.where(excluded >= 0, excluded, label_columns)
    scores.scatter_(1, columns, float("-inf"))
    scores.scatter_(1, label_columns, label_scores)


def _embed_rows(values: torch.Tensor, start: int, stop: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` holding `values` at rows start:stop and zeros elsewhere, zeroing only
    the rows outside (the catalogue is most of a tied table)."""
    full = torch.empty(shape, dtype=dtype, device=values.device)
    full[:start].zero_()
    full[stop:].zero_()
    full[start:stop] = values
    return full
