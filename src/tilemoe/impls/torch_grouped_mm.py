"""tilemoe's first own rung: both expert matmuls as single grouped GEMMs (``torch.nn.functional.grouped_mm``).

What changes from level 4: the E per-expert matmuls become one grouped-GEMM kernel per weight (cuBLAS /
CUTLASS grouped GEMM on sm90+), driven by the per-expert row offsets on the device. Nothing reads the counts
back to the host, so the whole layer is a fixed sequence of about ten kernels: no sync, and it can be
captured in a CUDA graph as is.

The grouped GEMM is ``tilemoe.ops.grouped_mm.grouped_matmul`` (``F.grouped_mm`` / ``torch._grouped_mm``,
odd sizes padded to 16-byte strides). Available where a tiny probe call succeeds on the default device (CUDA
when present, else CPU), cached.
"""

from __future__ import annotations

import torch

from tilemoe.impls._registry import register_impl
from tilemoe.impls.grouped import sort_by_expert
from tilemoe.impls.memeff import _act
from tilemoe.ops.grouped_mm import grouped_matmul, grouped_mm_available


@register_impl(
    "torch_grouped_mm",
    description="rows sorted by expert, each weight one grouped GEMM (F.grouped_mm); no host sync",
    auto_priority=50,
    is_available=grouped_mm_available,
)
def torch_grouped_mm_experts(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None):
    num_experts = w13.shape[0]
    order, token_of_row, counts = sort_by_expert(topk_ids, num_experts)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    expert_of_row = topk_ids.reshape(-1).long()[order]
    weight_of_row = topk_weights.reshape(-1)[order].unsqueeze(1)
    rows = x[token_of_row]
    if config.weights_on_input:
        rows = (rows * weight_of_row).to(x.dtype)
    h = grouped_matmul(rows, w13, offs)
    if b13 is not None:
        h += b13[expert_of_row]
    y = grouped_matmul(_act(x)(h, config), w2, offs)
    if b2 is not None:
        y += b2[expert_of_row]
    y = y.float()
    if not config.weights_on_input:
        y *= weight_of_row
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of_row, y)
    return out.to(x.dtype)
