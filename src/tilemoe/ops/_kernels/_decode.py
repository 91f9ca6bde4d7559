"""Triton kernels of the decode path of the fused expert MLP: no alignment, no padding, no combine launch.

With few slots (S = T*K small) the expert weights are the bytes; these kernels read each weight row of the
experts hit once per slot, spread over many programs, and do the arithmetic on the CUDA cores (tl.dot needs 16
rows; here a slot is one row).
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
    out          [T, H]        the layer output: per-slot rows summed over K inside the program, in pick order
Roundings follow the tiled kernels: gate / up rounded to the operand dtype before the activation, each slot's
GEMM 2 row rounded to the operand dtype before the sum over K (deterministic; no atomics).
"""

import triton
import triton.language as tl

from tilemoe.ops._kernels._activation import _activate, _up_factor


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
    topk_weights_ptr,
    topk_ids_ptr,
    act_ptr,
    stride_as,
    stride_ai,
    top_k,
    hidden,
    inter,
    swiglu_alpha,
    swiglu_limit,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WEIGHTS_ON_INPUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    slot = tl.program_id(0)
    token = (slot // top_k).to(tl.int64)
    expert = tl.load(topk_ids_ptr + slot).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < inter
    ks = tl.arange(0, BLOCK_K)
    dtype = act_ptr.dtype.element_ty
    if WEIGHTS_ON_INPUT:
        row_weight = tl.load(topk_weights_ptr + slot)
    g_ptrs = w_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wn + ks[None, :] * stride_wh
    u_ptrs = g_ptrs + inter * stride_wn
    x_ptrs = x_ptr + token * stride_xt + ks * stride_xh
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, tl.cdiv(hidden, BLOCK_K)):
        k_mask = ks < hidden - k0 * BLOCK_K
        a = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)
        if WEIGHTS_ON_INPUT:  # scaled then rounded, as the tiled kernel feeds its dot
            a = (a * row_weight).to(dtype).to(tl.float32)
        w_mask = col_mask[:, None] & k_mask[None, :]
        acc_g += tl.sum(tl.load(g_ptrs, mask=w_mask, other=0.0).to(tl.float32) * a[None, :], axis=1)
        if GATED:
            acc_u += tl.sum(tl.load(u_ptrs, mask=w_mask, other=0.0).to(tl.float32) * a[None, :], axis=1)
        x_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_wh
        u_ptrs += BLOCK_K * stride_wh

    if HAS_BIAS:
        b_row = b_ptr + expert * stride_be
        acc_g += tl.load(b_row + cols * stride_bn, mask=col_mask, other=0.0).to(tl.float32)
        if GATED:
            acc_u += tl.load(b_row + (cols + inter) * stride_bn, mask=col_mask, other=0.0).to(tl.float32)
    result = _activate(acc_g.to(dtype).to(tl.float32), ACTIVATION, swiglu_alpha, swiglu_limit)
    if GATED:
        result = result * _up_factor(acc_u.to(dtype).to(tl.float32), ACTIVATION, swiglu_limit)
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
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    dtype = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for pick in range(0, top_k):
        slot = token * top_k + pick
        expert = tl.load(topk_ids_ptr + slot).to(tl.int64)
        a_ptrs = act_ptr + slot.to(tl.int64) * stride_as + ks * stride_ai
        w_ptrs = w_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wh + ks[None, :] * stride_wi
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, tl.cdiv(inter, BLOCK_K)):
            k_mask = ks < inter - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * a[None, :], axis=1)
            a_ptrs += BLOCK_K * stride_ai
            w_ptrs += BLOCK_K * stride_wi
        if HAS_BIAS:
            acc += tl.load(b_ptr + expert * stride_be + cols * stride_bh, mask=col_mask, other=0.0).to(tl.float32)
        if not WEIGHTS_ON_INPUT:
            acc = acc * tl.load(topk_weights_ptr + slot)
        total += acc.to(dtype).to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + cols * stride_oh, total.to(dtype), mask=col_mask)
