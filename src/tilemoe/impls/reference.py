"""The reference: every (token, expert) pair computed on its own in float64.

Deliberately simple, so that it is obviously right; every fast path is tested against it.
"""

from __future__ import annotations

import torch

from tilemoe.config import MoEConfig
from tilemoe.impls._registry import register_impl
from tilemoe.ops.activation import act_and_mul_torch


def reference_experts_fp64(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    config: MoEConfig,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts in float64: returns [T, H] float64. Loops over experts; picks rows by mask."""
    f64 = torch.float64
    x64 = x.to(f64)
    weights = topk_weights.to(f64)
    ids = topk_ids.long()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=f64, device=x.device)
    for expert in range(w13.shape[0]):
        token_idx, slot_idx = torch.nonzero(ids == expert, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        rows = x64[token_idx]
        w = weights[token_idx, slot_idx].unsqueeze(1)
        if config.weights_on_input:
            rows = rows * w
        h = rows @ w13[expert].to(f64).t()
        if b13 is not None:
            h = h + b13[expert].to(f64)
        a = act_and_mul_torch(h, config)
        y = a @ w2[expert].to(f64).t()
        if b2 is not None:
            y = y + b2[expert].to(f64)
        if not config.weights_on_input:
            y = y * w
        out.index_add_(0, token_idx, y)
    return out


@register_impl(
    "reference",
    description="float64 per-expert loop: the oracle every implementation is tested against",
    auto_priority=-100,
)
def reference_experts(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None):
    out = reference_experts_fp64(x, w13, w2, topk_weights, topk_ids, config=config, b13=b13, b2=b2)
    return out.to(x.dtype)
