"""Level 2 of the ladder: level 1 with act(gate) * up fused into one Triton kernel.

What changes from level 1: PyTorch computes ``silu(gate) * up`` as separate elementwise kernels, each reading
and writing a [T, K, I] tensor (split views, the activation, the product). The fused kernel
(``tilemoe.ops.act_and_mul``) reads h once and writes the result once: about a third of the activation
traffic, and fewer launches. The weight gather of level 1 is kept, so memory is still O(T*K*H*I).

Available where Triton kernels run: with CUDA, or on CPU under ``TRITON_INTERPRET=1`` (tests only).
"""

from __future__ import annotations

from tilemoe.impls._registry import register_impl
from tilemoe.impls.batched import batched_first_matmul, batched_second_matmul
from tilemoe.ops.act_and_mul import act_and_mul, triton_kernels_available


@register_impl(
    "fused_act",
    level=2,
    description="level 1 + a Triton kernel for act(gate)*up (one read of h, one write)",
    auto_priority=-30,
    is_available=triton_kernels_available,
)
def fused_act_experts(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None):
    h = batched_first_matmul(x, w13, topk_weights, topk_ids, config=config, b13=b13)
    t, k, rows = h.shape
    a = act_and_mul(h.view(t * k, rows), config).view(t, k, config.intermediate_size)
    return batched_second_matmul(a, x, w2, topk_weights, topk_ids, config=config, b2=b2)
