"""Level 3 of the ladder: loop over experts, each on the rows routed to it; no gathered weights.

What changes from level 2: instead of copying each token's expert weights (O(T*K*H*I) memory and bytes),
every expert multiplies the rows that chose it by its own weights in place. Intermediate tensors are only
what the math needs: the rows of one expert ([n_e, H]), its hidden activations ([n_e, 2I] then [n_e, I]),
its output ([n_e, H]); the weighting happens in place and the rows are added straight into the output.
Memory is O(T*K*I) at most, the weights are read once, and large T no longer runs out of memory.

It pays for that with E small loops, each finding its rows with a mask (``nonzero``), which reads the ids
E times and synchronises with the host E times; level 4 replaces the E searches with one sort.
"""

from __future__ import annotations

import torch

from tilemoe.impls._registry import register_impl
from tilemoe.ops.activation import act_and_mul_torch


def expert_mlp(rows, w13_e, w2_e, config, b13_e=None, b2_e=None, act=act_and_mul_torch):
    """One expert on its rows [n, H] -> [n, H], biases added in place."""
    h = rows @ w13_e.t()
    if b13_e is not None:
        h += b13_e
    y = act(h, config) @ w2_e.t()
    if b2_e is not None:
        y += b2_e
    return y


def _act(x: torch.Tensor):
    """The fused Triton activation of level 2 on CUDA; PyTorch's elsewhere (the interpreter is too slow)."""
    if x.is_cuda:
        from tilemoe.ops.act_and_mul import act_and_mul

        return act_and_mul
    return act_and_mul_torch


@register_impl(
    "memeff",
    level=3,
    description="loop over experts on the rows routed to each (masks), no gathered weights: O(T*K*I) memory",
    auto_priority=-20,
)
def memeff_experts(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None):
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    act = _act(x)
    for expert in range(w13.shape[0]):
        token_idx, slot_idx = torch.nonzero(topk_ids == expert, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        weight = topk_weights[token_idx, slot_idx].unsqueeze(1)
        rows = x[token_idx]
        if config.weights_on_input:
            rows = (rows * weight).to(x.dtype)
        y = expert_mlp(
            rows,
            w13[expert],
            w2[expert],
            config,
            None if b13 is None else b13[expert],
            None if b2 is None else b2[expert],
            act,
        ).float()
        if not config.weights_on_input:
            y *= weight
        out.index_add_(0, token_idx, y)
    return out.to(x.dtype)
