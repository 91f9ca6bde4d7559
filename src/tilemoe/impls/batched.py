"""Level 1 of the ladder: gather every token's expert weights and contract them in one einsum.

What changes from level 0: no Python loop. ``w13[topk_ids]`` copies each token's K expert matrices into a
[T, K, 2I, H] tensor, so the whole layer is two batched contractions and the device sees a few large kernels
instead of T*K tiny ones.

The price is memory: the gathered weights take O(T*K*H*I) elements (qwen3-30b-a3b at T=4096: ~190 GB in
bf16), so large T fails with ``torch.OutOfMemoryError``. The allocation is left to fail naturally; the bench
catches it and reports the row as OOM.
"""

from __future__ import annotations

import torch

from tilemoe.impls._registry import register_impl
from tilemoe.ops.activation import act_and_mul_torch


def batched_first_matmul(x, w13, topk_weights, topk_ids, *, config, b13=None):
    """h [T, K, 2I|I] = x_t @ w13[id_tk]^T (+ b13), with the input scaled first when weights_on_input."""
    ids = topk_ids.long()
    gathered = w13[ids]  # [T, K, 2I, H]: the O(T*K*H*I) copy that makes this level memory-bound
    if config.weights_on_input:
        xs = x.unsqueeze(1) * topk_weights.unsqueeze(-1).to(x.dtype)  # [T, K, H]
        h = torch.einsum("tkh,tkjh->tkj", xs, gathered)
    else:
        h = torch.einsum("th,tkjh->tkj", x, gathered)
    if b13 is not None:
        h = h + b13[ids]
    return h


def batched_second_matmul(a, x, w2, topk_weights, topk_ids, *, config, b2=None):
    """out [T, H] = sum_k w_tk * (a_tk @ w2[id_tk]^T + b2) (no weight when weights_on_input)."""
    ids = topk_ids.long()
    y = torch.einsum("tki,tkhi->tkh", a, w2[ids])  # [T, K, H]
    if b2 is not None:
        y = y + b2[ids]
    if not config.weights_on_input:
        y = y.float() * topk_weights.unsqueeze(-1)
    return y.float().sum(dim=1).to(x.dtype)


@register_impl(
    "batched",
    level=1,
    description="gather each token's K expert weights, two einsums; memory O(T*K*H*I)",
    auto_priority=-40,
)
def batched_experts(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None):
    """x [T, H] -> [T, H]; raises torch.OutOfMemoryError when the gathered weights do not fit."""
    h = batched_first_matmul(x, w13, topk_weights, topk_ids, config=config, b13=b13)
    a = act_and_mul_torch(h, config)
    return batched_second_matmul(a, x, w2, topk_weights, topk_ids, config=config, b2=b2)
