"""Gluon (Triton's tile-level dialect) kernels of the two expert GEMMs for Hopper: TMA rings, mbarriers, async wgmma.

The same GEMMs as ``_fused_experts``' dense TMA form (``KernelConfig.sorted_x`` with ``tma``), written one level
lower and warp-specialized: a producer warp walks the program's (tile, k) steps and copies each step's A and B boxes
into a ring of NUM_STAGES shared buffers once the stage is released ("empty" mbarrier), and the num_warps MMA warps
wait for each stage ("ready"), keep one step of wgmma in flight, release the stage before it and run each tile's
epilogue; a program walks one tile, or several (a persistent grid): the producer in one flat loop over its
(tile, k) steps, so it loads the next tile's boxes under this tile's epilogue, the MMA warps a k loop per tile.
Why: Triton's ``tl.dot`` pipeline reached 75-86% of cuBLAS's batched GEMM at the cells issue 4 still misses
(bench/NOTES.md, run 17), and the Gluon tutorials' Hopper matmuls matched cuBLAS.
Measured on an H100: 15-19% slower mainloops than Triton's in version 14, ptxas having serialized the wgmmas
(``_tile_mainloop``); after that fix (version 15) GEMM 1 runs 3-7% faster than the Triton kernel at qwen3 / mixtral
T = 1024-4096, and 20 H100 table entries take these kernels.

Two more forms (version 16). GATHER: GEMM 1's producer is a warpgroup that copies A straight from x's rows by token
with cp.async (``_load_partition``), instead of TMA boxes of a sorted copy of x; that copy had eaten the Gluon
GEMM 1's gain at the top-8 / top-6 models, and without it GEMM 1 ran 7% (qwen3-30b-a3b) and 17% (deepseek-v2-lite)
faster than the Triton kernel at T = 4096 on an H100. PINGPONG: two MMA warpgroups take the program's tiles in turn
(``_take_turn``), one's epilogue under the other's wgmmas; each holds a tile of half the cooperative size, which paid
for GEMM 2 where its K is short (deepseek-v2-lite, I = 1408: -9%) and lost where it is long.

COMBINE (version 17): GEMM 2's combine in two warps of their own (``_combine_partition``), fed a tile at a time
through a shared stage, so the atomics of one tile run under the next tile's wgmmas.

Dimension letters and index arrays as in ``tilemoe.ops._kernels._fused_experts``:
    x_sorted     [CAP, H]      x in padded sorted order (padding rows zero), read through [BLOCK_M, BLOCK_K] boxes
    x            [T, H]        under GATHER, read by rows: token = sorted_ids // top_k
    w13          [E*N1, H]     2-D view of [E, N1, H], N1 = 2I gated (gate rows, then up rows) else I; [BLOCK_N, BLOCK_K]
    act          [CAP, I]      GEMM 1's output, written through [BLOCK_M, BLOCK_N] boxes (columns past I clipped)
    w2           [E*H, I]      2-D view of [E, H, I]; [BLOCK_N, BLOCK_K] boxes
    sorted_ids   [CAP]         slot at each padded row (S = padding)
    expert_ids   [CAP / BM]    expert of each block of BLOCK_M rows
    num_padded   [1]           rows in use; blocks at or past it exit
A weight box that runs past its expert's rows reads the next expert's (or TMA's zero fill); those columns are never
stored. Boxes past H or I are zero-filled, so the k loops need no masks. 16-bit operands only (wgmma's bf16 / fp16
path); the launcher keeps fp32 on ``tl.dot``'s 3xTF32.

These kernels cannot run in Triton's interpreter: they are compiled for sm_90 on the CPU (tests/ops/
test_gluon_experts.py) and run against the float64 reference on the GPU (the ``gpu`` tests).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from tilemoe.ops._kernels._activation import _activate, _up_factor
from tilemoe.ops._kernels._fused_experts import _tile_coords

# TMA box copies: Triton 3.6 (the device's) names them async_copy_global_to_shared / async_copy_shared_to_global,
# later releases async_load / async_store (the old names left to raise).
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
# cp.async (16-byte copies by each thread): Triton 3.6 names it async_copy_global_to_shared, later releases
# async_load
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
# A barrier of the calling partition's warps (a named barrier inside warp_specialize): Triton 3.6 names it
# thread_barrier, later releases barrier
_partition_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

# Registers of the producer warp (setmaxnreg hands the rest to the MMA warps): it computes tile coordinates and
# issues TMA copies, nothing more.
LOADER_REGS = gl.constexpr(40)
# Warps of GEMM 1's producer when it gathers x's rows by token (GATHER): each thread issues 16-byte cp.async copies
# (a [128, 64] 16-bit box is 1024 of them, 8 a thread), and their registers hold the rows' pointers across a tile's
# k steps.
GATHER_WARPS = gl.constexpr(4)
GATHER_REGS = gl.constexpr(88)
# Warps of GEMM 2's combine partition (COMBINE): they add each tile's rows into the output from a shared-memory copy
# of the tile (``_combine_partition``) while the MMA warps run the next tile's wgmmas, COMBINE_ROWS rows at a time
# (a [16, 256] 16-bit chunk is 8 KiB: 128 bytes a thread, eight 16-byte atomics). Two, not four: 8 MMA warps, the
# producer's and 4 more launch as 16 warps at 128 registers a thread, and ptxas cannot fit the MMA warps' [128, 256]
# accumulator in that ("Insufficient registers (128)"); with 2 the kernel launches 12 warps at 168, and setmaxnreg
# gives the MMA warps 240.
COMBINE_WARPS = gl.constexpr(2)
COMBINE_REGS = gl.constexpr(96)
COMBINE_ROWS = gl.constexpr(16)


@gluon.constexpr_function
def _consumer_regs(producer_regs):
    """Registers of the second MMA warpgroup under PINGPONG (the first, the default partition, gets as many): what a
    64K register file leaves them after the producer's warpgroup, in setmaxnreg's steps of 8."""
    return (65536 // 128 - producer_regs) // 2 // 8 * 8


@gluon.constexpr_function
def _mma_layout(block_m, block_n, num_warps):
    """The wgmma accumulator layout of a [block_m, block_n] tile: warps stacked along M first (16 rows each), the
    widest instruction N (a multiple of 8 up to 256) that divides what each warp column holds."""
    warps = [4, 1]
    while warps[0] * warps[1] < num_warps:
        if block_m > 16 * warps[0]:
            warps[0] *= 2
        else:
            warps[1] *= 2
    per_warp_n = block_n // warps[1]
    n = min(256, per_warp_n)
    while per_warp_n % n:
        n -= 8
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps, instr_shape=[16, n, 16])


@gluon.jit
def _step_coords(step, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr, GROUP_M: gl.constexpr,
                 EXPERT_GROUPS: gl.constexpr, COL_GROUP: gl.constexpr = 0):  # fmt: skip
    """The tile of this program's ``step``-th k step: (pid_m, pid_n, expert). Its tiles are program_id,
    program_id + programs, ... (the ``num_tiles`` tiles of the row blocks in use), each ``num_k`` steps, ordered as
    ``_fused_experts._tile_coords`` orders them."""
    tile = gl.program_id(0) + (step // num_k) * gl.num_programs(0)
    # clamped to the program's tiles; never called without a tile (num_steps is 0 then: under EXPERT_GROUPS tile 0
    # would read expert_starts past its end)
    used_m = gl.maximum(num_tiles // num_blocks_n, 1)
    tile = gl.maximum(gl.minimum(tile, num_tiles - 1), 0)
    return _tile_coords(
        tile, used_m, num_blocks_n, expert_ids_ptr, expert_starts_ptr, GROUP_M, EXPERT_GROUPS, COL_GROUP
    )


@gluon.jit
def _issue_b_loads(bar, s, k, b_row, b2_row, b_desc, b_bufs, b2_bufs, BLOCK_N: gl.constexpr, GATE_UP: gl.constexpr):
    """One step's B boxes into stage ``s`` (arriving on ``bar``): B at (b_row, k), and with GATE_UP (see ``_ring``)
    the up rows at (b2_row, k) too."""
    if GATE_UP == 2:  # the gate rows, then the up rows, in the two halves of one [2 BLOCK_N, BLOCK_K] buffer
        _tma_load(b_desc, [b_row, k], bar, b_bufs.index(s).slice(0, BLOCK_N))
        _tma_load(b_desc, [b2_row, k], bar, b_bufs.index(s).slice(BLOCK_N, BLOCK_N))
    else:
        _tma_load(b_desc, [b_row, k], bar, b_bufs.index(s))
        if GATE_UP == 1:
            _tma_load(b_desc, [b2_row, k], bar, b2_bufs.index(s))


@gluon.jit
def _gemm1_epilogue(acc_g, acc_u, pid_m, pid_n, expert, act_desc, out, b_ptr, stride_be, stride_bn, topk_weights_ptr,
                    sorted_ids_ptr, num_slots, inter, swiglu_alpha, swiglu_limit, ACTIVATION: gl.constexpr,
                    GATED: gl.constexpr, HAS_BIAS: gl.constexpr, WEIGHTS_ON_INPUT: gl.constexpr,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """As _fused_experts' GEMM 1 epilogue: the activated intermediate, rounded like an unfused x @ w13^T, stored from
    the shared ``out`` through a TMA box (clipped past I); the store is left in flight (the next epilogue waits for
    it)."""
    dtype: gl.constexpr = act_desc.dtype
    layout: gl.constexpr = acc_g.type.layout
    cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
    col_mask = cols < inter
    if WEIGHTS_ON_INPUT:  # (w x) @ W = w (x @ W), see _fused_experts
        rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
        slot = gl.load(sorted_ids_ptr + rows)
        row_weight = gl.load(topk_weights_ptr + slot, mask=slot < num_slots, other=0.0)
        acc_g = acc_g * row_weight[:, None]
        acc_u = acc_u * row_weight[:, None]
    if HAS_BIAS:
        b_row = b_ptr + expert.to(gl.int64) * stride_be
        acc_g += gl.load(b_row + cols * stride_bn, mask=col_mask, other=0.0).to(gl.float32)[None, :]
        if GATED:
            acc_u += gl.load(b_row + (cols + inter) * stride_bn, mask=col_mask, other=0.0).to(gl.float32)[None, :]
    result = _activate(acc_g.to(dtype).to(gl.float32), ACTIVATION, swiglu_alpha, swiglu_limit)
    if GATED:
        result = result * _up_factor(acc_u.to(dtype).to(gl.float32), ACTIVATION, swiglu_limit)
    tma.store_wait(pendings=0)  # the previous tile's store has left the buffer
    out.store(result.to(dtype))
    fence_async_shared()
    _tma_store(act_desc, [pid_m * BLOCK_M, pid_n * BLOCK_N], out)


@gluon.constexpr_function
def _row_vector_layout(block_n, num_warps):
    """A blocked layout of 8 consecutive columns per thread (16 bytes of a 16-bit row): GEMM 2's atomic adds (or
    stores) go out as 8-wide vector atomics, as Triton's ``tl.atomic_add`` lowers them, not the wgmma layout's pairs
    (4x the atomic instructions; qwen3-30b-a3b T=4096's GEMM 2 went from 335.8 to 313.8 us on an H100, bench/NOTES.md
    version 14)."""
    lanes_n = max(1, min(32, block_n // 8))
    return gl.BlockedLayout([1, 8], [32 // lanes_n, lanes_n], [num_warps, 1], [1, 0])


@gluon.jit
def _gemm2_scaled(acc, pid_m, pid_n, expert, b_ptr, stride_be, stride_bh, topk_weights_ptr, sorted_ids_ptr, num_slots,
                  hidden, layout: gl.constexpr, HAS_BIAS: gl.constexpr, WEIGHTS_ON_INPUT: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """GEMM 2's accumulator with the bias and the routing weight applied, in its own (wgmma) layout, as _fused_experts'
    GEMM 2 epilogue applies them."""
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
    slot = gl.load(sorted_ids_ptr + rows)
    if HAS_BIAS:
        acc += gl.load(b_ptr + expert.to(gl.int64) * stride_be + cols * stride_bh, mask=cols < hidden,
                       other=0.0).to(gl.float32)[None, :]  # fmt: skip
    if not WEIGHTS_ON_INPUT:
        acc = acc * gl.load(topk_weights_ptr + slot, mask=slot < num_slots, other=0.0)[:, None]
    return acc


@gluon.jit
def _combine_rows(values, first_row, pid_n, out_ptr, stride_om, stride_oh, sorted_ids_ptr, num_slots, top_k, hidden,
                  ATOMIC: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """``values``' ROWS rows (padded sorted rows ``first_row`` on, in a row-vector layout) added into their tokens'
    output rows (ATOMIC) or stored into their slots' rows; padding rows are skipped."""
    layout: gl.constexpr = values.type.layout
    rows = first_row + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
    slot = gl.load(sorted_ids_ptr + rows)
    valid = slot < num_slots
    mask = valid[:, None] & (cols < hidden)[None, :]
    if ATOMIC:
        row = gl.where(valid, slot // top_k, 0).to(gl.int64)
    else:
        row = gl.where(valid, slot, 0).to(gl.int64)
    out_ptrs = out_ptr + row[:, None] * stride_om + cols[None, :] * stride_oh
    if ATOMIC:
        gl.atomic_add(out_ptrs, values, mask=mask, sem="relaxed")
    else:
        gl.store(out_ptrs, values, mask=mask)


@gluon.jit
def _gemm2_epilogue(acc, pid_m, pid_n, expert, b_ptr, stride_be, stride_bh, topk_weights_ptr, out_ptr, stride_om,
                    stride_oh, sorted_ids_ptr, num_slots, top_k, hidden, layout: gl.constexpr,
                    HAS_BIAS: gl.constexpr, WEIGHTS_ON_INPUT: gl.constexpr, ATOMIC: gl.constexpr,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """As _fused_experts' GEMM 2 epilogue: bias and the routing weight in the accumulator's layout, then the rows in
    16-byte pieces per thread for the per-token add or the per-slot store."""
    acc = _gemm2_scaled(acc, pid_m, pid_n, expert, b_ptr, stride_be, stride_bh, topk_weights_ptr, sorted_ids_ptr,
                        num_slots, hidden, layout, HAS_BIAS, WEIGHTS_ON_INPUT, BLOCK_M, BLOCK_N)  # fmt: skip
    values = gl.convert_layout(acc.to(out_ptr.dtype.element_ty), _row_vector_layout(BLOCK_N, num_warps))
    _combine_rows(values, pid_m * BLOCK_M, pid_n, out_ptr, stride_om, stride_oh, sorted_ids_ptr, num_slots, top_k,
                  hidden, ATOMIC, BLOCK_M, BLOCK_N)  # fmt: skip


@gluon.jit
def _combine_partition(num_steps, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr, staged, drained,
                       stage, out_ptr, stride_om, stride_oh, sorted_ids_ptr, num_slots, top_k, hidden,
                       ATOMIC: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                       EXPERT_GROUPS: gl.constexpr, COL_GROUP: gl.constexpr):  # fmt: skip
    """COMBINE: GEMM 2's combine in warps of their own. The MMA warps leave each tile, weighted and rounded, in the
    shared ``stage`` and arrive on ``staged``; these warps add its rows into the output (or store them per slot),
    COMBINE_ROWS at a time, and arrive on ``drained``, freeing the stage for the MMA warps' next tile. So the
    atomics, which were a third of a [128, 256] tile's time at K = 768 (qwen3-30b-a3b, bench/NOTES.md version 16),
    run under the next tile's wgmmas without halving the tile as the ping-pong form does. Measured on an H100
    (version 17): that GEMM 2 7-12% faster at qwen3-30b-a3b T = 4096 / 16384, a third of what the atomics had cost:
    the rest is their own rate."""
    layout: gl.constexpr = _row_vector_layout(BLOCK_N, COMBINE_WARPS)
    for first_step in range(0, num_steps, num_k):
        pid_m, pid_n, expert = _step_coords(
            first_step, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr, GROUP_M, EXPERT_GROUPS,
            COL_GROUP,
        )  # fmt: skip
        mbarrier.wait(staged, (first_step // num_k) & 1)
        for r in gl.static_range(0, BLOCK_M, COMBINE_ROWS):
            values = stage.slice(r, COMBINE_ROWS).load(layout)
            _combine_rows(values, pid_m * BLOCK_M + r, pid_n, out_ptr, stride_om, stride_oh, sorted_ids_ptr,
                          num_slots, top_k, hidden, ATOMIC, COMBINE_ROWS, BLOCK_N)  # fmt: skip
        _partition_barrier()  # every warp's reads of the stage are done before the one-thread arrive frees it
        mbarrier.arrive(drained)


@gluon.jit
def _ring(a_layout: gl.constexpr, b_desc, NUM_STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
          BLOCK_K: gl.constexpr, GATE_UP: gl.constexpr, READY_COUNT: gl.constexpr):  # fmt: skip
    """The shared buffers of the A / B box ring, a "ready" mbarrier per stage (its boxes have landed) and an "empty"
    one (the MMAs that read it have retired). GATE_UP: 0 one B box per step (GEMM 2, a plain GEMM 1); 1 the gate and
    the up box in two buffers, for two accumulators; 2 both in one [2 BLOCK_N, BLOCK_K] buffer, for one N = 2 BLOCK_N
    wgmma (as ``_fused_experts``' GATE_UP_DOT: one instruction of twice the width reads the A box once, not twice;
    measured on an H100 within 1% of two accumulators, bench/NOTES.md version 14). READY_COUNT: a stage's arrivals
    (1, the TMA copies' expect; under GATHER also one per producer thread, its cp.async copies done)."""
    dtype: gl.constexpr = b_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, BLOCK_K], a_layout)
    b_rows: gl.constexpr = 2 * BLOCK_N if GATE_UP == 2 else BLOCK_N
    b_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, b_rows, BLOCK_K], b_desc.layout)
    if GATE_UP == 1:
        b2_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    else:
        b2_bufs = b_bufs
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=READY_COUNT)
        mbarrier.init(empty.index(i), count=1)
    return a_bufs, b_bufs, b2_bufs, ready, empty


