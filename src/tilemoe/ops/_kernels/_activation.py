"""Triton device functions for the expert activations, shared by every kernel with an activation epilogue.

Codes (tilemoe.ops.act_and_mul.ACTIVATION_CODES): 0 silu, 1 gelu (erf), 2 gelu_tanh, 3 relu, 4 swigluoai.
Inputs in float32; ``act_and_mul_torch`` in tilemoe.ops.activation is the reference.
"""

import triton
import triton.language as tl

SILU = 0
GELU = 1
GELU_TANH = 2
RELU = 3
SWIGLUOAI = 4


@triton.jit
def _sigmoid(v):
    # The same as ex2.approx.ftz + rcp.approx.ftz in inline PTX (half the epilogue's SASS) timed even on an H100:
    # 0.998-1.000x of the layer's kernels (bench/NOTES.md, version 23), so the plain formula stays.
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _activate(g, ACTIVATION: tl.constexpr, swiglu_alpha, swiglu_limit):
    """act(g); for swigluoai the gate half g * sigmoid(alpha * g) with g clamped from above."""
    if ACTIVATION == 4:
        g = tl.minimum(g, swiglu_limit)
        a = g * _sigmoid(g * swiglu_alpha)
    elif ACTIVATION == 0:
        a = g * _sigmoid(g)
    elif ACTIVATION == 1:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACTIVATION == 2:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (2.0 * _sigmoid(2.0 * inner))  # 1 + tanh(v) = 2 sigmoid(2v)
    else:
        a = tl.maximum(g, 0.0)
    return a


@triton.jit
def _up_factor(u, ACTIVATION: tl.constexpr, swiglu_limit):
    """The up half's factor: u, or clamp(u, -limit, limit) + 1 for swigluoai."""
    if ACTIVATION == 4:
        u = tl.minimum(tl.maximum(u, -swiglu_limit), swiglu_limit) + 1.0
    return u
