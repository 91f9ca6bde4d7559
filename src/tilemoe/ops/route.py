"""route_triton: the routing step (scores, top-k, renormalisation, scaling) as one Triton kernel.

``tilemoe.routing.route`` is its reference; ids match it exactly (ties to the lower index). Grouped
routings (``sigmoid_grouped_topk``, ``softmax_grouped_topk``) are not in the kernel yet: they go through
``tilemoe.routing.route`` (sync-free on CUDA too), so every routing works through this entry point.
"""

from __future__ import annotations

import os

import torch

from tilemoe.config import MoEConfig
from tilemoe.routing import route

__all__ = ["route_triton"]

_SCORE_CODES = {"softmax_topk": 0, "topk_softmax": 1, "sigmoid_top1_input_scaled": 2}


def route_triton(
    logits: torch.Tensor, config: MoEConfig, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens: logits [T, E] (any float dtype) -> (topk_weights [T, K] float32, topk_ids [T, K] int32).

    Same result as ``tilemoe.routing.route(logits, config, correction_bias=...)``. Raises ValueError /
    TypeError on a wrong shape or dtype (as ``route`` does).
    """
    on_triton = logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if (
        config.routing not in _SCORE_CODES
        or not on_triton
        or logits.dtype == torch.float64
        or logits.dim() != 2
        or logits.shape[-1] != config.num_experts
        or not logits.is_floating_point()
    ):
        return route(logits, config, correction_bias=correction_bias)  # grouped routings; also raises
    return _route_op(
        logits, config.top_k, _SCORE_CODES[config.routing], config.renormalize, float(config.routed_scaling_factor)
    )


@torch.library.custom_op("tilemoe::route", mutates_args=())
def _route_op(
    logits: torch.Tensor, top_k: int, score: int, renormalize: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from tilemoe.ops._kernels._route import _route_kernel

    num_tokens, num_experts = logits.shape
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    _route_kernel[(num_tokens,)](
        logits_ptr=logits,
        stride_lt=logits.stride(0),
        stride_le=logits.stride(1),
        weights_ptr=weights,
        ids_ptr=ids,
        num_experts=num_experts,
        scale=scale,
        TOP_K=top_k,
        SCORE=score,
        RENORMALIZE=renormalize,
        BLOCK_E=max(16, 1 << (num_experts - 1).bit_length()),
        BLOCK_K=max(2, 1 << (top_k - 1).bit_length()),
        num_warps=1 if num_experts <= 128 else 4,
    )
    return weights, ids


@_route_op.register_fake
def _(logits, top_k, score, renormalize, scale):
    shape = (logits.shape[0], top_k)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int32)
