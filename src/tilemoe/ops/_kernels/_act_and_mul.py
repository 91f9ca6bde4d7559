"""Triton kernel: out = act(gate) * up (gated) or out = act(h) (plain), row by row.

Dimension letters: M rows (tokens or token-expert pairs), I intermediate size.
    h   [M, 2I] gate columns [0, I) then up columns [I, 2I)   ([M, I] when GATED is False)
    out [M, I]
Math in float32, stored in out's dtype.
"""

import triton
import triton.language as tl

# activation codes (tilemoe.ops.act_and_mul.ACTIVATION_CODES)
SILU = 0
GELU = 1
GELU_TANH = 2
RELU = 3
SWIGLUOAI = 4


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


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
    if ACTIVATION == 4:  # swigluoai (gpt-oss)
        g = tl.minimum(g, swiglu_limit)
        a = g * _sigmoid(g * swiglu_alpha)
    elif ACTIVATION == 0:
        a = g * _sigmoid(g)
    elif ACTIVATION == 1:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACTIVATION == 2:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (1.0 + (2.0 * _sigmoid(2.0 * inner) - 1.0))  # tanh(v) = 2 sigmoid(2v) - 1
    else:
        a = tl.maximum(g, 0.0)
    if GATED:
        u = tl.load(h_rows + (cols[None, :] + inter_size) * stride_hi, mask=mask, other=0.0).to(tl.float32)
        if ACTIVATION == 4:
            u = tl.minimum(tl.maximum(u, -swiglu_limit), swiglu_limit) + 1.0
        a = a * u
    out_rows = out_ptr + rows[:, None].to(tl.int64) * stride_om
    tl.store(out_rows + cols[None, :] * stride_oi, a.to(out_ptr.dtype.element_ty), mask=mask)