@gluon.jit
def _turns(empty, PINGPONG: gl.constexpr):
    """The two MMA warpgroups' turn barriers under PINGPONG (``_take_turn``); else a stand-in never waited on."""
    if PINGPONG:
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
    else:
        turn = empty
    return turn


@gluon.jit
def _load_partition(num_steps, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr, b_rows_per_expert,
                    b2_offset, a_desc, b_desc, ready, empty, a_bufs, b_bufs, b2_bufs, x_ptr, stride_xt, sorted_ids_ptr,
                    num_slots, top_k, hidden, NUM_STAGES: gl.constexpr, BLOCK_M: gl.constexpr,
                    BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, EXPERT_GROUPS: gl.constexpr,
                    COL_GROUP: gl.constexpr, GATE_UP: gl.constexpr, GATHER: gl.constexpr,
                    EVEN_K: gl.constexpr):  # fmt: skip
    """The producer: each step's boxes into its stage once the MMAs of NUM_STAGES steps before have released it (the
    first pass through the ring waits for nothing: parity 1 of a fresh barrier counts as done). A tile's coordinates
    (its expert id a global load) are worked out at its first step, before that step's wait, and carried, not
    recomputed per step in front of the copies (measured against that: no change, bench/NOTES.md version 14).

    One thread issues the TMA copies: B's boxes, and A's from ``a_desc`` (x_sorted or act). Under GATHER (GEMM 1 without
    the sorted copy of x) the GATHER_WARPS warps copy A straight from x's rows instead, token = slot // top_k of the
    block's slots, 16 bytes a cp.async (padding rows and columns past H zero-filled), each thread arriving on the
    stage's "ready" barrier as its copies land; the tile's row offsets are loaded at its first step and kept in
    registers for its k steps. x_ptr, stride_xt, sorted_ids_ptr, num_slots, top_k and hidden serve only the gather
    (a_desc is then unused)."""
    b_bytes: gl.constexpr = (1 if GATE_UP == 0 else 2) * b_desc.block_type.nbytes
    if GATHER:
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BLOCK_K // 8), BLOCK_K // 8], [GATHER_WARPS, 1], [1, 0])
        block_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, layout))
        row_offset = block_rows.to(gl.int64) * 0
        valid = block_rows < 0
    else:
        a_row = 0
    b_row = 0
    kk = 0
    s = 0
    phase = 1
    for step in range(num_steps):
        if kk == 0:
            pid_m, pid_n, expert = _step_coords(
                step, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr, GROUP_M, EXPERT_GROUPS,
                COL_GROUP,
            )  # fmt: skip
            if GATHER:
                slot = gl.load(sorted_ids_ptr + pid_m * BLOCK_M + block_rows)
                valid = slot < num_slots
                # rows of 16-byte multiples (the launcher's condition): told, so the copies are 16 bytes wide even
                # where H is not a multiple of 16 elements (Triton only sees an int argument's divisibility by 16)
                row_offset = gl.multiple_of(gl.where(valid, slot // top_k, 0).to(gl.int64) * stride_xt, 8)
            else:
                a_row = pid_m * BLOCK_M
            b_row = expert * b_rows_per_expert + pid_n * BLOCK_N
        mbarrier.wait(empty.index(s), phase)
        k = kk * BLOCK_K
        bar = ready.index(s)
        if GATHER:
            mbarrier.expect(bar, b_bytes)
            _issue_b_loads(bar, s, k, b_row, b_row + b2_offset, b_desc, b_bufs, b2_bufs, BLOCK_N, GATE_UP)
            pointers = x_ptr + row_offset[:, None] + (k + cols)[None, :]
            if EVEN_K:
                _cp_async(a_bufs.index(s), pointers, mask=valid[:, None])
            else:
                # in 8-column (16-byte) chunks, so the mask is seen to hold for a whole copy (H is a multiple of 8)
                _cp_async(a_bufs.index(s), pointers, mask=valid[:, None] & ((k + cols) // 8 < hidden // 8)[None, :])
            async_copy.mbarrier_arrive(bar, increment_count=False)
        else:
            mbarrier.expect(bar, a_desc.block_type.nbytes + b_bytes)
            _tma_load(a_desc, [a_row, k], bar, a_bufs.index(s))
            _issue_b_loads(bar, s, k, b_row, b_row + b2_offset, b_desc, b_bufs, b2_bufs, BLOCK_N, GATE_UP)
        kk += 1
        if kk == num_k:
            kk = 0
        s += 1
        if s == NUM_STAGES:
            s = 0
            phase ^= 1


@gluon.jit
def _tile_mainloop(first_step, num_k, acc, acc2, ready, empty, a_bufs, b_bufs, b2_bufs, turn_done,
                   NUM_STAGES: gl.constexpr, TWO_B: gl.constexpr, PINGPONG: gl.constexpr,
                   GATHER: gl.constexpr):  # fmt: skip
    """One tile's k steps (the program's steps ``first_step`` on; acc2 with the second B buffer when TWO_B: ``_ring``'s
    GATE_UP 1), one step of wgmma in flight: each step's stage waits for its boxes, and the step before's stage is
    released once its MMAs retire; at the end everything retires and the last stage is released too. The k loop is a
    loop of its own, the accumulators zeroed before it (``use_acc`` off at k = 0) and read only after it: with one
    flat (tile, k) loop whose epilogue sat in a branch inside it, ptxas made every step wait for all its wgmmas
    ("warpgroup.wait is injected ... to allow use of registers defined by GMMA", C7517), the one-in-flight pipeline
    undone (bench/NOTES.md version 15). PINGPONG: once its last step's boxes have landed, the tile arrives on
    ``turn_done``, the other MMA warpgroup's turn (``_take_turn``). GATHER: A came by cp.async, whose writes are the
    generic proxy's, and wgmma reads through the async proxy: a proxy fence between the wait and the wgmmas."""
    for kk in range(num_k):
        step = first_step + kk
        s = step % NUM_STAGES
        mbarrier.wait(ready.index(s), (step // NUM_STAGES) & 1)
        if GATHER:
            fence_async_shared()
        acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, use_acc=kk > 0, is_async=True)
        if TWO_B:
            acc2 = warpgroup_mma(a_bufs.index(s), b2_bufs.index(s).permute((1, 0)), acc2, use_acc=kk > 0,
                                 is_async=True)  # fmt: skip
            acc, acc2 = warpgroup_mma_wait(num_outstanding=2, deps=(acc, acc2))
        else:
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        mbarrier.arrive(empty.index((step + NUM_STAGES - 1) % NUM_STAGES), pred=kk > 0)
    if PINGPONG:
        mbarrier.arrive(turn_done)
    if TWO_B:
        acc, acc2 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc2))
    else:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index((first_step + num_k - 1) % NUM_STAGES))
    return acc, acc2


@gluon.jit
def _take_turn(turn, tile, CONSUMER: gl.constexpr, PINGPONG: gl.constexpr):
    """PINGPONG: two MMA warpgroups (consumers 0 and 1) take the program's tiles in turn (consumer ``tile`` % 2 runs
    its ``tile``-th), from one ring, so one runs its epilogue while the other's wgmmas run. Before a tile, a consumer
    waits until the other has waited for every box of the tile before (``_tile_mainloop`` arrives on ``turn`` then):
    a ring stage's "ready" barrier tells phases apart by parity only, so a consumer that waited on a stage one use
    early would take the use before's completed phase for its own. Its (tile // 2)-th wait is for the other's
    (tile // 2 + CONSUMER - 1)-th arrival."""
    if PINGPONG:
        mbarrier.wait(turn.index(CONSUMER), (tile // 2 + CONSUMER + 1) & 1, pred=tile > 0)


@gluon.jit
def _gemm1_mma_partition(num_steps, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr, ready, empty,
                         a_bufs, b_bufs, b2_bufs, act_desc, b_ptr, stride_be, stride_bn, topk_weights_ptr,
                         sorted_ids_ptr, num_slots, inter, swiglu_alpha, swiglu_limit, turn,
                         ACTIVATION: gl.constexpr, GATED: gl.constexpr, HAS_BIAS: gl.constexpr,
                         WEIGHTS_ON_INPUT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                         GROUP_M: gl.constexpr, EXPERT_GROUPS: gl.constexpr, NUM_STAGES: gl.constexpr,
                         GATE_UP: gl.constexpr, CONSUMER: gl.constexpr, PINGPONG: gl.constexpr,
                         GATHER: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """GEMM 1's MMA warps (under PINGPONG one of the two warpgroups, CONSUMER): each tile's k steps, then its epilogue.
    A tile's coordinates (dependent loads: its expert, under EXPERT_GROUPS that expert's blocks) are asked before its
    k loop, so they land under its wgmmas instead of holding up its epilogue. Timed in turn against the order before
    (after the k loop) on one H100 (bench/results/session16-padding.md, call 1): all kernels of a layer call -0.5%
    at qwen3-30b-a3b T=4096 (ping-pong GEMM 2 -1.2%), -1.0% at mixtral-8x7b T=4096 (GEMM 1 -1.5%), +0.6% at
    deepseek-v2-lite T=4096: near even; the -8% session 15 read across two machines was mostly the machines. The
    epilogue's shared buffer is allocated once."""
    acc_n: gl.constexpr = 2 * BLOCK_N if GATE_UP == 2 else BLOCK_N
    layout: gl.constexpr = _mma_layout(BLOCK_M, acc_n, num_warps)
    consumers: gl.constexpr = 2 if PINGPONG else 1
    out = gl.allocate_shared_memory(act_desc.dtype, [BLOCK_M, BLOCK_N], act_desc.layout)
    for first_step in range(CONSUMER * num_k, num_steps, consumers * num_k):
        _take_turn(turn, first_step // num_k, CONSUMER, PINGPONG)
        pid_m, pid_n, expert = _step_coords(
            first_step, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr, GROUP_M, EXPERT_GROUPS
        )
        acc_g = gl.zeros((BLOCK_M, acc_n), dtype=gl.float32, layout=layout)
        acc_u = gl.zeros((BLOCK_M, acc_n), dtype=gl.float32, layout=layout)
        acc_g, acc_u = _tile_mainloop(first_step, num_k, acc_g, acc_u, ready, empty, a_bufs, b_bufs, b2_bufs,
                                      turn.index(1 - CONSUMER), NUM_STAGES, GATE_UP == 1, PINGPONG,
                                      GATHER)  # fmt: skip
        if GATE_UP == 2:  # [gate | up] columns: split into the two [BLOCK_M, BLOCK_N] halves
            gate, up = gl.split(gl.permute(gl.reshape(acc_g, [BLOCK_M, 2, BLOCK_N]), [0, 2, 1]))
        else:
            gate, up = acc_g, acc_u
        _gemm1_epilogue(gate, up, pid_m, pid_n, expert, act_desc, out, b_ptr, stride_be, stride_bn, topk_weights_ptr,
                        sorted_ids_ptr, num_slots, inter, swiglu_alpha, swiglu_limit, ACTIVATION, GATED, HAS_BIAS,
                        WEIGHTS_ON_INPUT, BLOCK_M, BLOCK_N)  # fmt: skip
    tma.store_wait(pendings=0)


@gluon.jit
def _gemm2_mma_partition(num_steps, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr, ready, empty,
                         a_bufs, b_bufs, b_ptr, stride_be, stride_bh, topk_weights_ptr, out_ptr, stride_om, stride_oh,
                         sorted_ids_ptr, num_slots, top_k, hidden, turn, staged, drained, stage,
                         HAS_BIAS: gl.constexpr, WEIGHTS_ON_INPUT: gl.constexpr, ATOMIC: gl.constexpr,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                         EXPERT_GROUPS: gl.constexpr, COL_GROUP: gl.constexpr, NUM_STAGES: gl.constexpr,
                         CONSUMER: gl.constexpr, PINGPONG: gl.constexpr, COMBINE: gl.constexpr,
                         num_warps: gl.constexpr):  # fmt: skip
    """GEMM 2's MMA warps, as GEMM 1's (the coordinates asked before the k loop); under COMBINE their epilogue only
    weights the tile and leaves it in ``stage`` for ``_combine_partition`` (waiting first until that has drained the
    tile before)."""
    layout: gl.constexpr = _mma_layout(BLOCK_M, BLOCK_N, num_warps)
    consumers: gl.constexpr = 2 if PINGPONG else 1
    for first_step in range(CONSUMER * num_k, num_steps, consumers * num_k):
        _take_turn(turn, first_step // num_k, CONSUMER, PINGPONG)
        pid_m, pid_n, expert = _step_coords(
            first_step, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr, GROUP_M, EXPERT_GROUPS,
            COL_GROUP,
        )  # fmt: skip
        acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=layout)
        acc, unused = _tile_mainloop(first_step, num_k, acc, acc, ready, empty, a_bufs, b_bufs, b_bufs,
                                     turn.index(1 - CONSUMER), NUM_STAGES, False, PINGPONG, False)  # fmt: skip
        if COMBINE:
            acc = _gemm2_scaled(acc, pid_m, pid_n, expert, b_ptr, stride_be, stride_bh, topk_weights_ptr,
                                sorted_ids_ptr, num_slots, hidden, layout, HAS_BIAS, WEIGHTS_ON_INPUT, BLOCK_M,
                                BLOCK_N)  # fmt: skip
            # the stage is free once the combine has drained the tile before (a fresh barrier's parity 1 passes)
            mbarrier.wait(drained, ((first_step // num_k) & 1) ^ 1)
            stage.store(acc.to(out_ptr.dtype.element_ty))
            _partition_barrier()  # every warp's part of the tile is in the stage before the one-thread arrive
            mbarrier.arrive(staged)
        else:
            _gemm2_epilogue(acc, pid_m, pid_n, expert, b_ptr, stride_be, stride_bh, topk_weights_ptr, out_ptr,
                            stride_om, stride_oh, sorted_ids_ptr, num_slots, top_k, hidden, layout, HAS_BIAS,
                            WEIGHTS_ON_INPUT, ATOMIC, BLOCK_M, BLOCK_N, num_warps)  # fmt: skip


@gluon.jit
def _gluon_gemm1_kernel(
    x_desc,  # x_sorted [CAP, H], [BLOCK_M, BLOCK_K] boxes (unused under GATHER)
    x_ptr,  # x [T, H], rows gathered by token under GATHER (else unused)
    stride_xt,
    w_desc,  # w13 as [E*N1, H], [BLOCK_N, BLOCK_K] boxes
    act_desc,  # act [CAP, I], [BLOCK_M, BLOCK_N] boxes
    b_ptr,
    stride_be,
    stride_bn,
    topk_weights_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    expert_starts_ptr,  # [E + 1] first block of each expert (EXPERT_GROUPS)
    num_padded_ptr,
    num_slots,
    top_k,
    hidden,
    inter,
    swiglu_alpha,
    swiglu_limit,
    ACTIVATION: gl.constexpr,
    GATED: gl.constexpr,
    HAS_BIAS: gl.constexpr,
    WEIGHTS_ON_INPUT: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    GROUP_M: gl.constexpr,
    EXPERT_GROUPS: gl.constexpr,  # tiles ordered expert by expert (``_tile_coords``)
    NUM_STAGES: gl.constexpr,
    GATE_UP_DOT: gl.constexpr,  # gated: one N = 2 BLOCK_N wgmma over the gate and up boxes, not two (``_ring``)
    PINGPONG: gl.constexpr,  # two MMA warpgroups of num_warps take the tiles in turn (``_take_turn``)
    GATHER: gl.constexpr,  # A gathered from x by token (``_load_partition``), not x_sorted through TMA
    A_LAYOUT: gl.constexpr,  # the A ring's shared layout (x_desc's boxes')
    EVEN_K: gl.constexpr,  # hidden % BLOCK_K == 0 (GATHER's copies need no column mask)
    num_warps: gl.constexpr,
):
    """One program per tile, or fewer programs each walking tiles (a persistent grid); within a program a producer
    warp walks the (tile, k) steps in one flat loop, keeping the ring NUM_STAGES steps ahead across tiles, while the
    num_warps MMA warps consume it a tile at a time (``_tile_mainloop``) and run each tile's epilogue."""
    num_blocks_n = gl.cdiv(inter, BLOCK_N)
    num_tiles = (gl.load(num_padded_ptr) // BLOCK_M) * num_blocks_n
    num_k = gl.cdiv(hidden, BLOCK_K)
    num_steps = gl.maximum(gl.cdiv(num_tiles - gl.program_id(0), gl.num_programs(0)), 0) * num_k
    b_rows_per_expert = 2 * inter if GATED else inter
    gate_up: gl.constexpr = (2 if GATE_UP_DOT else 1) if GATED else 0
    ready_count: gl.constexpr = GATHER_WARPS * 32 + 1 if GATHER else 1
    producer_warps: gl.constexpr = GATHER_WARPS if GATHER else 1
    producer_regs: gl.constexpr = GATHER_REGS if GATHER else LOADER_REGS
    consumer_regs: gl.constexpr = _consumer_regs(producer_regs)
    a_bufs, b_bufs, b2_bufs, ready, empty = _ring(A_LAYOUT, w_desc, NUM_STAGES, BLOCK_M, BLOCK_N, BLOCK_K, gate_up,
                                                  ready_count)  # fmt: skip
    turn = _turns(empty, PINGPONG)
    # (the partitions' arguments written out in each branch: the loader's shared tuple built once before them fails
    # to compile in Triton 3.6, "`_semantic` argument must be provided outside of JIT functions", session 16)
    if PINGPONG:
        gl.warp_specialize(
            [
                (_gemm1_mma_partition, (num_steps, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr,
                                        ready, empty, a_bufs, b_bufs, b2_bufs, act_desc, b_ptr, stride_be, stride_bn,
                                        topk_weights_ptr, sorted_ids_ptr, num_slots, inter, swiglu_alpha,
                                        swiglu_limit, turn, ACTIVATION, GATED, HAS_BIAS, WEIGHTS_ON_INPUT, BLOCK_M,
                                        BLOCK_N, GROUP_M, EXPERT_GROUPS, NUM_STAGES, gate_up, 0, True, GATHER,
                                        num_warps)),
                (_gemm1_mma_partition, (num_steps, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr,
                                        ready, empty, a_bufs, b_bufs, b2_bufs, act_desc, b_ptr, stride_be, stride_bn,
                                        topk_weights_ptr, sorted_ids_ptr, num_slots, inter, swiglu_alpha,
                                        swiglu_limit, turn, ACTIVATION, GATED, HAS_BIAS, WEIGHTS_ON_INPUT, BLOCK_M,
                                        BLOCK_N, GROUP_M, EXPERT_GROUPS, NUM_STAGES, gate_up, 1, True, GATHER,
                                        num_warps)),
                (_load_partition, (num_steps, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr,
                                   b_rows_per_expert, inter, x_desc, w_desc, ready, empty, a_bufs, b_bufs, b2_bufs,
                                   x_ptr, stride_xt, sorted_ids_ptr, num_slots, top_k, hidden, NUM_STAGES, BLOCK_M,
                                   BLOCK_N, BLOCK_K, GROUP_M, EXPERT_GROUPS, 0, gate_up, GATHER, EVEN_K)),
            ],
            [num_warps, producer_warps],
            [consumer_regs, producer_regs],
        )  # fmt: skip
    else:
        gl.warp_specialize(
            [
                (_gemm1_mma_partition, (num_steps, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr,
                                        ready, empty, a_bufs, b_bufs, b2_bufs, act_desc, b_ptr, stride_be, stride_bn,
                                        topk_weights_ptr, sorted_ids_ptr, num_slots, inter, swiglu_alpha,
                                        swiglu_limit, turn, ACTIVATION, GATED, HAS_BIAS, WEIGHTS_ON_INPUT, BLOCK_M,
                                        BLOCK_N, GROUP_M, EXPERT_GROUPS, NUM_STAGES, gate_up, 0, False, GATHER,
                                        num_warps)),
                (_load_partition, (num_steps, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr,
                                   b_rows_per_expert, inter, x_desc, w_desc, ready, empty, a_bufs, b_bufs, b2_bufs,
                                   x_ptr, stride_xt, sorted_ids_ptr, num_slots, top_k, hidden, NUM_STAGES, BLOCK_M,
                                   BLOCK_N, BLOCK_K, GROUP_M, EXPERT_GROUPS, 0, gate_up, GATHER, EVEN_K)),
            ],
            [producer_warps],
            [producer_regs],
        )  # fmt: skip


@gluon.jit
def _gluon_gemm2_kernel(
    act_desc,  # act [CAP, I], [BLOCK_M, BLOCK_K] boxes
    w_desc,  # w2 as [E*H, I], [BLOCK_N, BLOCK_K] boxes
    b_ptr,
    stride_be,
    stride_bh,
    topk_weights_ptr,
    out_ptr,  # [T, H] added atomically per token (ATOMIC), else [S, H] per slot
    stride_om,
    stride_oh,
    sorted_ids_ptr,
    expert_ids_ptr,
    expert_starts_ptr,  # [E + 1] first block of each expert (EXPERT_GROUPS)
    num_padded_ptr,
    num_slots,
    top_k,
    hidden,
    inter,
    HAS_BIAS: gl.constexpr,
    WEIGHTS_ON_INPUT: gl.constexpr,
    ATOMIC: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    GROUP_M: gl.constexpr,
    EXPERT_GROUPS: gl.constexpr,  # tiles ordered expert by expert (``_tile_coords``)
    COL_GROUP: gl.constexpr,  # tiles COL_GROUP column blocks at a time, 0: all (``_tile_coords``)
    NUM_STAGES: gl.constexpr,
    PINGPONG: gl.constexpr,  # two MMA warpgroups of num_warps take the tiles in turn (``_take_turn``)
    COMBINE: gl.constexpr,  # the combine in warps of its own, from a shared stage (``_combine_partition``)
    STAGE_LAYOUT: gl.constexpr,  # that stage's shared layout ([BLOCK_M, BLOCK_N] of out's dtype; None without COMBINE)
    num_warps: gl.constexpr,
):
    """GEMM 2 in GEMM 1's structure (one accumulator, the combine's epilogue)."""
    num_blocks_n = gl.cdiv(hidden, BLOCK_N)
    num_tiles = (gl.load(num_padded_ptr) // BLOCK_M) * num_blocks_n
    num_k = gl.cdiv(inter, BLOCK_K)
    num_steps = gl.maximum(gl.cdiv(num_tiles - gl.program_id(0), gl.num_programs(0)), 0) * num_k
    a_layout: gl.constexpr = act_desc.layout
    a_bufs, b_bufs, b2_bufs, ready, empty = _ring(a_layout, w_desc, NUM_STAGES, BLOCK_M, BLOCK_N, BLOCK_K, 0, 1)
    turn = _turns(empty, PINGPONG)
    if COMBINE:
        stage = gl.allocate_shared_memory(out_ptr.dtype.element_ty, [BLOCK_M, BLOCK_N], STAGE_LAYOUT)
        handoff = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(handoff.index(i), count=1)
        staged = handoff.index(0)
        drained = handoff.index(1)
    else:  # stand-ins, never touched
        stage = a_bufs
        staged = empty.index(0)
        drained = empty.index(0)
    # (the partitions' arguments written out in each branch: the loader's shared tuple built once before them fails
    # to compile in Triton 3.6, "`_semantic` argument must be provided outside of JIT functions", session 16)
    if PINGPONG:
        gl.warp_specialize(
            [
                (_gemm2_mma_partition, (num_steps, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr,
                                        ready, empty, a_bufs, b_bufs, b_ptr, stride_be, stride_bh, topk_weights_ptr,
                                        out_ptr, stride_om, stride_oh, sorted_ids_ptr, num_slots, top_k, hidden, turn,
                                        staged, drained, stage, HAS_BIAS, WEIGHTS_ON_INPUT, ATOMIC, BLOCK_M, BLOCK_N,
                                        GROUP_M, EXPERT_GROUPS, COL_GROUP, NUM_STAGES, 0, True, False, num_warps)),
                (_gemm2_mma_partition, (num_steps, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr,
                                        ready, empty, a_bufs, b_bufs, b_ptr, stride_be, stride_bh, topk_weights_ptr,
                                        out_ptr, stride_om, stride_oh, sorted_ids_ptr, num_slots, top_k, hidden, turn,
                                        staged, drained, stage, HAS_BIAS, WEIGHTS_ON_INPUT, ATOMIC, BLOCK_M, BLOCK_N,
                                        GROUP_M, EXPERT_GROUPS, COL_GROUP, NUM_STAGES, 1, True, False, num_warps)),
                (_load_partition, (num_steps, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr,
                                   hidden, 0, act_desc, w_desc, ready, empty, a_bufs, b_bufs, b2_bufs, out_ptr, 0,
                                   sorted_ids_ptr, num_slots, top_k, hidden, NUM_STAGES, BLOCK_M, BLOCK_N, BLOCK_K,
                                   GROUP_M, EXPERT_GROUPS, COL_GROUP, 0, False, True)),
            ],
            [num_warps, 1],
            [_consumer_regs(LOADER_REGS), LOADER_REGS],
        )  # fmt: skip
    elif COMBINE:
        gl.warp_specialize(
            [
                (_gemm2_mma_partition, (num_steps, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr,
                                        ready, empty, a_bufs, b_bufs, b_ptr, stride_be, stride_bh, topk_weights_ptr,
                                        out_ptr, stride_om, stride_oh, sorted_ids_ptr, num_slots, top_k, hidden, turn,
                                        staged, drained, stage, HAS_BIAS, WEIGHTS_ON_INPUT, ATOMIC, BLOCK_M, BLOCK_N,
                                        GROUP_M, EXPERT_GROUPS, COL_GROUP, NUM_STAGES, 0, False, True, num_warps)),
                (_load_partition, (num_steps, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr,
                                   hidden, 0, act_desc, w_desc, ready, empty, a_bufs, b_bufs, b2_bufs, out_ptr, 0,
                                   sorted_ids_ptr, num_slots, top_k, hidden, NUM_STAGES, BLOCK_M, BLOCK_N, BLOCK_K,
                                   GROUP_M, EXPERT_GROUPS, COL_GROUP, 0, False, True)),
                (_combine_partition, (num_steps, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr,
                                      staged, drained, stage, out_ptr, stride_om, stride_oh, sorted_ids_ptr, num_slots,
                                      top_k, hidden, ATOMIC, BLOCK_M, BLOCK_N, GROUP_M, EXPERT_GROUPS,
                                      COL_GROUP)),
            ],
            [1, COMBINE_WARPS],
            [LOADER_REGS, COMBINE_REGS],
        )  # fmt: skip
    else:
        gl.warp_specialize(
            [
                (_gemm2_mma_partition, (num_steps, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr,
                                        ready, empty, a_bufs, b_bufs, b_ptr, stride_be, stride_bh, topk_weights_ptr,
                                        out_ptr, stride_om, stride_oh, sorted_ids_ptr, num_slots, top_k, hidden, turn,
                                        staged, drained, stage, HAS_BIAS, WEIGHTS_ON_INPUT, ATOMIC, BLOCK_M, BLOCK_N,
                                        GROUP_M, EXPERT_GROUPS, COL_GROUP, NUM_STAGES, 0, False, False, num_warps)),
                (_load_partition, (num_steps, num_k, num_tiles, num_blocks_n, expert_ids_ptr, expert_starts_ptr,
                                   hidden, 0, act_desc, w_desc, ready, empty, a_bufs, b_bufs, b2_bufs, out_ptr, 0,
                                   sorted_ids_ptr, num_slots, top_k, hidden, NUM_STAGES, BLOCK_M, BLOCK_N, BLOCK_K,
                                   GROUP_M, EXPERT_GROUPS, COL_GROUP, 0, False, True)),
            ],
            [1],
            [LOADER_REGS],
        )  # fmt: skip
