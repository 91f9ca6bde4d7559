"""Triton kernel: the deterministic combine, out[t] = sum over k of per_slot[t*K + k], in a fixed order.

Dimension letters: T tokens, K top-k, H hidden; S = T*K slots (slot s = token s // K, its k-th pick s % K).
    per_slot [S, H]  each slot's expert output (already weighted), float32 / float16 / bfloat16
    out      [T, H]  same dtype as per_slot
Accumulates in float32 over k = 0, 1, ..., K-1 and rounds once to out's dtype, so a run is bitwise reproducible.
"""

import triton
import triton.language as tl

from tilemoe.ops._kernels._pdl import _pdl_prologue


@triton.jit
def _sum_slots_kernel(
    per_slot_ptr,
    stride_ps,
    stride_ph,
    out_ptr,
    stride_ot,
    stride_oh,
    num_tokens,
    hidden,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_prologue(PDL)
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (tokens[:, None] < num_tokens) & (cols[None, :] < hidden)
    # int64 row offsets: S * H passes 2**31 at real sizes (T*K = 131072 slots of H = 7168 is 9.4e8; 4x that is not)
    rows = tokens.to(tl.int64) * TOP_K
    ptrs = per_slot_ptr + rows[:, None] * stride_ps + cols[None, :] * stride_ph
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    # all K loads are independent and unrolled, so they are in flight together
    for k in tl.static_range(TOP_K):
        acc += tl.load(ptrs + k * stride_ps, mask=mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + tokens[:, None].to(tl.int64) * stride_ot + cols[None, :] * stride_oh
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
