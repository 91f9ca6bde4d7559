"""Level 0 of the ladder: a Python loop over tokens and their K experts.

Each (token, slot) pair runs its expert's MLP on a single row: T*K tiny matrix-vector products, each one a
separate round of kernel launches. It is the starting point of `tilemoe journey`: easy to read, and slow
because the work is split into T*K pieces far too small to keep any device busy.
"""

from __future__ import annotations

import torch

from tilemoe.impls._registry import register_impl
from tilemoe.ops.activation import act_and_mul_torch


@register_impl(
    "naive",
    level=0,
    description="Python loop over tokens and their top-k experts, one matrix-vector product each",
    auto_priority=-50,
)
def naive_experts(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None):
    """x [T, H], w13 [E, 2I|I, H], w2 [E, H, I], topk [T, K] -> [T, H] in x.dtype."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    ids = topk_ids.tolist()  # one host read up front instead of one per pair
    for t in range(x.shape[0]):
        for k, expert in enumerate(ids[t]):
            weight = topk_weights[t, k]
            row = x[t]
            if config.weights_on_input:
                row = (row.float() * weight).to(x.dtype)
            h = w13[expert] @ row
            if b13 is not None:
                h = h + b13[expert]
            y = w2[expert] @ act_and_mul_torch(h, config)
            if b2 is not None:
                y = y + b2[expert]
            out[t] += y.float() if config.weights_on_input else y.float() * weight
    return out.to(x.dtype)
