"""Triton kernels of the fused expert MLP: GEMM 1 (gather + gate/up + activation) and GEMM 2 (+ weight, combine).

Dimension letters: T tokens, K top-k, E experts, H hidden, I expert intermediate; S = T*K slots
(slot s is token s // K, its pick s % K); CAP padded rows (see ``tilemoe.ops.align``).
    x            [T, H]        activations
    w13          [E, 2I, H]    gate rows [0, I) then up rows [I, 2I)   ([E, I, H] when GATED is False)
    b13          [E, 2I]       optional
    w2           [E, H, I]
    b2           [E, H]        optional
    topk_weights [S]           float32 routing weight of each slot
    x_sorted     [CAP, H]      x in padded sorted order (GEMM 1's A_TMA input; padding rows zero)
    sorted_ids   [CAP]         slot at each padded row (S = padding)
    expert_ids   [CAP / BM]    expert of each block of BLOCK_M rows
    num_padded   [1]           rows in use; blocks at or past it exit
    act          [CAP, I]      GEMM 1 output, rows in padded sorted order (padding rows hold act(bias) * ...)
    out_slots    [S, H]        GEMM 2 output per slot (deterministic combine: summed over K afterwards)
    out_acc      [T, H]        GEMM 2 output added atomically per token, in x.dtype (the atomic combine)
Accumulation in float32; fp32 operands go through 3xTF32 (``_dot``).
WEIGHTS_ON_INPUT (the routing weight scales the layer input, Llama 4): GEMM 1 scales its float32 accumulators by the
slot's weight, (w x) @ W = w (x @ W), rather than the x tile before the dot: on an H100 (Triton 3.6, bf16, TMA weight
boxes) the A tile scaled in registers inside the k loop gave wrong rows now and then: 8 of 180 runs of one-expert
shapes at T = 1000-2000 with such a routing, none of 60 with a softmax routing (bench/NOTES.md, version 6). The
accumulator form is also nearer the float64 reference (no bf16 rounding of w x).

Weights come through pointers or, with W_TMA, through host-built tensor descriptors over the 2-D views
w13 [E*N1, H] / w2 [E*H, I] (N1 = 2I gated, else I): a [BLOCK_N, BLOCK_K] box per load, zero-filled past H or I.
A box that runs past the expert's last row reads the next rows of the view; those columns are never stored.
With A_TMA, GEMM 2 reads act through a tensor descriptor too ([BLOCK_M, BLOCK_K] boxes, zero-filled past I), and
GEMM 1 reads x_sorted [CAP, H] (x copied into padded order by ``_sorted_rows_kernel``, padding rows zero) through
one instead of gathering x rows by token. With GATE_UP_DOT (gated), GEMM 1's weight descriptor is 3-D over w13
viewed as [2E, I, H]: a [2, BLOCK_N, BLOCK_K] box at (2e, n, k) holds the gate rows and the matching up rows (zero-
filled past I), one dot per k step fills a [ROWS, 2 BLOCK_N] accumulator, split into gate and up in the epilogue.
Both GEMMs run one program per tile (tiles past ``num_padded`` exit at once), or with PERSISTENT one program per SM
walks the tiles (rows in use read from ``num_padded``) in a loop flattened with the k loop, so the next tile's
loads overlap this tile's epilogue. GEMM 1's persistent form with gathered rows and two accumulators measured 6-15%
slower on an H100 (bench/NOTES.md, version 4); A_TMA and GATE_UP_DOT give it the dense GEMM's structure, for which
the flattened loop was 17-31% faster.
With SPLIT_TAIL a block whose second half is all padding (its expert's last block, at most BLOCK_M / 2 real rows)
runs BLOCK_M / 2-row tiles: GEMM 1 neither computes nor writes the rows past the half, and a GEMM 2 with SPLIT_TAIL
never reads them; a GEMM 2 without it runs full tiles, computing those rows from whatever act holds and storing
nothing of them (its stores are masked to real rows). A PERSISTENT loop with SPLIT_TAIL (``KernelConfig``'s
persistent_tails) is not flattened: a flattened loop holds one tile shape.
"""

import triton
import triton.language as tl

from tilemoe.ops._kernels._activation import _activate, _up_factor
from tilemoe.ops._kernels._pdl import _pdl_prologue


@triton.jit
def _dot(a, b, acc, FP32_PRECISE: tl.constexpr):
    # fp32 operands: 3xTF32 (near-fp32; one tf32 pass per GEMM gave 2.3e-3 relative error on the H100,
    # over the 2e-3 fp32 budget); fp16/bf16: the plain tensor-core dot
    if FP32_PRECISE:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a, b, acc)


@triton.jit
def _zero_share(ptr, numel, BLOCK: tl.constexpr):
    """This program's contiguous share of ``numel`` elements at ``ptr`` set to zero (the shares of all programs of
    the grid cover [0, numel) once). GEMM 1 clears the atomic combine's output this way (``ZERO_OUT``): the stores
    drain under its loads instead of taking a launch of their own."""
    share = tl.cdiv(numel, tl.num_programs(0))
    start = tl.program_id(0).to(tl.int64) * share
    lanes = tl.arange(0, BLOCK)
    zeros = tl.zeros([BLOCK], dtype=ptr.dtype.element_ty)
    for offset in range(0, share, BLOCK):
        index = start + offset + lanes
        tl.store(ptr + index, zeros, mask=(offset + lanes < share) & (index < numel))


