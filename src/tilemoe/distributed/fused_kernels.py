"""Triton kernels of the ``fused`` expert-parallel path: device-initiated puts into peers' buffers + flags.

Status: the kernels and a one-process simulation of the ranks (``simulate_fused_forward``) are written and
tested in the Triton interpreter; the multi-GPU backend around them (symmetric-memory buffers, consumers
spinning on the flags, stream overlap, CUDA-graph capture) is NOT written yet, so ``backend="fused"`` is not
offered. See docs/expert_parallel.md.

Letters: T tokens on a rank, K top-k, H hidden, ep ranks, C capacity (rows per (source, destination) pair).
Buffers each rank owns (on the GPU they would be symmetric-memory allocations, the same on every rank):
    recv_x    [ep * C, H]   rows other ranks put here; rows from source s at s*C ... s*C + count - 1
    recv_meta [ep * C, 3]   int64: local expert id, source pair index (t*K + k), weight bits (float32 as int)
    recv_cnt  [ep]          int64: rows each source put here
    ret       [T_max * K, H] expert outputs put back by the ranks that ran them, at the pair's own index
    flags     [ep * TILES]  int64: epoch numbers; a tile's flag is raised (release) after its rows are stored,
                            so a consumer that reads flag >= epoch (acquire) sees the rows. Epochs only grow:
                            flags never need resetting (CUDA-graph friendly).
Peers are reached through tables of base addresses (int64 [ep]): on the GPU symmetric memory's
``buffer_ptrs_dev``; in the simulation the data_ptr() of plain tensors.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dispatch_put_kernel(
    x_ptr,  # [T, H] this rank's tokens
    order_ptr,  # [T*K] int64 pair indices sorted by destination
    meta_ptr,  # [T*K, 3] int64 metadata rows in sorted order
    starts_ptr,  # [ep] int64 first sorted pair of each destination
    counts_ptr,  # [ep] int64 pairs for each destination
    peer_x_ptr,  # [ep] int64 base addresses of each rank's recv_x
    peer_meta_ptr,  # [ep] int64 base addresses of each rank's recv_meta
    peer_cnt_ptr,  # [ep] int64 base addresses of each rank's recv_cnt
    peer_flag_ptr,  # [ep] int64 base addresses of each rank's dispatch flags
    src_rank,
    epoch,
    H,
    C,
    K: tl.constexpr,
    TILES: tl.constexpr,  # flag slots per source on a destination (>= cdiv(C, BLOCK_M))
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SYSTEM_SCOPE: tl.constexpr,  # sys-scope release on the GPU (peers); the interpreter has one memory
):
    dest = tl.program_id(0)
    tile = tl.program_id(1)
    count = tl.load(counts_ptr + dest)
    start = tl.load(starts_ptr + dest)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < count
    pair = tl.load(order_ptr + start + rows, mask=valid, other=0)
    token = pair // K
    x_dst = tl.load(peer_x_ptr + dest).to(tl.pointer_type(x_ptr.dtype.element_ty), bitcast=True)
    m_dst = tl.load(peer_meta_ptr + dest).to(tl.pointer_type(tl.int64), bitcast=True)
    slot = src_rank * C + rows
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        mask = valid[:, None] & (cols[None, :] < H)
        v = tl.load(x_ptr + token[:, None] * H + cols[None, :], mask=mask)
        tl.store(x_dst + slot[:, None] * H + cols[None, :], v, mask=mask)
    for c in range(3):
        mv = tl.load(meta_ptr + (start + rows) * 3 + c, mask=valid, other=0)
        tl.store(m_dst + slot * 3 + c, mv, mask=valid)
    if tile == 0:
        c_dst = tl.load(peer_cnt_ptr + dest).to(tl.pointer_type(tl.int64), bitcast=True)
        tl.store(c_dst + src_rank, count)
    if tile * BLOCK_M < count or tile == 0:  # tile 0 always signals: it carries the count, maybe 0
        f_dst = tl.load(peer_flag_ptr + dest).to(tl.pointer_type(tl.int64), bitcast=True)
        if SYSTEM_SCOPE:
            tl.atomic_xchg(f_dst + src_rank * TILES + tile, epoch, sem="release", scope="sys")
        else:
            tl.atomic_xchg(f_dst + src_rank * TILES + tile, epoch)


@triton.jit
def _combine_put_kernel(
    y_ptr,  # [ep * C, H] expert outputs of this rank's recv rows (weighted)
    meta_ptr,  # [ep * C, 3] int64 recv_meta (column 1: the pair index on the source)
    cnt_ptr,  # [ep] int64 rows received from each source
    peer_ret_ptr,  # [ep] int64 base addresses of each rank's ret buffer
    peer_flag_ptr,  # [ep] int64 base addresses of each rank's combine flags
    my_rank,
    epoch,
    H,
    C,
    TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SYSTEM_SCOPE: tl.constexpr,
):
    src = tl.program_id(0)
    tile = tl.program_id(1)
    count = tl.load(cnt_ptr + src)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < count
    slot = src * C + rows
    pair = tl.load(meta_ptr + slot * 3 + 1, mask=valid, other=0)
    r_dst = tl.load(peer_ret_ptr + src).to(tl.pointer_type(y_ptr.dtype.element_ty), bitcast=True)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        mask = valid[:, None] & (cols[None, :] < H)
        v = tl.load(y_ptr + slot[:, None] * H + cols[None, :], mask=mask)
        tl.store(r_dst + pair[:, None] * H + cols[None, :], v, mask=mask)
    if tile * BLOCK_M < count or tile == 0:
        f_dst = tl.load(peer_flag_ptr + src).to(tl.pointer_type(tl.int64), bitcast=True)
        if SYSTEM_SCOPE:
            tl.atomic_xchg(f_dst + my_rank * TILES + tile, epoch, sem="release", scope="sys")
        else:
            tl.atomic_xchg(f_dst + my_rank * TILES + tile, epoch)
