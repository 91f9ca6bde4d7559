"""Level 4 of the ladder: sort the (token, slot) pairs by expert once, then one matmul per expert.

What changes from level 3: one stable sort of the T*K expert ids replaces E mask searches. Rows that go to
the same expert become one contiguous slice of a single gathered input, so each expert is one plain matmul on
a slice (no per-expert indexing kernels), the per-expert counts reach the host in one read instead of E, and
the outputs are weighted and added back with one ``index_add_`` for the whole layer.

The helpers here (``sort_by_expert``, ``grouped_forward``) are reused by levels 5 and 6 and by
``torch_grouped_mm``.
"""

from __future__ import annotations

import torch

from tilemoe.impls._registry import register_impl
from tilemoe.impls.memeff import _act, expert_mlp


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order of the T*K (token, slot) pairs grouped by expert.

    Returns (order [T*K] int64: flat pair index, sorted by expert, stable; token_of_row [T*K] int64: the
    token of each sorted row; counts [E] int64: rows per expert).
    """
    flat = topk_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True)[1]
    token_of_row = order // topk_ids.shape[1]
    # scatter_add, not bincount: bincount reads the max id back to the host, which breaks CUDA-graph capture
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return order, token_of_row, counts


def grouped_forward(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None, counts_host=None):
    """Level-4 forward. ``counts_host``: per-expert row counts already on the host (skips the device read)."""
    num_experts = w13.shape[0]
    order, token_of_row, counts = sort_by_expert(topk_ids, num_experts)
    weight_of_row = topk_weights.reshape(-1)[order].unsqueeze(1)
    rows = x[token_of_row]
    if config.weights_on_input:
        rows = (rows * weight_of_row).to(x.dtype)
    y = torch.empty_like(rows)
    act = _act(x)
    counts_list = counts.tolist() if counts_host is None else counts_host
    start = 0
    for expert, n in enumerate(counts_list):
        if n == 0:
            continue
        stop = start + n
        y[start:stop] = expert_mlp(
            rows[start:stop],
            w13[expert],
            w2[expert],
            config,
            None if b13 is None else b13[expert],
            None if b2 is None else b2[expert],
            act,
        )
        start = stop
    y = y.float()
    if not config.weights_on_input:
        y *= weight_of_row
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of_row, y)
    return out.to(x.dtype)


@register_impl(
    "grouped",
    level=4,
    description="sort rows by expert once, one matmul per expert on contiguous slices, one index_add",
    auto_priority=10,
)
def grouped_experts(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None):
    return grouped_forward(x, w13, w2, topk_weights, topk_ids, config=config, b13=b13, b2=b2)
