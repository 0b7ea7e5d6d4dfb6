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

Optionally the target is smoothed (`smoothing` e): (1 - e) on the label and e spread evenly
over the items the row's softmax keeps, so the loss is (1 - e) * CE + e * (logsumexp - mean
kept score). The mean needs one read of the scores (their row sums, taken before exclusion,
less the left-out items' scores, each counted once); backward subtracts e / kept from the
probabilities in place and writes the left-out entries back to zero: no second M x N tensor.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def catalog_cross_entropy(hidden: torch.Tensor, table: torch.Tensor, bias: torch.Tensor, rows: slice, labels: torch.Tensor,
                          excluded: torch.Tensor | None = None, smoothing: float = 0.0) -> torch.Tensor:
    """Per-row losses [M] (fp32) of `hidden` [M, H] scored against `table[rows]` + `bias[rows]`,
    labels in 0..N-1 (offsets into `rows`). Gradients reach the whole `table` and `bias` (zero
    outside `rows`), so a tied embedding matrix needs no separate slice backward.
    Under autocast the matmuls run in the autocast dtype, as `F.linear` would.
    `excluded` [M, K] (offsets into `rows`, negative = none) lists items each row's softmax
    leaves out; a row's own label is never left out. `smoothing` in [0, 1) moves that share of
    each row's target from its label to a uniform spread over the items its softmax keeps."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, table.dtype)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    return _CatalogCrossEntropy.apply(hidden, table, bias, labels, rows.start, rows.stop, compute_dtype, excluded, smoothing)


class _CatalogCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, table, bias, labels, start, stop, compute_dtype, excluded=None, smoothing=0.0):
        with torch.autocast(hidden.device.type, enabled=False):
            weight = table[start:stop].to(compute_dtype)
            features = hidden.to(compute_dtype)
            scores = features @ weight.t()
            scores += bias[start:stop].to(compute_dtype)
            kept = None
            if smoothing:
                label_scores = scores.gather(1, labels.unsqueeze(1)).squeeze(1).float()
                kept_sums = scores.sum(1, dtype=torch.float32)
                kept = torch.full_like(kept_sums, float(scores.shape[1]))
                if excluded is not None:
                    left_out_sums, left_out_counts = _left_out(scores, excluded, labels)
                    kept_sums -= left_out_sums
                    kept -= left_out_counts
            if excluded is not None:
                _exclude(scores, excluded, labels)
            # In place: the kernel reads each row whole before it writes it (CPU and CUDA alike;
            # tests/test_catalog_loss.py holds it to the out-of-place result).
            probabilities = torch._softmax(scores, 1, False, out=scores)
            picked = probabilities.gather(1, labels.unsqueeze(1)).squeeze(1).float()
            losses = -picked.clamp_min(torch.finfo(torch.float32).tiny).log()
            if smoothing:
                # label score + its loss = the row's logsumexp.
                losses = (1.0 - smoothing) * losses + smoothing * (label_scores + losses - kept_sums / kept)
        ctx.save_for_backward(features, weight, probabilities, labels, excluded, kept)
        ctx.layout = (start, stop, hidden.dtype, table.shape, table.dtype, bias.shape, bias.dtype)
        ctx.smoothing = smoothing
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses):
        features, weight, probabilities, labels, excluded, kept = ctx.saved_tensors
        start, stop, hidden_dtype, table_shape, table_dtype, bias_shape, bias_dtype = ctx.layout
        smoothing = ctx.smoothing
        scale = grad_losses.float().unsqueeze(1)
        with torch.autocast(features.device.type, enabled=False):
            rows = torch.arange(probabilities.shape[0], device=probabilities.device)
            if smoothing:
                probabilities.sub_((smoothing / kept).to(probabilities.dtype).unsqueeze(1))
                if excluded is not None:
                    _exclude(probabilities, excluded, labels, 0.0)
            target = probabilities.new_full((), -(1.0 - smoothing))
            residual = probabilities.index_put_((rows, labels), target, accumulate=True)
            grad_hidden = grad_table = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_hidden = ((residual @ weight).float() * scale).to(hidden_dtype)
            if ctx.needs_input_grad[1]:
                scaled_features = (features.float() * scale).to(residual.dtype)
                grad_table = _embed_rows(residual.t() @ scaled_features, start, stop, table_shape, table_dtype)
            if ctx.needs_input_grad[2]:
                grad_bias = _embed_rows((residual.t() @ scale.to(residual.dtype)).squeeze(1), start, stop, bias_shape, bias_dtype)
        return grad_hidden, grad_table, grad_bias, None, None, None, None, None, None


def _exclude(scores: torch.Tensor, excluded: torch.Tensor, labels: torch.Tensor, value: float = float("-inf")) -> None:
    """Sets scores[m, excluded[m, k]] to `value` in place, except at each row's label. Empty
    slots (negative) point at the label, whose score is written back last."""
    label_columns = labels.unsqueeze(1)
    label_scores = scores.gather(1, label_columns)
    columns = torch.where(excluded >= 0, excluded, label_columns)
    rows = torch.arange(scores.shape[0], device=scores.device).unsqueeze(1)
    # Indexed writes (index_put_), not scatter_: on the CPU, scatter_ along dim 1 passes over the
    # whole M x N matrix (~110 ms at 1,567 x 54,542 in bf16 on an AMX Xeon, against 0.5 ms).
    scores[rows.expand_as(columns), columns] = value
    scores[rows, label_columns] = label_scores


def _left_out(scores: torch.Tensor, excluded: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums [M] (fp32) and counts [M] of the scores `_exclude` will remove: each listed item once,
    never the label, never an empty slot."""
    columns = torch.where((excluded >= 0) & (excluded != labels.unsqueeze(1)), excluded, -1).sort(1).values
    first = torch.ones_like(columns, dtype=torch.bool)
    first[:, 1:] = columns[:, 1:] != columns[:, :-1]
    counted = first & (columns >= 0)
    values = scores.gather(1, columns.clamp_min(0)).float()
    return torch.where(counted, values, 0.0).sum(1), counted.sum(1).float()


def _embed_rows(values: torch.Tensor, start: int, stop: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` holding `values` at rows start:stop and zeros elsewhere, zeroing only
    the rows outside (the catalogue is most of a tied table)."""
    full = torch.empty(shape, dtype=dtype, device=values.device)
    full[:start].zero_()
    full[stop:].zero_()
    full[start:stop] = values
    return full
