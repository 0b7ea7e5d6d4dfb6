"""seqrec's eager attention: the length x length scores stay in the compute dtype.

Under bf16 autocast, transformers' eager attention adds its fp32 additive mask to the bf16
scores, which promotes every batch x heads x length x length score to fp32: the softmax runs and
writes in fp32, and the value product casts the probabilities back to bf16, besides a pass for
the scaling; backward pays the same again. CPUs have no fused attention kernel that beats this
at BERT's head sizes (PyTorch's flash kernel is slower there), so those passes are paid in full.

Here the query is scaled before the product (length x head size, not length x length), the mask
is added in the scores' dtype, and PyTorch's softmax kernel (which accumulates in fp32 inside)
writes the probabilities in that dtype, as fused GPU attention kernels do. Without autocast
everything is fp32 and the result is transformers' eager attention to rounding. On the 2-core
AMX Xeon an ML-1M training step (2 layers, batch 64) took 0.388 s against 0.418 s
(bench/efficiency.py, settings ml-1m:64x2 and ml-1m:64x2e in one run); with `model.compile`
both run alike, as the compiler fuses those passes itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "seqrec"


def seqrec_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' attention-function signature: [batch, heads, length, head size] inputs,
    returns the output as [batch, length, heads, head size] and the probabilities."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query * scaling, key.transpose(2, 3))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # True = attend, as transformers' sdpa masks
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask.to(scores.dtype)
    # The aten kernel, not F.softmax, which CUDA's autocast runs in fp32.
    probabilities = torch._softmax(scores, -1, False)
    probabilities = F.dropout(probabilities, p=dropout, training=module.training)
    output = torch.matmul(probabilities, value)
    return output.transpose(1, 2).contiguous(), probabilities


def register() -> bool:
    """Makes `NAME` a transformers attention implementation (with eager's additive masks).
    False where this transformers' BERT does not dispatch through the attention registry
    (before transformers 5): nothing changed."""
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
        from transformers.models.bert import modeling_bert
    except ImportError:
        return False
    registry = getattr(modeling_bert, "ALL_ATTENTION_FUNCTIONS", None)
    if registry is None:
        return False
    if NAME not in registry:
        registry.register(NAME, seqrec_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)
    return True
