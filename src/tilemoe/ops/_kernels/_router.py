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
