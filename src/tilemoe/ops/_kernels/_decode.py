"""Triton kernels of the decode path of the fused expert MLP: no alignment, no padding rows.

With few slots (S = T*K small) the expert weights are the bytes. GEMM 1 runs one program per (slot, column
block); GEMM 2 one program per (token, column block) that walks the token's K picks and sums them in its
accumulator; the launcher runs it with top_k = 1 over the slots by default (one program per (slot, column
block), the K rows summed after: faster at every point timed, ``_fused_experts_launch.DECODE_GEMM2_PER_SLOT``).
Each program feeds the tensor cores a 16-row tile whose row 0 is the slot (the other rows are masked, so they
cost no memory traffic): tl.dot keeps the weight loads software-pipelined, which plain
multiply-and-sum loops on the CUDA cores did not (bench/NOTES.md, version 3).
Dimension letters: T tokens, K top-k, E experts, H hidden, I expert intermediate; S = T*K slots (slot s is
token s // K, its pick s % K).
    x            [T, H]        activations
    w13          [E, N1, H]    gate rows [0, I) then up rows [I, 2I) (N1 = 2I; N1 = I when GATED is False)
    b13          [E, N1]       optional
    w2           [E, H, I]
    b2           [E, H]        optional
    topk_weights [S]           float32 routing weight of each slot
    topk_ids     [S]           int32 expert of each slot
    act          [S, I]        GEMM 1 output, one row per slot
    out          [T, H]        the layer output
    logits       [T, E]        router logits: with ROUTE, GEMM 1 routes each slot's token itself (a flat routing,
                               ``_route._flat_topk``, the routing kernel's own function) and writes topk_weights /
                               topk_ids for GEMM 2 and the caller: one launch less than routing first
GEMM 2 scales each pick's act row by its routing weight before the dot (rounded to the operand dtype), so one
float32 accumulator holds the sum over K, in pick order: deterministic, no atomics.
"""

import triton
import triton.language as tl

from tilemoe.ops._kernels._activation import _activate, _up_factor
from tilemoe.ops._kernels._fused_experts import _dot
from tilemoe.ops._kernels._pdl import _pdl_prologue
from tilemoe.ops._kernels._route import _flat_topk


@triton.jit
def _row0(tile, ROWS: tl.constexpr):
    """Row 0 of a [ROWS, N] tile (16 rows: the smallest M of a tensor-core dot; row 0 carries the slot), as [N]."""
    return tl.sum(tl.where((tl.arange(0, ROWS) == 0)[:, None], tile, 0.0), axis=0)


