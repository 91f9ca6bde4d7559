"""Both expert GEMMs in one persistent launch: GEMM 2 tiles start as soon as their rows' GEMM 1 tiles are done.

The two-launch form (``_fused_experts._gemm1_kernel`` then ``_gemm2_kernel``) pays a kernel boundary: GEMM 2 starts
only when GEMM 1's last wave has drained, and GEMM 1's last wave leaves SMs idle (at qwen3-30b-a3b T=1024 on an H100,
768 GEMM 1 tiles are 5.8 waves of 132 and 1024 GEMM 2 tiles 7.8 waves). Here one program per SM walks the tile list
GEMM 1 tiles first, then GEMM 2 tiles (tile i of program p: p + i * programs), each tile being the same
``_gemm1_tile`` / ``_gemm2_tile`` as the two-launch kernels (split tails included), so a program that ran out of
GEMM 1 tiles starts GEMM 2 tiles of blocks already finished while others still run GEMM 1.

Dependencies (letters and arrays as in ``_fused_experts``; NT1 = cdiv(I, BLOCK_N1) GEMM 1 column tiles):
    ready   [CAP / BLOCK_M * NT1 + 1] int32, zeroed by the launcher for every call: ready[m * NT1 + n] = 1 once GEMM 1
            tile (block m, column tile n) stored its act rows (a CTA barrier, then a release exchange: gpu scope);
            the last word is the error flag
A GEMM 2 tile of block m waits (acquire loads) until the NT1 words of m are all 1. No deadlock: every program takes
its GEMM 1 tiles before any GEMM 2 tile, and all programs are resident (one per SM), so each awaited tile is run by
a program that never waits before reaching it. Every spin is bounded (``max_spin`` polls): one that runs out sets the
error word and computes on whatever act holds (a wrong result the tests and the tuner's check catch), never a hang.
GEMM 2 reads act through pointer loads, not TMA: a TMA read (the async proxy) after an acquire by ordinary loads
would need a proxy fence Triton does not expose. In the interpreter (``SPIN`` False) nothing waits: the launcher
runs one program, which meets every GEMM 1 tile before the GEMM 2 tiles that need it; a word not yet 1 is an error.
"""

import triton
import triton.language as tl

from tilemoe.ops._kernels._fused_experts import _gemm1_block, _gemm2_block, _tile_coords
from tilemoe.ops._kernels._pdl import _pdl_prologue


@triton.jit
def _mark_ready(ready_ptr):
    """Raise a ready word: every thread's act stores issued (CTA barrier), then a release exchange."""
    tl.debug_barrier()
    tl.atomic_xchg(ready_ptr, 1, sem="release")


@triton.jit
def _wait_ready(ready_ptr, err_ptr, count, max_spin, NT1_P2: tl.constexpr, SPIN: tl.constexpr):
    """Until the ``count`` words at ``ready_ptr`` are all 1 (acquire), at most ``max_spin`` polls."""
    lanes = tl.arange(0, NT1_P2)
    mask = lanes < count
    ready = tl.min(tl.where(mask, tl.atomic_add(ready_ptr + lanes, 0, mask=mask, sem="acquire"), 1))
    if SPIN:
        spins = 0
        while (ready == 0) & (spins < max_spin):
            ready = tl.min(tl.where(mask, tl.atomic_add(ready_ptr + lanes, 0, mask=mask, sem="acquire"), 1))
            spins += 1
    if ready == 0:
        tl.atomic_xchg(err_ptr, 1)


@triton.jit
def _one_launch_kernel(
    # GEMM 1: as _gemm1_kernel (same names: the launcher passes one set of arguments to either)
    x_ptr,
    x_tail_ptr,
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
    act_ptr,
    stride_am,
    stride_ai,
    sorted_ids_ptr,
    expert_ids_ptr,
    expert_starts_ptr,
    num_padded_ptr,
    num_slots,
    top_k,
    hidden,
    inter,
    swiglu_alpha,
    swiglu_limit,
    # GEMM 2: its weights, bias and output (act, the routing and the sizes are GEMM 1's)
    w2_ptr,  # w2, or its tensor descriptor when W2_TMA
    stride_w2e,
    stride_w2h,
    stride_w2i,
    b2_ptr,
    stride_b2e,
    stride_b2h,
    out_ptr,
    stride_om,
    stride_oh,
    ready_ptr,
    err_ptr,  # int32 [1] (the ready buffer's last word)
    max_spin,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WEIGHTS_ON_INPUT: tl.constexpr,
    FP32_PRECISE: tl.constexpr,
    W_TMA: tl.constexpr,
    A_TMA: tl.constexpr,
    GATE_UP_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EXPERT_GROUPS: tl.constexpr,
    SPLIT_TAIL: tl.constexpr,
    HAS_BIAS2: tl.constexpr,
    ATOMIC: tl.constexpr,
    W2_TMA: tl.constexpr,
    EVEN_K2: tl.constexpr,
    EVEN_N2: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    BLOCK_K2: tl.constexpr,
    GROUP_M2: tl.constexpr,
    NT1_P2: tl.constexpr,  # power of two >= cdiv(I, BLOCK_N)
    SPIN: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_prologue(PDL)
    num_padded = tl.load(num_padded_ptr)
    used_m = num_padded // BLOCK_M
    nt1 = tl.cdiv(inter, BLOCK_N)
    tiles1 = used_m * nt1
    tiles = tiles1 + used_m * tl.cdiv(hidden, BLOCK_N2)
    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
        if tile < tiles1:
            pid_m, pid_n = _gemm1_block(
                tile, used_m, x_ptr, x_tail_ptr, stride_xt, stride_xh, w_ptr, stride_we, stride_wn, stride_wh,
                b_ptr, stride_be, stride_bn, topk_weights_ptr, act_ptr, stride_am, stride_ai,
                sorted_ids_ptr, expert_ids_ptr, expert_starts_ptr, num_slots, top_k, hidden, inter, swiglu_alpha,
                swiglu_limit,
                ACTIVATION, GATED, HAS_BIAS, WEIGHTS_ON_INPUT, FP32_PRECISE, W_TMA, A_TMA, GATE_UP_DOT, EVEN_K,
                EVEN_N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EXPERT_GROUPS, SPLIT_TAIL, False,
            )  # fmt: skip
            _mark_ready(ready_ptr + pid_m * nt1 + pid_n)
        else:
            tile2 = tile - tiles1
            pid_m, _, _ = _tile_coords(
                tile2, used_m, tl.cdiv(hidden, BLOCK_N2), expert_ids_ptr, expert_starts_ptr, GROUP_M2, EXPERT_GROUPS
            )
            _wait_ready(ready_ptr + pid_m * nt1, err_ptr, nt1, max_spin, NT1_P2, SPIN)
            _gemm2_block(
                tile2, used_m, act_ptr, act_ptr, stride_am, stride_ai, w2_ptr, stride_w2e, stride_w2h, stride_w2i,
                b2_ptr, stride_b2e, stride_b2h, topk_weights_ptr, out_ptr, stride_om, stride_oh,
                sorted_ids_ptr, expert_ids_ptr, expert_starts_ptr, num_slots, top_k, hidden, inter,
                HAS_BIAS2, WEIGHTS_ON_INPUT, ATOMIC, FP32_PRECISE, W2_TMA, False, EVEN_K2, EVEN_N2,
                BLOCK_M, BLOCK_N2, BLOCK_K2, GROUP_M2, EXPERT_GROUPS, SPLIT_TAIL, False,
            )  # fmt: skip
