"""route_triton: the routing step (scores, top-k, groups, renormalisation, scaling) as one Triton kernel.

``tilemoe.routing.route`` is its reference; ids match it exactly (ties to the lower index). Every routing of
``tilemoe.config.ROUTINGS`` runs in a kernel, one program per token, with no host synchronisation:

    softmax_topk, topk_softmax, sigmoid_top1_input_scaled   ``_route_kernel`` (flat top-k over the E experts)
    sigmoid_grouped_topk, softmax_grouped_topk             ``_grouped_route_kernel`` (score + correction bias,
                                                           group scores, keep topk_group groups, top-k inside)

On CPU tensors without the Triton interpreter (``TRITON_INTERPRET=1``), and for float64 logits, it is
``tilemoe.routing.route`` itself.
"""

from __future__ import annotations

import os

import torch

from tilemoe.config import MoEConfig
from tilemoe.ops._launch import pdl_options
from tilemoe.ops.router import router_logit_parts, router_logits_fast, uses_router_parts
from tilemoe.routing import route

__all__ = ["route_fast", "route_tokens", "route_triton"]

_SCORE_CODES = {"softmax_topk": 0, "topk_softmax": 1, "sigmoid_top1_input_scaled": 2}
# The most experts the flat routing kernel takes: its sums are int64 fixed point with 2**48 a unit
# (``_route._order_free_sum``), terms at most 1. Past it the flat routings are torch's (``tilemoe.routing.route``).
FLAT_ROUTE_MAX_EXPERTS = 2**15
# grouped routings: (score: 0 softmax / 1 sigmoid, group score: 0 sum of the best two / 1 the best)
_GROUPED_CODES = {"sigmoid_grouped_topk": (1, 0), "softmax_grouped_topk": (0, 1)}