@triton.jit
def _tile_ids(tile, num_blocks_m, num_blocks_n, GROUP_M: tl.constexpr):
    """Tile index -> (block of rows, block of columns), GROUP_M row blocks at a time (weights stay in L2)."""
    in_group = GROUP_M * num_blocks_n
    group = tile // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (tile % in_group) % size_m
    pid_n = (tile % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _tile_coords(tile, num_blocks_m, num_blocks_n, expert_ids_ptr, expert_starts_ptr, GROUP_M: tl.constexpr,
                 EXPERT_GROUPS: tl.constexpr, COL_GROUP: tl.constexpr = 0):  # fmt: skip
    """Tile index -> (block of rows, block of columns, the block's expert id). Without EXPERT_GROUPS: ``_tile_ids`` over
    all the row blocks,
    whose groups of GROUP_M blocks straddle experts (an expert's blocks cut by a group edge stream its weights from
    HBM once per group: ncu counted 2.4x w13's bytes read by mixtral-8x7b T=4096's GEMM 1, bench/NOTES.md version
    15). With EXPERT_GROUPS: the tiles run expert by expert (each expert's tiles are the ones whose block
    ``tile // num_blocks_n`` is one of its blocks, as the blocks are sorted by expert), ``_tile_ids`` within the
    expert's own blocks, so a group never spans two experts. ``tile`` must lie below the used blocks' tiles.

    COL_GROUP > 0 (GEMM 2's ``KernelConfig.col_group2``; ``num_blocks_m`` = the blocks in use): all the row blocks'
    tiles of COL_GROUP column blocks first, in the order above, then those of the next COL_GROUP columns, so the
    combine's adds land in a slice of the output that L2 can hold."""
    if COL_GROUP > 0:
        col_tiles = num_blocks_m * COL_GROUP
        first_n = (tile // col_tiles) * COL_GROUP
        tile = tile % col_tiles
        num_blocks_n = tl.minimum(num_blocks_n - first_n, COL_GROUP)
    else:
        first_n = 0
    if EXPERT_GROUPS:
        expert = tl.load(expert_ids_ptr + tile // num_blocks_n)
        first = tl.load(expert_starts_ptr + expert)
        size = tl.load(expert_starts_ptr + expert + 1) - first
        pid_m, pid_n = _tile_ids(tile - first * num_blocks_n, size, num_blocks_n, GROUP_M)
        pid_m += first
    else:
        pid_m, pid_n = _tile_ids(tile, num_blocks_m, num_blocks_n, GROUP_M)
        expert = tl.load(expert_ids_ptr + pid_m)
    return pid_m, pid_n + first_n, expert


@triton.jit
def _tile_live(tile, num_blocks_m, num_blocks_n, num_padded, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr,
               EXPERT_GROUPS: tl.constexpr):  # fmt: skip
    """Whether one-program-per-tile tile ``tile`` (a grid over all ``num_blocks_m`` blocks of the capacity) has a
    block in use: under EXPERT_GROUPS the used blocks' tiles come first (``_tile_coords`` may only see those), else
    ``_tile_ids`` spreads them and the tile's block says."""
    if EXPERT_GROUPS:
        live = tile < (num_padded // BLOCK_M) * num_blocks_n
    else:
        pid_m, _ = _tile_ids(tile, num_blocks_m, num_blocks_n, GROUP_M)
        live = pid_m * BLOCK_M < num_padded
    return live


@triton.jit
def _rows_from_empty(sorted_ids_ptr, pid_m, num_slots, FIRST: tl.constexpr, BLOCK_M: tl.constexpr):
    """True when rows [FIRST, BLOCK_M) of block pid_m are all padding (an expert's real rows come first in its padded
    range, so row FIRST tells): the block holds at most FIRST real rows."""
    return tl.load(sorted_ids_ptr + pid_m * BLOCK_M + FIRST) >= num_slots


@triton.jit
def _second_half_empty(sorted_ids_ptr, pid_m, num_slots, BLOCK_M: tl.constexpr):
    """True when rows [BLOCK_M / 2, BLOCK_M) of block pid_m are all padding: the block is its expert's last, holding at
    most BLOCK_M / 2 real rows (a random routing leaves about half the experts such a tail)."""
    return _rows_from_empty(sorted_ids_ptr, pid_m, num_slots, BLOCK_M // 2, BLOCK_M)


@triton.jit
def _folds(sorted_ids_ptr, expert_ids_ptr, pid_m, expert, num_blocks_m, num_slots, BLOCK_M: tl.constexpr):
    """(this block is a tail folded into the block before it, the next block is a tail this block's tile folds in)
    under FOLD_TAILS: a tail is an expert's last block holding at most BLOCK_M / 2 real rows (``_second_half_empty``)
    after another block of the same expert. Blocks past the ones in use hold expert E in expert_ids, so they never
    match; the next block's loads are masked at the end of the capacity."""
    prev = tl.load(expert_ids_ptr + pid_m - 1, mask=pid_m > 0, other=-1)
    folded = (prev == expert) & _second_half_empty(sorted_ids_ptr, pid_m, num_slots, BLOCK_M)
    has_next = pid_m + 1 < num_blocks_m
    nxt = tl.load(expert_ids_ptr + pid_m + 1, mask=has_next, other=-1)
    next_slot = tl.load(sorted_ids_ptr + (pid_m + 1) * BLOCK_M + BLOCK_M // 2, mask=has_next, other=0)
    folds_next = has_next & (nxt == expert) & (next_slot >= num_slots)
    return folded, folds_next


@triton.jit
def _load_w(w_ptrs, w_desc, row, k0, k_mask, col_mask, W_TMA: tl.constexpr, EVEN: tl.constexpr):
    """[BLOCK_K, BLOCK_N] weight tile: a TMA box [BLOCK_N, BLOCK_K] at (row, k0) transposed, or a pointer load."""
    if W_TMA:
        return w_desc.load([row, k0]).T
    elif EVEN:
        return tl.load(w_ptrs)
    else:
        return tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _load_a(a_ptrs, a_desc, row, k0, k_mask, A_TMA: tl.constexpr, EVEN_K: tl.constexpr):
    """[ROWS, BLOCK_K] input tile: a TMA box at (row, k0) (zero-filled past the reduced dim) or a pointer load."""
    if A_TMA:
        return a_desc.load([row, k0])
    elif EVEN_K:
        return tl.load(a_ptrs)
    else:
        return tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)


@triton.jit
def _block_rows(sorted_ids_ptr, first_row, num_slots, top_k, ROWS: tl.constexpr):
    """Rows [first_row, first_row + ROWS) of the padded order: (rows, their slots, which slots are real, their tokens
    in int64; a padding row's token is 0, so a gather of x by token needs no row mask)."""
    rows = first_row + tl.arange(0, ROWS)
    slot = tl.load(sorted_ids_ptr + rows)
    valid = slot < num_slots
    token = tl.where(valid, slot // top_k, 0).to(tl.int64)
    return rows, slot, valid, token


@triton.jit
def _gemm1_columns(expert, pid_n, inter, GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A GEMM 1 tile's column side: (expert as int64, its BLOCK_N columns of I, which are inside I, the k offsets of
    a box, the first gate row of w13 viewed as [E * N1, H], the 2-D TMA descriptor's row)."""
    expert = expert.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n1 = 2 * inter if GATED else inter
    gate_row = (expert * n1 + pid_n * BLOCK_N).to(tl.int32)
    return expert, cols, cols < inter, tl.arange(0, BLOCK_K), gate_row


@triton.jit
def _gemm1_w_ptrs(w_ptr, expert, cols, ks, stride_we, stride_wn, stride_wh, inter, W_TMA: tl.constexpr):
    """(gate, up) weight tiles of GEMM 1's k loop: w_ptr itself twice under W_TMA (the descriptor; the pointer tiles
    are never formed), else [BLOCK_K, BLOCK_N] pointer views of the expert's gate rows and its up rows (I further
    down)."""
    if W_TMA:
        g_ptrs = w_ptr
        u_ptrs = w_ptr
    else:
        g_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wh
        u_ptrs = g_ptrs + inter * stride_wn
    return g_ptrs, u_ptrs


@triton.jit
def _gemm1_tile(
    pid_m,  # the tile's coordinates and its block's expert, from ``_tile_coords``
    pid_n,
    expert,
    x_ptr,
    x_tail_ptr,  # EXTRA's rows: x_ptr, or with A_TMA a descriptor of [BLOCK_M // 2, BLOCK_K] boxes
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
    num_slots,
    top_k,
    hidden,
    inter,
    swiglu_alpha,
    swiglu_limit,
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
    ROWS: tl.constexpr,  # rows computed: BLOCK_M, or BLOCK_M // 2 (x_ptr's TMA boxes are then [ROWS, BLOCK_K])
    EXTRA: tl.constexpr,  # 0, or BLOCK_M // 2: the next block's first rows too (a folded tail), on the same weights
):
    row0 = pid_m * BLOCK_M
    rows, slot, valid, token = _block_rows(sorted_ids_ptr, row0, num_slots, top_k, ROWS)
    expert, cols, col_mask, ks, gate_row = _gemm1_columns(expert, pid_n, inter, GATED, BLOCK_N, BLOCK_K)

    if A_TMA:  # x_ptr is the descriptor of x in padded order (x_sorted); the pointer tile is never formed
        a_ptrs = x_ptr
    else:  # rows gathered by token
        a_ptrs = x_ptr + token[:, None] * stride_xt + ks[None, :] * stride_xh
    if EXTRA:  # the folded tail's rows: the next block's first EXTRA
        rows_x, slot_x, valid_x, token_x = _block_rows(sorted_ids_ptr, row0 + BLOCK_M, num_slots, top_k, EXTRA)
        if A_TMA:
            ax_ptrs = x_tail_ptr
        else:
            ax_ptrs = x_ptr + token_x[:, None] * stride_xt + ks[None, :] * stride_xh
    g_ptrs, u_ptrs = _gemm1_w_ptrs(w_ptr, expert, cols, ks, stride_we, stride_wn, stride_wh, inter, W_TMA)
    # padding rows read token 0 (finite, discarded by GEMM 2): the A loads need no row mask
    if GATE_UP_DOT:  # one [ROWS, 2 BLOCK_N] accumulator, gate columns then up columns (see the module docstring)
        acc = tl.zeros([ROWS, 2 * BLOCK_N], dtype=tl.float32)
        if EXTRA:
            acc_x = tl.zeros([EXTRA, 2 * BLOCK_N], dtype=tl.float32)
        box_row = (2 * expert).to(tl.int32)
        for k0 in range(0, tl.cdiv(hidden, BLOCK_K)):
            k_mask = ks < hidden - k0 * BLOCK_K
            a = _load_a(a_ptrs, x_ptr, row0, k0 * BLOCK_K, k_mask, A_TMA, EVEN_K)
            w = w_ptr.load([box_row, pid_n * BLOCK_N, k0 * BLOCK_K]).reshape(2 * BLOCK_N, BLOCK_K)
            acc = _dot(a, w.T, acc, FP32_PRECISE)
            if EXTRA:
                ax = _load_a(ax_ptrs, x_tail_ptr, row0 + BLOCK_M, k0 * BLOCK_K, k_mask, A_TMA, EVEN_K)
                acc_x = _dot(ax, w.T, acc_x, FP32_PRECISE)
                if not A_TMA:
                    ax_ptrs += BLOCK_K * stride_xh
            if not A_TMA:
                a_ptrs += BLOCK_K * stride_xh
        acc_g, acc_u = acc.reshape(ROWS, 2, BLOCK_N).permute(0, 2, 1).split()
        if EXTRA:
            acc_gx, acc_ux = acc_x.reshape(EXTRA, 2, BLOCK_N).permute(0, 2, 1).split()
    else:
        acc_g = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        if EXTRA:
            acc_gx = tl.zeros([EXTRA, BLOCK_N], dtype=tl.float32)
            acc_ux = tl.zeros([EXTRA, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, tl.cdiv(hidden, BLOCK_K)):
            k_mask = ks < hidden - k0 * BLOCK_K
            a = _load_a(a_ptrs, x_ptr, row0, k0 * BLOCK_K, k_mask, A_TMA, EVEN_K)
            wg = _load_w(g_ptrs, w_ptr, gate_row, k0 * BLOCK_K, k_mask, col_mask, W_TMA, EVEN_K and EVEN_N)
            acc_g = _dot(a, wg, acc_g, FP32_PRECISE)
            if EXTRA:
                ax = _load_a(ax_ptrs, x_tail_ptr, row0 + BLOCK_M, k0 * BLOCK_K, k_mask, A_TMA, EVEN_K)
                acc_gx = _dot(ax, wg, acc_gx, FP32_PRECISE)
            if GATED:
                wu = _load_w(u_ptrs, w_ptr, gate_row + inter, k0 * BLOCK_K, k_mask, col_mask, W_TMA, EVEN_K and EVEN_N)
                acc_u = _dot(a, wu, acc_u, FP32_PRECISE)
                if EXTRA:
                    acc_ux = _dot(ax, wu, acc_ux, FP32_PRECISE)
            if not A_TMA:
                a_ptrs += BLOCK_K * stride_xh
                if EXTRA:
                    ax_ptrs += BLOCK_K * stride_xh
            if not W_TMA:
                g_ptrs += BLOCK_K * stride_wh
                u_ptrs += BLOCK_K * stride_wh

    _gemm1_store(acc_g, acc_u, rows, slot, valid, expert, cols, col_mask, b_ptr, stride_be, stride_bn,
                 topk_weights_ptr, act_ptr, stride_am, stride_ai, inter, swiglu_alpha, swiglu_limit, ACTIVATION,
                 GATED, HAS_BIAS, WEIGHTS_ON_INPUT)  # fmt: skip
    if EXTRA:
        _gemm1_store(acc_gx, acc_ux, rows_x, slot_x, valid_x, expert, cols, col_mask, b_ptr, stride_be, stride_bn,
                     topk_weights_ptr, act_ptr, stride_am, stride_ai, inter, swiglu_alpha, swiglu_limit, ACTIVATION,
                     GATED, HAS_BIAS, WEIGHTS_ON_INPUT)  # fmt: skip


@triton.jit
def _gemm1_tile_swapped(
    pid_m, pid_n, expert, x_ptr, stride_xt, stride_xh, w_ptr, stride_we, stride_wn, stride_wh,
    b_ptr, stride_be, stride_bn, topk_weights_ptr, act_ptr, stride_am, stride_ai,
    sorted_ids_ptr, num_slots, top_k, hidden, inter, swiglu_alpha, swiglu_limit,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, WEIGHTS_ON_INPUT: tl.constexpr,
    FP32_PRECISE: tl.constexpr, W_TMA: tl.constexpr, GATE_UP_DOT: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """GEMM 1 on the first ROWS rows of block pid_m (a tail of at most ROWS real rows, SWAP_TAILS) with the operands'
    roles swapped: acc^T [N, ROWS] = W [N, K] @ x^T [K, ROWS], the weight box as the MMA's M and the block's tokens as
    its N, so the MMAs scale with ROWS instead of a tile's height (Hopper's wgmma: M = 64 a warpgroup, N from 8).
    x's rows are gathered by token (no x_sorted); the epilogue is ``_gemm1_store``'s on acc^T transposed."""
    rows, slot, valid, token = _block_rows(sorted_ids_ptr, pid_m * BLOCK_M, num_slots, top_k, ROWS)
    expert, cols, col_mask, ks, gate_row = _gemm1_columns(expert, pid_n, inter, GATED, BLOCK_N, BLOCK_K)
    a_ptrs = x_ptr + token[:, None] * stride_xt + ks[None, :] * stride_xh
    g_ptrs, u_ptrs = _gemm1_w_ptrs(w_ptr, expert, cols, ks, stride_we, stride_wn, stride_wh, inter, W_TMA)
    if GATE_UP_DOT:  # one [2 BLOCK_N, ROWS] accumulator: gate rows, then up rows
        acc_t = tl.zeros([2 * BLOCK_N, ROWS], dtype=tl.float32)
        box_row = (2 * expert).to(tl.int32)
        for k0 in range(0, tl.cdiv(hidden, BLOCK_K)):
            k_mask = ks < hidden - k0 * BLOCK_K
            a = _load_a(a_ptrs, x_ptr, 0, k0 * BLOCK_K, k_mask, False, EVEN_K)
            w = w_ptr.load([box_row, pid_n * BLOCK_N, k0 * BLOCK_K]).reshape(2 * BLOCK_N, BLOCK_K)
            acc_t = _dot(w, a.T, acc_t, FP32_PRECISE)
            a_ptrs += BLOCK_K * stride_xh
        acc_g, acc_u = acc_t.T.reshape(ROWS, 2, BLOCK_N).permute(0, 2, 1).split()
    else:
        acc_tg = tl.zeros([BLOCK_N, ROWS], dtype=tl.float32)
        acc_tu = tl.zeros([BLOCK_N, ROWS], dtype=tl.float32)
        for k0 in range(0, tl.cdiv(hidden, BLOCK_K)):
            k_mask = ks < hidden - k0 * BLOCK_K
            a = _load_a(a_ptrs, x_ptr, 0, k0 * BLOCK_K, k_mask, False, EVEN_K)
            wg = _load_w(g_ptrs, w_ptr, gate_row, k0 * BLOCK_K, k_mask, col_mask, W_TMA, EVEN_K and EVEN_N)
            acc_tg = _dot(wg.T, a.T, acc_tg, FP32_PRECISE)
            if GATED:
                wu = _load_w(u_ptrs, w_ptr, gate_row + inter, k0 * BLOCK_K, k_mask, col_mask, W_TMA, EVEN_K and EVEN_N)
                acc_tu = _dot(wu.T, a.T, acc_tu, FP32_PRECISE)
            a_ptrs += BLOCK_K * stride_xh
            if not W_TMA:
                g_ptrs += BLOCK_K * stride_wh
                u_ptrs += BLOCK_K * stride_wh
        acc_g = acc_tg.T
        acc_u = acc_tu.T
    _gemm1_store(acc_g, acc_u, rows, slot, valid, expert, cols, col_mask, b_ptr, stride_be, stride_bn,
                 topk_weights_ptr, act_ptr, stride_am, stride_ai, inter, swiglu_alpha, swiglu_limit, ACTIVATION,
                 GATED, HAS_BIAS, WEIGHTS_ON_INPUT)  # fmt: skip


@triton.jit
def _gemm1_store(acc_g, acc_u, rows, slot, valid, expert, cols, col_mask, b_ptr, stride_be, stride_bn,
                 topk_weights_ptr, act_ptr, stride_am, stride_ai, inter, swiglu_alpha, swiglu_limit,
                 ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 WEIGHTS_ON_INPUT: tl.constexpr):  # fmt: skip
    """GEMM 1's epilogue for ``rows`` (holding ``slot``): the activated intermediate, rounded to the operand dtype
    like an unfused h = x @ w13^T."""
    dtype = act_ptr.dtype.element_ty
    if WEIGHTS_ON_INPUT:  # (w x) @ W = w (x @ W), see the module docstring
        row_weight = tl.load(topk_weights_ptr + slot, mask=valid, other=0.0)
        acc_g = acc_g * row_weight[:, None]
        acc_u = acc_u * row_weight[:, None]
    if HAS_BIAS:
        b_row = b_ptr + expert * stride_be
        acc_g += tl.load(b_row + cols * stride_bn, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_row + (cols + inter) * stride_bn, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    g = acc_g.to(dtype).to(tl.float32)
    result = _activate(g, ACTIVATION, swiglu_alpha, swiglu_limit)
    if GATED:
        u = acc_u.to(dtype).to(tl.float32)
        result = result * _up_factor(u, ACTIVATION, swiglu_limit)
    out_ptrs = act_ptr + rows[:, None].to(tl.int64) * stride_am + cols[None, :] * stride_ai
    tl.store(out_ptrs, result.to(dtype), mask=col_mask[None, :])


@triton.jit
def _gemm1_block(
    tile, num_blocks_m, x_ptr, x_tail_ptr, stride_xt, stride_xh, w_ptr, stride_we, stride_wn, stride_wh,
    b_ptr, stride_be, stride_bn, topk_weights_ptr, act_ptr, stride_am, stride_ai,
    sorted_ids_ptr, expert_ids_ptr, expert_starts_ptr, num_slots, top_k, hidden, inter, swiglu_alpha, swiglu_limit,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, WEIGHTS_ON_INPUT: tl.constexpr,
    FP32_PRECISE: tl.constexpr, W_TMA: tl.constexpr, A_TMA: tl.constexpr, GATE_UP_DOT: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EXPERT_GROUPS: tl.constexpr, SPLIT_TAIL: tl.constexpr, FOLD_TAILS: tl.constexpr,
    SWAP_TAILS: tl.constexpr = False,
):  # fmt: skip
    """GEMM 1 tile ``tile``: its block's first quarter only, operands swapped (``_gemm1_tile_swapped``), when SWAP_TAILS
    and the rest is padding; its first half only (x_tail_ptr's boxes) when SPLIT_TAIL and the second half is
    padding, else the whole block (Triton needs the row count as a constexpr: one call per height). Under FOLD_TAILS
    a tail after a block of the same expert is computed by that block's tile, as BLOCK_M / 2 more rows on the same
    weight boxes (``_folds``), and its own tile does nothing. Returns the tile's (pid_m, pid_n): ``_tile_coords`` runs
    once a tile, its loads dependent ones under EXPERT_GROUPS."""
    pid_m, pid_n, expert = _tile_coords(
        tile, num_blocks_m, tl.cdiv(inter, BLOCK_N), expert_ids_ptr, expert_starts_ptr, GROUP_M, EXPERT_GROUPS
    )
    own_rows = True  # the block's rows are its own tile's (a constant without FOLD_TAILS: the branch is static)
    if FOLD_TAILS:
        folded, folds_next = _folds(sorted_ids_ptr, expert_ids_ptr, pid_m, expert, num_blocks_m, num_slots, BLOCK_M)
        if folds_next:
            _gemm1_tile(
                pid_m, pid_n, expert, x_ptr, x_tail_ptr, stride_xt, stride_xh, w_ptr, stride_we, stride_wn,
                stride_wh, b_ptr, stride_be, stride_bn, topk_weights_ptr, act_ptr, stride_am, stride_ai,
                sorted_ids_ptr,
                num_slots, top_k, hidden, inter, swiglu_alpha, swiglu_limit,
                ACTIVATION, GATED, HAS_BIAS, WEIGHTS_ON_INPUT, FP32_PRECISE, W_TMA, A_TMA, GATE_UP_DOT, EVEN_K,
                EVEN_N, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_M, BLOCK_M // 2,
            )  # fmt: skip
        own_rows = ~(folded | folds_next)
    if own_rows:
        if SWAP_TAILS and _rows_from_empty(sorted_ids_ptr, pid_m, num_slots, BLOCK_M // 4, BLOCK_M):
            _gemm1_tile_swapped(
                pid_m, pid_n, expert, x_ptr, stride_xt, stride_xh, w_ptr, stride_we, stride_wn, stride_wh,
                b_ptr, stride_be, stride_bn, topk_weights_ptr, act_ptr, stride_am, stride_ai,
                sorted_ids_ptr, num_slots, top_k, hidden, inter, swiglu_alpha, swiglu_limit,
                ACTIVATION, GATED, HAS_BIAS, WEIGHTS_ON_INPUT, FP32_PRECISE, W_TMA, GATE_UP_DOT, EVEN_K, EVEN_N,
                BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_M // 4,
            )  # fmt: skip
        elif SPLIT_TAIL and _second_half_empty(sorted_ids_ptr, pid_m, num_slots, BLOCK_M):
            _gemm1_tile(
                pid_m, pid_n, expert, x_tail_ptr, x_tail_ptr, stride_xt, stride_xh, w_ptr, stride_we, stride_wn,
                stride_wh, b_ptr, stride_be, stride_bn, topk_weights_ptr, act_ptr, stride_am, stride_ai,
                sorted_ids_ptr,
                num_slots, top_k, hidden, inter, swiglu_alpha, swiglu_limit,
                ACTIVATION, GATED, HAS_BIAS, WEIGHTS_ON_INPUT, FP32_PRECISE, W_TMA, A_TMA, GATE_UP_DOT, EVEN_K,
                EVEN_N, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_M // 2, 0,
            )  # fmt: skip
        else:
            _gemm1_tile(
                pid_m, pid_n, expert, x_ptr, x_tail_ptr, stride_xt, stride_xh, w_ptr, stride_we, stride_wn,
                stride_wh, b_ptr, stride_be, stride_bn, topk_weights_ptr, act_ptr, stride_am, stride_ai,
                sorted_ids_ptr,
                num_slots, top_k, hidden, inter, swiglu_alpha, swiglu_limit,
                ACTIVATION, GATED, HAS_BIAS, WEIGHTS_ON_INPUT, FP32_PRECISE, W_TMA, A_TMA, GATE_UP_DOT, EVEN_K,
                EVEN_N, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_M, 0,
            )  # fmt: skip
    return pid_m, pid_n


@triton.jit
def _gemm1_kernel(
    x_ptr,  # x, or with A_TMA the descriptor of x_sorted ([BLOCK_M, BLOCK_K] boxes)
    x_tail_ptr,  # x_ptr again, or with A_TMA a descriptor of [BLOCK_M // 2, BLOCK_K] boxes (SPLIT_TAIL)
    stride_xt,
    stride_xh,
    w_ptr,  # w13, or its tensor descriptor when W_TMA (3-D [2, BLOCK_N, BLOCK_K] boxes when GATE_UP_DOT)
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
    expert_starts_ptr,  # [E + 1] first block of each expert (EXPERT_GROUPS)
    num_padded_ptr,
    num_slots,
    top_k,
    hidden,
    inter,
    num_blocks_m,
    swiglu_alpha,
    swiglu_limit,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WEIGHTS_ON_INPUT: tl.constexpr,
    FP32_PRECISE: tl.constexpr,
    W_TMA: tl.constexpr,
    A_TMA: tl.constexpr,  # the input through TMA boxes over x_sorted (x in padded order)
    GATE_UP_DOT: tl.constexpr,  # one dot over [gate | up] (W_TMA and GATED)
    PERSISTENT: tl.constexpr,  # one program per SM walking the tiles, loop flattened with the k loop
    EVEN_K: tl.constexpr,  # the reduced dim is a multiple of BLOCK_K: no masks in the main loop
    EVEN_N: tl.constexpr,  # the output columns are a multiple of BLOCK_N
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EXPERT_GROUPS: tl.constexpr,  # tiles ordered expert by expert, GROUP_M blocks of one expert at a time
    SPLIT_TAIL: tl.constexpr,  # a block whose second half is padding computes its first half only
    FOLD_TAILS: tl.constexpr,  # a tail after a block of its expert is computed by that block's tile
    PDL: tl.constexpr,
    zero_ptr,  # with ZERO_OUT: a contiguous buffer of zero_numel elements that every program clears a share of
    zero_numel,
    ZERO_OUT: tl.constexpr,
    SWAP_TAILS: tl.constexpr = False,  # a block of at most BLOCK_M / 4 real rows: ``_gemm1_tile_swapped``
    ZERO_BLOCK: tl.constexpr = 1024,
):
    _pdl_prologue(PDL)
    if ZERO_OUT:  # before any early exit: every program of the grid owns a share
        _zero_share(zero_ptr, zero_numel, ZERO_BLOCK)
    num_padded = tl.load(num_padded_ptr)
    if PERSISTENT:
        used_m = num_padded // BLOCK_M
        num_tiles = used_m * tl.cdiv(inter, BLOCK_N)
        if SPLIT_TAIL or FOLD_TAILS or SWAP_TAILS:  # a tile's height picked per tile: the loop is not flattened
            for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
                _gemm1_block(
                    tile, used_m, x_ptr, x_tail_ptr, stride_xt, stride_xh, w_ptr, stride_we, stride_wn, stride_wh,
                    b_ptr, stride_be, stride_bn, topk_weights_ptr, act_ptr, stride_am, stride_ai,
                    sorted_ids_ptr, expert_ids_ptr, expert_starts_ptr,
                    num_slots, top_k, hidden, inter, swiglu_alpha, swiglu_limit,
                    ACTIVATION, GATED, HAS_BIAS, WEIGHTS_ON_INPUT, FP32_PRECISE, W_TMA, A_TMA, GATE_UP_DOT, EVEN_K,
                    EVEN_N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EXPERT_GROUPS, SPLIT_TAIL, FOLD_TAILS, SWAP_TAILS,
                )  # fmt: skip
        else:
            for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
                _gemm1_block(
                    tile, used_m, x_ptr, x_tail_ptr, stride_xt, stride_xh, w_ptr, stride_we, stride_wn, stride_wh,
                    b_ptr, stride_be, stride_bn, topk_weights_ptr, act_ptr, stride_am, stride_ai,
                    sorted_ids_ptr, expert_ids_ptr, expert_starts_ptr,
                    num_slots, top_k, hidden, inter, swiglu_alpha, swiglu_limit,
                    ACTIVATION, GATED, HAS_BIAS, WEIGHTS_ON_INPUT, FP32_PRECISE, W_TMA, A_TMA, GATE_UP_DOT, EVEN_K,
                    EVEN_N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EXPERT_GROUPS, False, False,
                )  # fmt: skip
    else:
        tile = tl.program_id(0)
        if _tile_live(tile, num_blocks_m, tl.cdiv(inter, BLOCK_N), num_padded, BLOCK_M, GROUP_M, EXPERT_GROUPS):
            _gemm1_block(
                tile, num_blocks_m, x_ptr, x_tail_ptr, stride_xt, stride_xh, w_ptr, stride_we, stride_wn, stride_wh,
                b_ptr, stride_be, stride_bn, topk_weights_ptr, act_ptr, stride_am, stride_ai,
                sorted_ids_ptr, expert_ids_ptr, expert_starts_ptr,
                num_slots, top_k, hidden, inter, swiglu_alpha, swiglu_limit,
                ACTIVATION, GATED, HAS_BIAS, WEIGHTS_ON_INPUT, FP32_PRECISE, W_TMA, A_TMA, GATE_UP_DOT, EVEN_K,
                EVEN_N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EXPERT_GROUPS, SPLIT_TAIL, FOLD_TAILS, SWAP_TAILS,
            )  # fmt: skip


@triton.jit
def _sorted_rows_kernel(
    x_ptr,
    stride_xt,
    stride_xh,
    out_ptr,
    stride_or,
    stride_oh,
    sorted_ids_ptr,
    num_padded_ptr,
    num_slots,
    top_k,
    hidden,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr,
):
    """x_sorted[r] = x[sorted_ids[r] // K] for the padded rows r in use, zeros for padding rows (GEMM 1's A_TMA)."""
    _pdl_prologue(PDL)
    _sorted_row_block(
        x_ptr, stride_xt, stride_xh, out_ptr, stride_or, stride_oh, sorted_ids_ptr, num_padded_ptr, num_slots, top_k,
        hidden, tl.program_id(0) * BLOCK_R, BLOCK_R, BLOCK_H, False,
    )  # fmt: skip


@triton.jit
def _sorted_row_block(
    x_ptr, stride_xt, stride_xh, out_ptr, stride_or, stride_oh, sorted_ids_ptr, num_padded_ptr, num_slots, top_k,
    hidden, first, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, PADDING_ONLY: tl.constexpr,
):  # fmt: skip
    """Rows [first, first + BLOCK_R) of x's padded sorted copy, those in use: x's row of each real row's token, zeros
    on padding rows; with PADDING_ONLY the zeros alone (the real rows are another kernel's)."""
    num_padded = tl.load(num_padded_ptr)
    if first < num_padded:
        rows = first + tl.arange(0, BLOCK_R)
        in_use = rows < num_padded
        slot = tl.load(sorted_ids_ptr + rows, mask=in_use, other=num_slots)
        valid = slot < num_slots
        token = tl.where(valid, slot // top_k, 0).to(tl.int64)
        if PADDING_ONLY:
            in_use = in_use & ~valid
        for h0 in range(0, hidden, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            col_mask = cols < hidden
            if PADDING_ONLY:
                values = tl.zeros([BLOCK_R, BLOCK_H], dtype=out_ptr.dtype.element_ty)
            else:
                values = tl.load(
                    x_ptr + token[:, None] * stride_xt + cols[None, :] * stride_xh,
                    mask=valid[:, None] & col_mask[None, :],
                    other=0.0,
                )
            out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_or + cols[None, :] * stride_oh
            tl.store(out_ptrs, values, mask=in_use[:, None] & col_mask[None, :])


@triton.jit
def _slot_rows_kernel(
    sorted_ids_ptr,
    num_padded_ptr,
    slot_rows_ptr,
    num_slots,
    BLOCK_R: tl.constexpr,
    PDL: tl.constexpr,
):
    """slot_rows[s] = the padded row r holding slot s (sorted_ids[r] = s), for the rows in use: the alignment's
    inverse, which ``_sorted_rows_by_token_kernel`` stores through."""
    _pdl_prologue(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_use = rows < tl.load(num_padded_ptr)
    slot = tl.load(sorted_ids_ptr + rows, mask=in_use, other=num_slots)
    tl.store(slot_rows_ptr + slot, rows, mask=slot < num_slots)


@triton.jit
def _sorted_rows_by_token_kernel(
    x_ptr,
    stride_xt,
    stride_xh,
    out_ptr,
    stride_or,
    stride_oh,
    slot_rows_ptr,
    sorted_ids_ptr,
    num_padded_ptr,
    num_tokens,
    num_slots,
    top_k,
    hidden,
    token_programs,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr,
):
    """``_sorted_rows_kernel``'s result, token by token: programs below ``token_programs`` read BLOCK_T rows of x once
    and store each to its K padded rows (``slot_rows``); the programs after them zero BLOCK_R rows' padding rows. Each
    x row is read once, where the row-by-row copy reads it once a pick (K times, from DRAM when x is over the L2)."""
    _pdl_prologue(PDL)
    pid = tl.program_id(0)
    if pid < token_programs:
        tokens = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        valid = tokens < num_tokens
        for h0 in range(0, hidden, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = valid[:, None] & (cols < hidden)[None, :]
            values = tl.load(x_ptr + tokens[:, None].to(tl.int64) * stride_xt + cols[None, :] * stride_xh, mask=mask)
            for k in range(top_k):
                rows = tl.load(slot_rows_ptr + tokens * top_k + k, mask=valid, other=0).to(tl.int64)
                tl.store(out_ptr + rows[:, None] * stride_or + cols[None, :] * stride_oh, values, mask=mask)
    else:
        _sorted_row_block(
            x_ptr, stride_xt, stride_xh, out_ptr, stride_or, stride_oh, sorted_ids_ptr, num_padded_ptr, num_slots,
            top_k, hidden, (pid - token_programs) * BLOCK_R, BLOCK_R, BLOCK_H, True,
        )  # fmt: skip


@triton.jit
def _gemm2_tile(
    pid_m,  # the tile's coordinates and its block's expert, from ``_tile_coords``
    pid_n,
    expert,
    act_ptr,
    act_tail_ptr,  # EXTRA's rows: act_ptr, or with A_TMA a descriptor of [BLOCK_M // 2, BLOCK_K] boxes
    stride_am,
    stride_ai,
    w_ptr,
    stride_we,
    stride_wh,
    stride_wi,
    b_ptr,
    stride_be,
    stride_bh,
    topk_weights_ptr,
    out_ptr,
    stride_om,
    stride_oh,
    sorted_ids_ptr,
    num_slots,
    top_k,
    hidden,
    inter,
    HAS_BIAS: tl.constexpr,
    WEIGHTS_ON_INPUT: tl.constexpr,
    ATOMIC: tl.constexpr,
    FP32_PRECISE: tl.constexpr,
    W_TMA: tl.constexpr,
    A_TMA: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROWS: tl.constexpr,  # rows computed: BLOCK_M, or BLOCK_M // 2 (act_ptr's TMA boxes are then [ROWS, BLOCK_K])
    EXTRA: tl.constexpr,  # 0, or BLOCK_M // 2: the next block's first rows too (a folded tail), on the same weights
):
    rows = pid_m * BLOCK_M + tl.arange(0, ROWS)
    slot = tl.load(sorted_ids_ptr + rows)
    valid = slot < num_slots
    expert = expert.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    w_row = (expert * hidden + pid_n * BLOCK_N).to(tl.int32)

    if A_TMA:  # act_ptr is the descriptor; rows are contiguous in padded order, a [BLOCK_M, BLOCK_K] box per step
        a_ptrs = act_ptr
    else:
        a_ptrs = act_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ai
    if EXTRA:  # the folded tail's rows: the next block's first EXTRA
        rows_x = pid_m * BLOCK_M + BLOCK_M + tl.arange(0, EXTRA)
        slot_x = tl.load(sorted_ids_ptr + rows_x)
        valid_x = slot_x < num_slots
        if A_TMA:
            ax_ptrs = act_tail_ptr
        else:
            ax_ptrs = act_ptr + rows_x[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ai
        acc_x = tl.zeros([EXTRA, BLOCK_N], dtype=tl.float32)
    if W_TMA:
        w_ptrs = w_ptr
    else:
        w_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wh + ks[:, None] * stride_wi
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, tl.cdiv(inter, BLOCK_K)):
        k_mask = ks < inter - k0 * BLOCK_K
        if A_TMA:  # zero-filled past I
            a = act_ptr.load([pid_m * BLOCK_M, k0 * BLOCK_K])
        elif EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
        w = _load_w(w_ptrs, w_ptr, w_row, k0 * BLOCK_K, k_mask, col_mask, W_TMA, EVEN_K and EVEN_N)
        acc = _dot(a, w, acc, FP32_PRECISE)
        if EXTRA:
            if A_TMA:
                ax = act_tail_ptr.load([pid_m * BLOCK_M + BLOCK_M, k0 * BLOCK_K])
            elif EVEN_K:
                ax = tl.load(ax_ptrs)
            else:
                ax = tl.load(ax_ptrs, mask=k_mask[None, :], other=0.0)
            acc_x = _dot(ax, w, acc_x, FP32_PRECISE)
            if not A_TMA:
                ax_ptrs += BLOCK_K * stride_ai
        if not A_TMA:
            a_ptrs += BLOCK_K * stride_ai
        if not W_TMA:
            w_ptrs += BLOCK_K * stride_wi

    _gemm2_store(acc, slot, valid, expert, cols, col_mask, b_ptr, stride_be, stride_bh, topk_weights_ptr, out_ptr,
                 stride_om, stride_oh, top_k, HAS_BIAS, WEIGHTS_ON_INPUT, ATOMIC)  # fmt: skip
    if EXTRA:
        _gemm2_store(acc_x, slot_x, valid_x, expert, cols, col_mask, b_ptr, stride_be, stride_bh, topk_weights_ptr,
                     out_ptr, stride_om, stride_oh, top_k, HAS_BIAS, WEIGHTS_ON_INPUT, ATOMIC)  # fmt: skip


@triton.jit
def _gemm2_store(acc, slot, valid, expert, cols, col_mask, b_ptr, stride_be, stride_bh, topk_weights_ptr, out_ptr,
                 stride_om, stride_oh, top_k, HAS_BIAS: tl.constexpr, WEIGHTS_ON_INPUT: tl.constexpr,
                 ATOMIC: tl.constexpr):  # fmt: skip
    """GEMM 2's epilogue for the rows holding ``slot``: bias, routing weight, then added into the token's output row
    (ATOMIC) or stored into the slot's."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + cols * stride_bh, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if not WEIGHTS_ON_INPUT:
        acc = acc * tl.load(topk_weights_ptr + slot, mask=valid, other=0.0)[:, None]
    mask = valid[:, None] & col_mask[None, :]
    if ATOMIC:
        token = tl.where(valid, slot // top_k, 0).to(tl.int64)
        out_ptrs = out_ptr + token[:, None] * stride_om + cols[None, :] * stride_oh
        tl.atomic_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        out_ptrs = out_ptr + tl.where(valid, slot, 0).to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_oh
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm2_block(
    tile, num_blocks_m, act_ptr, act_tail_ptr, stride_am, stride_ai, w_ptr, stride_we, stride_wh, stride_wi,
    b_ptr, stride_be, stride_bh, topk_weights_ptr, out_ptr, stride_om, stride_oh,
    sorted_ids_ptr, expert_ids_ptr, expert_starts_ptr, num_slots, top_k, hidden, inter,
    HAS_BIAS: tl.constexpr, WEIGHTS_ON_INPUT: tl.constexpr, ATOMIC: tl.constexpr, FP32_PRECISE: tl.constexpr,
    W_TMA: tl.constexpr, A_TMA: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EXPERT_GROUPS: tl.constexpr,
    SPLIT_TAIL: tl.constexpr, FOLD_TAILS: tl.constexpr, COL_GROUP: tl.constexpr = 0,
):  # fmt: skip
    """GEMM 2 tile ``tile``: its block's first half only (act_tail_ptr's boxes) when SPLIT_TAIL and the second half is
    padding, else the whole block; under FOLD_TAILS a tail after a block of its expert goes with that block's tile
    (as ``_gemm1_block``)."""
    pid_m, pid_n, expert = _tile_coords(
        tile, num_blocks_m, tl.cdiv(hidden, BLOCK_N), expert_ids_ptr, expert_starts_ptr, GROUP_M, EXPERT_GROUPS,
        COL_GROUP,
    )  # fmt: skip
    own_rows = True  # as in _gemm1_block
    if FOLD_TAILS:
        folded, folds_next = _folds(sorted_ids_ptr, expert_ids_ptr, pid_m, expert, num_blocks_m, num_slots, BLOCK_M)
        if folds_next:
            _gemm2_tile(
                pid_m, pid_n, expert, act_ptr, act_tail_ptr, stride_am, stride_ai, w_ptr, stride_we, stride_wh,
                stride_wi, b_ptr, stride_be, stride_bh, topk_weights_ptr, out_ptr, stride_om, stride_oh,
                sorted_ids_ptr, num_slots, top_k, hidden, inter,
                HAS_BIAS, WEIGHTS_ON_INPUT, ATOMIC, FP32_PRECISE, W_TMA, A_TMA, EVEN_K, EVEN_N,
                BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_M, BLOCK_M // 2,
            )  # fmt: skip
        own_rows = ~(folded | folds_next)
    if own_rows:
        if SPLIT_TAIL and _second_half_empty(sorted_ids_ptr, pid_m, num_slots, BLOCK_M):
            _gemm2_tile(
                pid_m, pid_n, expert, act_tail_ptr, act_tail_ptr, stride_am, stride_ai, w_ptr, stride_we, stride_wh,
                stride_wi, b_ptr, stride_be, stride_bh, topk_weights_ptr, out_ptr, stride_om, stride_oh,
                sorted_ids_ptr, num_slots, top_k, hidden, inter,
                HAS_BIAS, WEIGHTS_ON_INPUT, ATOMIC, FP32_PRECISE, W_TMA, A_TMA, EVEN_K, EVEN_N,
                BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_M // 2, 0,
            )  # fmt: skip
        else:
            _gemm2_tile(
                pid_m, pid_n, expert, act_ptr, act_tail_ptr, stride_am, stride_ai, w_ptr, stride_we, stride_wh,
                stride_wi, b_ptr, stride_be, stride_bh, topk_weights_ptr, out_ptr, stride_om, stride_oh,
                sorted_ids_ptr, num_slots, top_k, hidden, inter,
                HAS_BIAS, WEIGHTS_ON_INPUT, ATOMIC, FP32_PRECISE, W_TMA, A_TMA, EVEN_K, EVEN_N,
                BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_M, 0,
            )  # fmt: skip


@triton.jit
def _gemm2_kernel(
    act_ptr,
    act_tail_ptr,  # act again, or with A_TMA its descriptor of [BLOCK_M // 2, BLOCK_K] boxes (SPLIT_TAIL)
    stride_am,
    stride_ai,
    w_ptr,  # w2, or its tensor descriptor when W_TMA
    stride_we,
    stride_wh,
    stride_wi,
    b_ptr,
    stride_be,
    stride_bh,
    topk_weights_ptr,
    out_ptr,
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
    num_blocks_m,
    HAS_BIAS: tl.constexpr,
    WEIGHTS_ON_INPUT: tl.constexpr,
    ATOMIC: tl.constexpr,
    FP32_PRECISE: tl.constexpr,
    W_TMA: tl.constexpr,
    A_TMA: tl.constexpr,  # act through a TMA descriptor (act_ptr is one)
    PERSISTENT: tl.constexpr,
    EVEN_K: tl.constexpr,  # the reduced dim is a multiple of BLOCK_K: no masks in the main loop
    EVEN_N: tl.constexpr,  # the output columns are a multiple of BLOCK_N
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EXPERT_GROUPS: tl.constexpr,  # tiles ordered expert by expert, GROUP_M blocks of one expert at a time
    SPLIT_TAIL: tl.constexpr,  # as in GEMM 1
    FOLD_TAILS: tl.constexpr,  # as in GEMM 1
    PDL: tl.constexpr,
    COL_GROUP: tl.constexpr = 0,  # PERSISTENT only: tiles COL_GROUP column blocks at a time (``_tile_coords``)
):
    _pdl_prologue(PDL)
    num_padded = tl.load(num_padded_ptr)
    if PERSISTENT:
        used_m = num_padded // BLOCK_M
        num_tiles = used_m * tl.cdiv(hidden, BLOCK_N)
        if SPLIT_TAIL or FOLD_TAILS:  # each tile picks its height: several tile shapes, so the loop is not flattened
            for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
                _gemm2_block(
                    tile, used_m, act_ptr, act_tail_ptr, stride_am, stride_ai, w_ptr, stride_we, stride_wh,
                    stride_wi, b_ptr, stride_be, stride_bh, topk_weights_ptr, out_ptr, stride_om, stride_oh,
                    sorted_ids_ptr, expert_ids_ptr, expert_starts_ptr, num_slots, top_k, hidden, inter,
                    HAS_BIAS, WEIGHTS_ON_INPUT, ATOMIC, FP32_PRECISE, W_TMA, A_TMA, EVEN_K, EVEN_N,
                    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EXPERT_GROUPS, SPLIT_TAIL, FOLD_TAILS, COL_GROUP,
                )  # fmt: skip
        else:
            # flattened: the pipeliner prefetches the next tile's operands during this tile's epilogue
            for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
                pid_m, pid_n, expert = _tile_coords(
                    tile, used_m, tl.cdiv(hidden, BLOCK_N), expert_ids_ptr, expert_starts_ptr, GROUP_M, EXPERT_GROUPS,
                    COL_GROUP,
                )  # fmt: skip
                _gemm2_tile(
                    pid_m, pid_n, expert, act_ptr, act_ptr, stride_am, stride_ai, w_ptr, stride_we, stride_wh,
                    stride_wi, b_ptr, stride_be, stride_bh, topk_weights_ptr, out_ptr, stride_om, stride_oh,
                    sorted_ids_ptr, num_slots, top_k, hidden, inter,
                    HAS_BIAS, WEIGHTS_ON_INPUT, ATOMIC, FP32_PRECISE, W_TMA, A_TMA, EVEN_K, EVEN_N,
                    BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_M, 0,
                )  # fmt: skip
    else:
        tile = tl.program_id(0)
        if _tile_live(tile, num_blocks_m, tl.cdiv(hidden, BLOCK_N), num_padded, BLOCK_M, GROUP_M, EXPERT_GROUPS):
            _gemm2_block(
                tile, num_blocks_m, act_ptr, act_tail_ptr, stride_am, stride_ai, w_ptr, stride_we, stride_wh,
                stride_wi, b_ptr, stride_be, stride_bh, topk_weights_ptr, out_ptr, stride_om, stride_oh,
                sorted_ids_ptr, expert_ids_ptr, expert_starts_ptr, num_slots, top_k, hidden, inter,
                HAS_BIAS, WEIGHTS_ON_INPUT, ATOMIC, FP32_PRECISE, W_TMA, A_TMA, EVEN_K, EVEN_N,
                BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EXPERT_GROUPS, SPLIT_TAIL, FOLD_TAILS,
            )  # fmt: skip
