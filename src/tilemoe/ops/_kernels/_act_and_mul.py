"""Triton kernel: out = act(gate) * up (gated) or out = act(h) (plain), row by row.

Dimension letters: M rows (tokens or token-expert pairs), I intermediate size.
    h   [M, 2I] gate columns [0, I) then up columns [I, 2I)   ([M, I] when GATED is False)
    out [M, I]
Math in float32, stored in out's dtype.
"""

import triton
import triton.language as tl

from tilemoe.ops._kernels._activation import _activate, _up_factor


@triton.jit
def _act_and_mul_kernel(
    h_ptr,
    stride_hm,
    stride_hi,
    out_ptr,
    stride_om,
    stride_oi,
    num_rows,
    inter_size,
    swiglu_alpha,
    swiglu_limit,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_i = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows[:, None] < num_rows) & (cols[None, :] < inter_size)
    # int64 row offsets: M * 2I passes 2**31 at real sizes (T*K = 32768*8 rows of 2*768 columns is close)
    h_rows = h_ptr + rows[:, None].to(tl.int64) * stride_hm
    g = tl.load(h_rows + cols[None, :] * stride_hi, mask=mask, other=0.0).to(tl.float32)
    a = _activate(g, ACTIVATION, swiglu_alpha, swiglu_limit)
    if GATED:
        u = tl.load(h_rows + (cols[None, :] + inter_size) * stride_hi, mask=mask, other=0.0).to(tl.float32)
        a = a * _up_factor(u, ACTIVATION, swiglu_limit)
    out_rows = out_ptr + rows[:, None].to(tl.int64) * stride_om
    tl.store(out_rows + cols[None, :] * stride_oi, a.to(out_ptr.dtype.element_ty), mask=mask)