@triton.jit
def _decode_gemm1_kernel(
    x_ptr,
    stride_xt,
    stride_xh,
    w_ptr,
    stride_we,
    stride_wn,
    stride_wh,
    b_ptr,
    stride_be,
    stride_bn,
    topk_weights_ptr,  # with ROUTE: written here (the weight of each slot, for GEMM 2 and the caller)
    topk_ids_ptr,  # with ROUTE: written here
    logits_ptr,  # [T, E] router logits (ROUTE only)
    stride_lt,
    stride_le,
    act_ptr,
    stride_as,
    stride_ai,
    top_k,
    num_experts,
    route_scale,
    hidden,
    inter,
    swiglu_alpha,
    swiglu_limit,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WEIGHTS_ON_INPUT: tl.constexpr,
    FP32_PRECISE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROUTE: tl.constexpr,  # route the slot's token from its logits here (a flat routing; no routing launch)
    ROUTE_TOP_K: tl.constexpr,  # top_k again, as a constexpr (ROUTE only)
    ROUTE_SCORE: tl.constexpr,  # _flat_topk's SCORE
    ROUTE_RENORMALIZE: tl.constexpr,
    ROUTE_BLOCK_E: tl.constexpr,
    ROUTE_BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_prologue(PDL)
    slot = tl.program_id(0)
    token = (slot // top_k).to(tl.int64)
    if ROUTE:  # every program of the slot routes its token (E logits from L2); the first column block stores it
        weights, ids = _flat_topk(
            logits_ptr + token * stride_lt, stride_le, num_experts, ROUTE_TOP_K, ROUTE_SCORE, ROUTE_RENORMALIZE,
            ROUTE_BLOCK_E, ROUTE_BLOCK_K,
        )  # fmt: skip
        mine = tl.arange(0, ROUTE_BLOCK_K) == slot % top_k
        expert = tl.sum(tl.where(mine, ids, 0), axis=0).to(tl.int64)
        slot_weight = tl.sum(tl.where(mine, weights, 0.0), axis=0) * route_scale
        if tl.program_id(1) == 0:
            tl.store(topk_ids_ptr + slot, expert.to(tl.int32))
            tl.store(topk_weights_ptr + slot, slot_weight)
    else:
        expert = tl.load(topk_ids_ptr + slot).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < inter
    ks = tl.arange(0, BLOCK_K)
    first_row = (tl.arange(0, 16) == 0)[:, None]
    dtype = act_ptr.dtype.element_ty
    if WEIGHTS_ON_INPUT:
        if ROUTE:
            row_weight = slot_weight
        else:
            row_weight = tl.load(topk_weights_ptr + slot)
    a_ptrs = x_ptr + token * stride_xt + (ks * stride_xh)[None, :] + tl.zeros([16, 1], dtype=tl.int64)
    g_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wh
    u_ptrs = g_ptrs + inter * stride_wn
    acc_g = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, tl.cdiv(hidden, BLOCK_K)):
        k_mask = ks < hidden - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=first_row & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        acc_g = _dot(a, tl.load(g_ptrs, mask=w_mask, other=0.0), acc_g, FP32_PRECISE)
        if GATED:
            acc_u = _dot(a, tl.load(u_ptrs, mask=w_mask, other=0.0), acc_u, FP32_PRECISE)
        a_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_wh
        u_ptrs += BLOCK_K * stride_wh

    g = _row0(acc_g, 16)
    if WEIGHTS_ON_INPUT:  # on the float32 sums, as the tiled kernel does
        g = g * row_weight
    if HAS_BIAS:
        b_row = b_ptr + expert * stride_be
        g += tl.load(b_row + cols * stride_bn, mask=col_mask, other=0.0).to(tl.float32)
    result = _activate(g.to(dtype).to(tl.float32), ACTIVATION, swiglu_alpha, swiglu_limit)
    if GATED:
        u = _row0(acc_u, 16)
        if WEIGHTS_ON_INPUT:
            u = u * row_weight
        if HAS_BIAS:
            u += tl.load(b_row + (cols + inter) * stride_bn, mask=col_mask, other=0.0).to(tl.float32)
        result = result * _up_factor(u.to(dtype).to(tl.float32), ACTIVATION, swiglu_limit)
    tl.store(act_ptr + slot * stride_as + cols * stride_ai, result.to(dtype), mask=col_mask)


@triton.jit
def _decode_gemm2_kernel(
    act_ptr,
    stride_as,
    stride_ai,
    w_ptr,
    stride_we,
    stride_wh,
    stride_wi,
    b_ptr,
    stride_be,
    stride_bh,
    topk_weights_ptr,
    topk_ids_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    top_k,
    hidden,
    inter,
    HAS_BIAS: tl.constexpr,
    WEIGHTS_ON_INPUT: tl.constexpr,
    FP32_PRECISE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_prologue(PDL)
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    first_row = (tl.arange(0, 16) == 0)[:, None]
    dtype = out_ptr.dtype.element_ty
    num_k = tl.cdiv(inter, BLOCK_K)
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    # one flat loop over (pick, k-step): the pipeliner keeps the weight loads of the next pick in flight
    for step in range(0, top_k * num_k):
        pick = step // num_k
        k0 = (step % num_k) * BLOCK_K
        slot = token * top_k + pick
        expert = tl.load(topk_ids_ptr + slot).to(tl.int64)
        k_mask = ks < inter - k0
        a = tl.load(
            act_ptr + slot.to(tl.int64) * stride_as + ((k0 + ks) * stride_ai)[None, :] + tl.zeros([16, 1], tl.int64),
            mask=first_row & k_mask[None, :],
            other=0.0,
        )
        if not WEIGHTS_ON_INPUT:
            a = (a.to(tl.float32) * tl.load(topk_weights_ptr + slot)).to(dtype)
        w_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wh + (k0 + ks)[:, None] * stride_wi
        acc = _dot(a, tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0), acc, FP32_PRECISE)
    total = _row0(acc, 16)
    if HAS_BIAS:
        for pick in range(0, top_k):
            slot = token * top_k + pick
            expert = tl.load(topk_ids_ptr + slot).to(tl.int64)
            b = tl.load(b_ptr + expert * stride_be + cols * stride_bh, mask=col_mask, other=0.0).to(tl.float32)
            if not WEIGHTS_ON_INPUT:
                b = b * tl.load(topk_weights_ptr + slot)
            total += b
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + cols * stride_oh, total.to(dtype), mask=col_mask)
