"""Triton kernel: the router GEMM of a few tokens, logits[t, e] = x[t] . weight[e] (+ bias[e]), float32.

Dimension letters: T tokens, E experts, H hidden.
    x       [T, H]  any float dtype (read as is, multiplied in float32)
    weight  [E, H]  any float dtype
    bias    [E]     optional
    logits  [T, E]  float32
One program per (block of BLOCK_E experts, token); the products are summed on the CUDA cores in float32 over H in
chunks of BLOCK_H. For a few tokens this is a stream of the E*H router weights: many small programs, each with a
few long loads in flight, move it faster than a tensor-core tile (cuBLAS took 4-6 us for T=1, E=128, H=2048 on
an H100; bench/NOTES.md, "Router GEMM"). The T programs of one expert block re-read its rows from L2.

``_router_parts_kernel``: the router GEMM of a prefill batch (16-bit x and weight) on the tensor cores, split over
H into P parts so that a few hundred tokens still fill the GPU:
    parts   [P, T, E]  float32; part p holds the products of H columns [p * h_per_part, (p + 1) * h_per_part),
                       part 0 the bias too: logits = parts summed over P (the routing kernels sum them as they load)
One program per (block of BLOCK_T tokens, part, block of BLOCK_E experts). 16-bit products are exact in float32 and
tl.dot accumulates in float32, so the parts' sum is the float32 GEMM of the reference up to the order of the sums.
"""

import triton
import triton.language as tl

from tilemoe.ops._kernels._pdl import _pdl_prologue


@triton.jit
def _router_logits_kernel(
    x_ptr,
    stride_xt,
    stride_xh,
    w_ptr,
    stride_we,
    stride_wh,
    b_ptr,
    logits_ptr,
    stride_lt,
    stride_le,
    num_experts,
    hidden,
    HAS_BIAS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_prologue(PDL)
    experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    token = tl.program_id(1).to(tl.int64)
    hs = tl.arange(0, BLOCK_H)
    e_mask = experts < num_experts
    x_ptrs = x_ptr + token * stride_xt + hs * stride_xh
    w_ptrs = w_ptr + experts[:, None].to(tl.int64) * stride_we + hs[None, :] * stride_wh
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        h_mask = hs < hidden - h0
        x = tl.load(x_ptrs, mask=h_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=e_mask[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
        x_ptrs += BLOCK_H * stride_xh
        w_ptrs += BLOCK_H * stride_wh
    if HAS_BIAS:
        acc += tl.load(b_ptr + experts, mask=e_mask, other=0.0).to(tl.float32)
    tl.store(logits_ptr + token * stride_lt + experts * stride_le, acc, mask=e_mask)


@triton.jit
def _router_parts_kernel(
    x_ptr,
    stride_xt,
    stride_xh,
    w_ptr,
    stride_we,
    stride_wh,
    b_ptr,
    parts_ptr,
    stride_pp,
    stride_pt,
    stride_pe,
    num_tokens,
    num_experts,
    hidden,
    h_per_part,  # a multiple of BLOCK_H
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_prologue(PDL)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    part = tl.program_id(1)
    experts = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    t_mask = tokens < num_tokens
    e_mask = experts < num_experts
    first_h = part * h_per_part
    hs = first_h + tl.arange(0, BLOCK_H)
    x_ptrs = x_ptr + tokens[:, None].to(tl.int64) * stride_xt + hs[None, :] * stride_xh
    w_ptrs = w_ptr + experts[:, None].to(tl.int64) * stride_we + hs[None, :] * stride_wh
    end_h = tl.minimum(first_h + h_per_part, hidden)
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for h0 in range(first_h, end_h, BLOCK_H):
        h_mask = hs < end_h - (h0 - first_h)
        x = tl.load(x_ptrs, mask=t_mask[:, None] & h_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=e_mask[:, None] & h_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_H * stride_xh
        w_ptrs += BLOCK_H * stride_wh
    if HAS_BIAS:
        bias = tl.load(b_ptr + experts, mask=e_mask, other=0.0).to(tl.float32)
        acc += tl.where(part == 0, bias, 0.0)[None, :]  # in part 0 alone
    out_ptrs = parts_ptr + part.to(tl.int64) * stride_pp + tokens[:, None].to(tl.int64) * stride_pt
    tl.store(out_ptrs + experts[None, :] * stride_pe, acc, mask=t_mask[:, None] & e_mask[None, :])