def route_triton(
    logits: torch.Tensor, config: MoEConfig, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens: logits [T, E] (any float dtype) -> (topk_weights [T, K] float32, topk_ids [T, K] int32).

    Same result as ``tilemoe.routing.route(logits, config, correction_bias=...)``: ``correction_bias`` [E]
    (any float dtype, moved to the logits' device) moves the choice of a grouped routing and is ignored by
    the others. Raises ValueError / TypeError on a wrong shape or dtype (as ``route`` does).
    """
    on_triton = logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if (
        not on_triton
        or logits.dtype == torch.float64
        or logits.dim() != 2
        or logits.shape[-1] != config.num_experts
        or not logits.is_floating_point()
    ):
        return route(logits, config, correction_bias=correction_bias)  # also raises on bad input
    return _route_kernels(logits, config, correction_bias)


def _route_kernels(
    logits: torch.Tensor, config: MoEConfig, correction_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``route_triton``'s kernels on logits [T, E] or float32 parts [P, T, E] (summed as loaded)."""
    scale = float(config.routed_scaling_factor)
    if config.routing in _SCORE_CODES and config.num_experts > FLAT_ROUTE_MAX_EXPERTS:
        return route(logits if logits.dim() == 2 else logits.sum(0), config, correction_bias=correction_bias)
    if config.routing in _SCORE_CODES:
        return _route_op(logits, config.top_k, _SCORE_CODES[config.routing], config.renormalize, scale)
    if correction_bias is not None:
        if correction_bias.shape != (config.num_experts,):
            raise ValueError(
                f"correction_bias: expected shape [{config.num_experts}], got {list(correction_bias.shape)}"
            )
        correction_bias = correction_bias.to(logits.device)
    score, group_score = _GROUPED_CODES[config.routing]
    return _grouped_route_op(
        logits,
        correction_bias,
        config.top_k,
        config.n_group,
        config.topk_group,
        score,
        group_score,
        config.renormalize,
        scale,
    )


def route_fast(
    logits: torch.Tensor, config: MoEConfig, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing every layer uses (``moe_forward``, ``MoE``, the EP layer, the bench's timed layer): the Triton
    kernel for CUDA logits, ``tilemoe.routing.route`` elsewhere (the interpreter would only be slower on the CPU;
    tests call ``route_triton`` there). Same arguments, result and errors as ``route``."""
    if logits.is_cuda:
        return route_triton(logits, config, correction_bias=correction_bias)
    return route(logits, config, correction_bias=correction_bias)


def route_tokens(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    config: MoEConfig,
    *,
    router_bias: torch.Tensor | None = None,
    correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router GEMM and the routing of x [T, H]: (topk_weights [T, K] float32, topk_ids [T, K] int32), what
    ``route_fast(router_logits_fast(x, router_weight, router_bias), config, correction_bias=...)`` gives, the router's
    float32 sums taken in another order. Where ``uses_router_parts`` (16-bit x and weight on CUDA, a prefill batch)
    the GEMM runs split over H on the tensor cores (``router_logit_parts``) and the routing kernel sums the parts as
    it loads them: no [T, E] logits are written, and no cuBLAS call is made.

    router_weight [E, H], router_bias [E] (optional), correction_bias [E] (grouped routings), E = config.num_experts.
    Raises ValueError / TypeError naming the argument on a wrong shape, dtype or device.
    """
    weight_shape = tuple(router_weight.shape) if isinstance(router_weight, torch.Tensor) else None
    if weight_shape is not None and len(weight_shape) == 2 and weight_shape[0] != config.num_experts:
        raise ValueError(
            f"router_weight: expected {config.num_experts} rows (config.num_experts), got shape {list(weight_shape)}"
        )
    if not (isinstance(x, torch.Tensor) and uses_router_parts(x, router_weight)):
        logits = router_logits_fast(x, router_weight, router_bias)
        return route_fast(logits, config, correction_bias=correction_bias)
    return _route_kernels(router_logit_parts(x, router_weight, router_bias), config, correction_bias)


# Tokens a program of the flat routing kernel (one warp): one up to ROUTE_TOKENS_MIN_T - 1 tokens, then
# ROUTE_PICKS_A_PROGRAM // top_k (1 to ROUTE_TOKENS_MOST). Measured on an H100 (bench/route_program_probe.py, CUDA
# graphs in turn, session 25; 1 / 2 / 4 / 8 tokens a program): qwen3-30b-a3b (K = 8) best at one at T = 1024, 4096 and
# 16384 (13.0 us at 16384, 13.2 at two); gpt-oss-120b (K = 4) T=16384 11.7 -> 8.0 us at two (8.5 at four);
# mixtral-8x7b (K = 2) T=16384 11.4 -> 6.0 us at four (7.2 at two, 6.9 at eight). Grids of 4096 programs or fewer
# were not timed for K < 8, so they keep one. ROUTE_TOKENS_FORCED (a development tool's override): that many always.
ROUTE_TOKENS_MIN_T = 4097
ROUTE_PICKS_A_PROGRAM = 8
ROUTE_TOKENS_MOST = 4
ROUTE_TOKENS_FORCED: int | None = None


def route_tokens_per_program(num_tokens: int, top_k: int) -> int:
    """Tokens each program of the flat routing kernel routes, for T = ``num_tokens`` and K = ``top_k``."""
    if ROUTE_TOKENS_FORCED is not None:
        return ROUTE_TOKENS_FORCED
    if num_tokens < ROUTE_TOKENS_MIN_T:
        return 1
    return max(1, min(ROUTE_TOKENS_MOST, ROUTE_PICKS_A_PROGRAM // top_k))


def _pow2(n: int, least: int) -> int:
    return max(least, 1 << (n - 1).bit_length())


def _as_parts(logits: torch.Tensor) -> torch.Tensor:
    """[T, E] logits as one part [1, T, E]; [P, T, E] parts (summed by the kernels) as they are."""
    return logits.unsqueeze(0) if logits.dim() == 2 else logits


def _empty_outputs(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (logits.shape[-2], top_k)
    weights = torch.empty(shape, dtype=torch.float32, device=logits.device)
    return weights, torch.empty(shape, dtype=torch.int32, device=logits.device)


@torch.library.custom_op("tilemoe::route", mutates_args=())
def _route_op(
    logits: torch.Tensor, top_k: int, score: int, renormalize: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from tilemoe.ops._kernels._route import _route_kernel

    parts = _as_parts(logits)
    num_parts, num_tokens, num_experts = parts.shape
    weights, ids = _empty_outputs(logits, top_k)
    if num_tokens == 0:
        return weights, ids
    tokens = route_tokens_per_program(num_tokens, top_k)
    _route_kernel[((num_tokens + tokens - 1) // tokens,)](
        **pdl_options(logits.device),
        num_tokens=num_tokens,
        TOKENS=tokens,
        logits_ptr=parts,
        stride_lp=parts.stride(0),
        stride_lt=parts.stride(1),
        stride_le=parts.stride(2),
        weights_ptr=weights,
        ids_ptr=ids,
        num_parts=num_parts,
        num_experts=num_experts,
        scale=scale,
        TOP_K=top_k,
        SCORE=score,
        RENORMALIZE=renormalize,
        BLOCK_PARTS=_pow2(num_parts, 1),
        BLOCK_E=_pow2(num_experts, 16),
        BLOCK_K=_pow2(top_k, 2),
        num_warps=1 if num_experts <= 128 else 4,
    )
    return weights, ids


@_route_op.register_fake
def _(logits, top_k, score, renormalize, scale):
    shape = (logits.shape[-2], top_k)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op("tilemoe::grouped_route", mutates_args=())
def _grouped_route_op(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    score: int,
    group_score: int,
    renormalize: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from tilemoe.ops._kernels._route import _grouped_route_kernel

    parts = _as_parts(logits)
    num_parts, num_tokens, num_experts = parts.shape
    weights, ids = _empty_outputs(logits, top_k)
    if num_tokens == 0:
        return weights, ids
    per_group = num_experts // n_group
    if per_group == 1:
        group_score = 1  # the two best of a one-expert group are that expert alone: its best
    has_bias = correction_bias is not None
    # the tile is at least 2 x 16: size-1 block dimensions are avoided on every Triton version
    block_g, block_p = _pow2(n_group, 2), _pow2(per_group, 16)
    _grouped_route_kernel[(num_tokens,)](
        **pdl_options(logits.device),
        logits_ptr=parts,
        stride_lp=parts.stride(0),
        stride_lt=parts.stride(1),
        stride_le=parts.stride(2),
        bias_ptr=correction_bias if has_bias else logits,  # not read without a bias
        stride_be=correction_bias.stride(0) if has_bias else 0,
        weights_ptr=weights,
        ids_ptr=ids,
        num_parts=num_parts,
        scale=scale,
        TOP_K=top_k,
        N_GROUP=n_group,
        PER_GROUP=per_group,
        TOPK_GROUP=topk_group,
        SCORE=score,
        GROUP_SCORE=group_score,
        HAS_BIAS=has_bias,
        RENORMALIZE=renormalize,
        BLOCK_PARTS=_pow2(num_parts, 1),
        BLOCK_G=block_g,
        BLOCK_P=block_p,
        BLOCK_K=_pow2(top_k, 2),
        num_warps=1 if block_g * block_p <= 128 else 4,
    )
    return weights, ids


@_grouped_route_op.register_fake
def _(logits, correction_bias, top_k, n_group, topk_group, score, group_score, renormalize, scale):
    shape = (logits.shape[-2], top_k)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int32)
