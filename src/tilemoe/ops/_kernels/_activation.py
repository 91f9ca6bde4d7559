"""Triton device functions for the expert activations, shared by every kernel with an activation epilogue.

Codes (tilemoe.ops.act_and_mul.ACTIVATION_CODES): 0 silu, 1 gelu (erf), 2 gelu_tanh, 3 relu, 4 swigluoai.
Inputs in float32; ``act_and_mul_torch`` in tilemoe.ops.activation is the reference.

With ``TILEMOE_FAST_SIGMOID=1`` (read at import, as Triton reads TRITON_INTERPRET) the sigmoid (silu, swigluoai,
gelu_tanh) on the GPU is one ex2.approx.ftz and one rcp.approx.ftz (relative error about 2^-22 each, denormals
flushed): ``tl.exp`` and ``/`` compile to the same MUFU instructions with range fixups around each (sm_90 SASS: an
FSETP and two predicated FMULs per exp, a compare and scaling per divide), which makes the GEMM 1 epilogue ~19
instructions an element; with the fast form the Gluon GEMM 1's epilogue at qwen3-30b-a3b T=4096 went from 1224 to
711 instructions a thread. Why: GEMM 1's activation was 4-7% of the kernel on an H100 (qwen3-30b-a3b T=4096: 25 of
410 us; gpt-oss-120b T=16384: 238 of 3442 us), its whole epilogue 5-10%, on the MMA warps' critical path
(bench/NOTES.md, version 22). Off by default: built and compiled for sm_90 in session 20, which could not get a GPU
to run its tests or time it. The interpreter (no inline PTX) always runs the plain formula.
"""

import os

import triton
import triton.language as tl

# Triton decides interpretation when a kernel is defined; so does this (the interpreter cannot run inline PTX).
_FAST_SIGMOID = tl.constexpr(
    os.environ.get("TILEMOE_FAST_SIGMOID", "0") == "1" and os.environ.get("TRITON_INTERPRET") != "1"
)
_LOG2E = tl.constexpr(1.4426950408889634)

SILU = 0
GELU = 1
GELU_TANH = 2
RELU = 3
SWIGLUOAI = 4


@triton.jit
def _sigmoid(v):
    if _FAST_SIGMOID:
        e = tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [v * -_LOG2E], dtype=tl.float32, is_pure=True, pack=1
        )
        s = tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        s = 1.0 / (1.0 + tl.exp(-v))
    return s


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
