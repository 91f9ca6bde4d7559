"""Triton kernels of the ``fused`` expert-parallel path: puts, flag-waiting expert GEMMs, remote-store combine.

Letters: T tokens on a rank, K top-k, pair p = t*K + k, H hidden, I expert intermediate, ep ranks,
BM rows per row-block, MAXB row-blocks per source region, R = MAXB*BM rows per region (``fused_layout``),
S = PUT_SPLIT column slices a row-block's put is cut into (each slice its own put work item and flag).
MAXB is a runtime argument (``maxb``), not a constexpr: it changes with max_tokens, and as a constexpr every
token count of a benchmark compiled every kernel again.

Buffers of every rank (symmetric: peers write into them through tables of base addresses, int64 [ep]):
    recv_x     [ep*R, H]    rows sources put here (region s = rows s*R ...); the own region stays empty:
                            GEMM 1 reads its own rows straight from x
    recv_meta  [ep*R, 2]    int32: pair index on the source (-1: padding row), routing weight (float32 bits)
    hdr        [ep]         int64 flag word per source: (epoch << 32) | blocks it filled in its region
    bflag      [ep*MAXB*S]  int64 flag word per (block, column slice): (epoch << 32) | destination-local expert
    ret        [T_max*K, H] expert outputs the destinations store back, at the pair's own row
    cflag      [ep*MAXB*NT2] int64 (epoch << 32) per (destination, block, GEMM 2 column tile): ret rows stored
    done       [ep]         int64 (epoch << 32) per destination: it finished GEMM 1 (read all it was sent)
Local buffers: act [ep*R, I] (GEMM 1 output), nb_local [ep] / bexp_local [ep*MAXB] (the header and block
words GEMM 1 read, for GEMM 2), epoch [1] int64 (advanced on the device once per forward), err [1] int32.

Flags carry the forward's epoch, which only grows, so nothing is ever reset (CUDA-graph replays just work).
A flag is raised after a CTA barrier (``tl.debug_barrier``: every thread's stores issued) by a release atomic
at system scope; waiters read it with acquire atomics at system scope, so the rows it guards are visible.

Every spin is bounded (``max_spin`` iterations): a spin that runs out writes its code into ``err`` and gives
up; all other spins stop at once when ``err`` is set, so a lost peer ends in an error the host reads
(``FusedDispatcher.check``), never a hang. In the interpreter (``SPIN=False``) nothing waits: ranks are
simulated in one process with phases in order, and a flag that is not yet raised is an error at once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tilemoe.ops._kernels._activation import _activate, _up_factor

ERR_DISPATCH = 1  # a GEMM 1 program waited too long for its rows
ERR_COMBINE = 2  # a combine program waited too long for expert outputs


@triton.jit
def _acquire(ptrs, mask, SYS: tl.constexpr):
    if SYS:
        return tl.atomic_add(ptrs, 0, mask=mask, sem="acquire", scope="sys")
    else:
        return tl.atomic_add(ptrs, 0, mask=mask)


@triton.jit
def _release(ptr, word, SYS: tl.constexpr):
    """Raise a flag: after every thread of the CTA issued its stores (barrier), a release store of ``word``."""
    tl.debug_barrier()
    if SYS:
        tl.atomic_xchg(ptr, word, sem="release", scope="sys")
    else:
        tl.atomic_xchg(ptr, word)


@triton.jit
def _wait(ptrs, mask, epoch, err_ptr, code, max_spin, SPIN: tl.constexpr, SYS: tl.constexpr):
    """Flag words at ``ptrs`` (masked lanes ignored) until each one's epoch (high 32 bits) >= ``epoch``."""
    words = _acquire(ptrs, mask, SYS)
    lowest = tl.min(tl.where(mask, words >> 32, epoch))
    if SPIN:
        spins = 0
        failed = tl.load(err_ptr, volatile=True)
        while (lowest < epoch) & (spins < max_spin) & (failed == 0):
            words = _acquire(ptrs, mask, SYS)
            lowest = tl.min(tl.where(mask, words >> 32, epoch))
            failed = tl.load(err_ptr, volatile=True)
            spins += 1
    if lowest < epoch:  # the first cause is kept: later waits give up because of it
        tl.atomic_cas(err_ptr, 0, code)
    return words


@triton.jit
def _wait_one(ptr, epoch, err_ptr, code, max_spin, SPIN: tl.constexpr, SYS: tl.constexpr):
    """One flag word (see ``_wait``), returned as a scalar."""
    lane = tl.arange(0, 2)
    words = _wait(ptr + lane * 0, lane < 1, epoch, err_ptr, code, max_spin, SPIN, SYS)
    return tl.max(tl.where(lane < 1, words, 0))


@triton.jit
def _dot(a, b, acc, FP32_PRECISE: tl.constexpr):
    if FP32_PRECISE:  # fp32 operands: 3xTF32 (one tf32 pass misses the fp32 tolerance)
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a, b, acc)


@triton.jit
def _put_blocks(
    pid, x_ptr, topk_w_ptr, inv_ptr, nblocks_ptr, bexp_ptr,
    peer_x_ptr, peer_meta_ptr, peer_hdr_ptr, peer_bflag_ptr,
    epoch, my_rank, ep, top_k, hidden, maxb,
    NUM_PUT: tl.constexpr, PUT_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    SYS: tl.constexpr,
):  # fmt: skip
    """Dispatch puts of one put program: every destination's header (program 0), then the work items
    j = pid, pid + NUM_PUT, ... over (row-block, column slice) pairs, own destination first (its GEMM starts at
    once): the slice's rows (remote only), the block's metadata (slice 0), then the slice's flag. Never waits.

    PUT_SPLIT > 1 cuts each block into column slices taken by consecutive programs: at FlashMoE's shape
    (T = 8192, K = 2, E = 32, BM = 128) a rank sends ~72 remote blocks, which 32 put programs take 3 or 2 at a
    time (the busiest does 3 where the mean is 2.25); 4 slices make 288 items, 9 each. The price: one
    system-scope release (a fence that waits for the program's stores to land) per slice instead of per block."""
    region_rows = maxb * BLOCK_M
    dtype = x_ptr.dtype.element_ty
    # columns per slice, a multiple of BLOCK_H (PUT_SPLIT = 1: all of H)
    width = tl.cdiv(tl.cdiv(hidden, PUT_SPLIT), BLOCK_H) * BLOCK_H
    if pid == 0:
        for d in range(ep):
            nb = tl.load(nblocks_ptr + d)
            hdr = tl.load(peer_hdr_ptr + d).to(tl.pointer_type(tl.int64), bitcast=True)
            _release(hdr + my_rank, (epoch << 32) | nb, SYS)
    for j in range(pid, ep * maxb * PUT_SPLIT, NUM_PUT):
        jb = j // PUT_SPLIT
        sl = j % PUT_SPLIT
        d = (my_rank + jb // maxb) % ep
        b = jb % maxb
        if b < tl.load(nblocks_ptr + d):
            rows = b * BLOCK_M + tl.arange(0, BLOCK_M)
            pair = tl.load(inv_ptr + d * region_rows + rows)
            valid = pair >= 0
            slot = (my_rank * region_rows + rows).to(tl.int64)
            if d != my_rank:
                token = tl.where(valid, pair // top_k, 0).to(tl.int64)
                x_dst = tl.load(peer_x_ptr + d).to(tl.pointer_type(dtype), bitcast=True)
                x_dst = tl.multiple_of(x_dst, 16)
                for h0 in range(sl * width, tl.minimum(hidden, (sl + 1) * width), BLOCK_H):
                    cols = h0 + tl.arange(0, BLOCK_H)
                    mask = valid[:, None] & (cols[None, :] < hidden)
                    v = tl.load(x_ptr + token[:, None] * hidden + cols[None, :], mask=mask)
                    tl.store(x_dst + slot[:, None] * hidden + cols[None, :], v, mask=mask)
            if sl == 0:
                weight = tl.load(topk_w_ptr + pair, mask=valid, other=0.0)
                m_dst = tl.load(peer_meta_ptr + d).to(tl.pointer_type(tl.int32), bitcast=True)
                tl.store(m_dst + slot * 2, pair)
                tl.store(m_dst + slot * 2 + 1, weight.to(tl.int32, bitcast=True))
            expert = tl.load(bexp_ptr + d * maxb + b).to(tl.int64)
            f_dst = tl.load(peer_bflag_ptr + d).to(tl.pointer_type(tl.int64), bitcast=True)
            _release(f_dst + (my_rank * maxb + b) * PUT_SPLIT + sl, (epoch << 32) | expert, SYS)


@triton.jit
def _dispatch_gemm1_kernel(
    x_ptr, topk_w_ptr, inv_ptr, nblocks_ptr, bexp_ptr,  # source side: this rank's tokens and layout
    peer_x_ptr, peer_meta_ptr, peer_hdr_ptr, peer_bflag_ptr,  # [ep] int64 address tables
    recv_x_ptr, recv_meta_ptr, hdr_ptr, bflag_ptr,  # this rank's receive buffers
    w13_ptr, b13_ptr, act_ptr, nb_local_ptr, bexp_local_ptr, epoch_ptr, err_ptr,
    my_rank, ep, top_k, hidden, inter, maxb, max_spin, swiglu_alpha, swiglu_limit,
    NUM_PUT: tl.constexpr, PUT_SPLIT: tl.constexpr, DO_PUT: tl.constexpr, DO_GEMM: tl.constexpr,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, WEIGHTS_ON_INPUT: tl.constexpr,
    FP32_PRECISE: tl.constexpr, EVEN_K: tl.constexpr, COMPUTE: tl.constexpr, W_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    SPIN: tl.constexpr, SYS: tl.constexpr,
):  # fmt: skip
    """Programs [0, NUM_PUT): dispatch puts (``_put_blocks``). The rest: GEMM 1 tiles (row-block, column
    block of I), own region first; each waits for its region's header and its block's flag, then
    act = act(x @ w_gate^T) * (x @ w_up^T) for its rows. The put programs have the lowest ids, so they start
    first and never wait: the GEMM programs spinning on the same GPU cannot starve them."""
    pid = tl.program_id(0)
    epoch = tl.load(epoch_ptr)
    first_tile = NUM_PUT if DO_PUT else 0
    # nested ifs: Triton cannot `and` a constexpr with a tensor
    if DO_PUT:  # noqa: SIM102
        if pid < NUM_PUT:
            _put_blocks(
                pid, x_ptr, topk_w_ptr, inv_ptr, nblocks_ptr, bexp_ptr,
                peer_x_ptr, peer_meta_ptr, peer_hdr_ptr, peer_bflag_ptr,
                epoch, my_rank, ep, top_k, hidden, maxb,
                NUM_PUT, PUT_SPLIT, BLOCK_M, BLOCK_H, SYS,
            )  # fmt: skip
    if DO_GEMM:  # noqa: SIM102
        if pid >= first_tile:
            _gemm1_program(
                pid - first_tile, x_ptr, recv_x_ptr, recv_meta_ptr, hdr_ptr, bflag_ptr,
                w13_ptr, b13_ptr, act_ptr, nb_local_ptr, bexp_local_ptr, err_ptr,
                epoch, my_rank, ep, top_k, hidden, inter, maxb, max_spin, swiglu_alpha, swiglu_limit,
                PUT_SPLIT, ACTIVATION, GATED, HAS_BIAS, WEIGHTS_ON_INPUT, FP32_PRECISE, EVEN_K, COMPUTE, W_TMA,
                BLOCK_M, BLOCK_N, BLOCK_K, SPIN, SYS,
            )  # fmt: skip


@triton.jit
def _gemm1_program(
    tile, x_ptr, recv_x_ptr, recv_meta_ptr, hdr_ptr, bflag_ptr,
    w13_ptr, b13_ptr, act_ptr, nb_local_ptr, bexp_local_ptr, err_ptr,
    epoch, my_rank, ep, top_k, hidden, inter, maxb, max_spin, swiglu_alpha, swiglu_limit,
    PUT_SPLIT: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    WEIGHTS_ON_INPUT: tl.constexpr, FP32_PRECISE: tl.constexpr, EVEN_K: tl.constexpr, COMPUTE: tl.constexpr,
    W_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPIN: tl.constexpr, SYS: tl.constexpr,
):  # fmt: skip
    """One GEMM 1 tile: (row-block m, column block n of I), regions in the order own, own + 1, ...
    COMPUTE=False (the bench's communication-only forward): wait for the rows, compute nothing."""
    nt = tl.cdiv(inter, BLOCK_N)
    if not COMPUTE:  # one program per row-block (the launcher's grid)
        nt = 1
    m = tile // nt
    n = tile % nt
    s = (my_rank + m // maxb) % ep
    b = m % maxb
    header = _wait_one(hdr_ptr + s, epoch, err_ptr, 1, max_spin, SPIN, SYS)
    nb = header - ((header >> 32) << 32)
    if (b == 0) & (n == 0):
        tl.store(nb_local_ptr + s, nb)
    if b < nb:
        if PUT_SPLIT == 1:
            word = _wait_one(bflag_ptr + s * maxb + b, epoch, err_ptr, 1, max_spin, SPIN, SYS)
        else:  # every slice's flag; each carries the block's expert
            sl = tl.arange(0, PUT_SPLIT)
            words = _wait(bflag_ptr + (s * maxb + b) * PUT_SPLIT + sl, sl < PUT_SPLIT, epoch, err_ptr, 1, max_spin,
                          SPIN, SYS)  # fmt: skip
            word = tl.max(words)
        expert = word - ((word >> 32) << 32)
        if n == 0:
            tl.store(bexp_local_ptr + s * maxb + b, expert)
        if COMPUTE:
            _gemm1_tile(
                x_ptr, recv_x_ptr, recv_meta_ptr, w13_ptr, b13_ptr, act_ptr,
                s * (maxb * BLOCK_M) + b * BLOCK_M, n, expert, s == my_rank, top_k, hidden, inter,
                swiglu_alpha, swiglu_limit,
                ACTIVATION, GATED, HAS_BIAS, WEIGHTS_ON_INPUT, FP32_PRECISE, EVEN_K, W_TMA, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip


@triton.jit
def _gemm1_tile(
    x_ptr, recv_x_ptr, recv_meta_ptr, w13_ptr, b13_ptr, act_ptr,
    row0, n, expert, own, top_k, hidden, inter, swiglu_alpha, swiglu_limit,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, WEIGHTS_ON_INPUT: tl.constexpr,
    FP32_PRECISE: tl.constexpr, EVEN_K: tl.constexpr, W_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # W_TMA: w13_ptr is a TMA descriptor over w13 viewed as [E_local * N1, H] ([BLOCK_N, BLOCK_K] boxes, zero-filled
    # past H; a box past an expert's gate or up rows reads rows whose columns are never stored)
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    pair = tl.load(recv_meta_ptr + rows * 2)
    valid = pair >= 0
    if own:  # own rows were never copied: read them from x by token
        a_ptrs = x_ptr + tl.where(valid, pair // top_k, 0).to(tl.int64)[:, None] * hidden
    else:
        a_ptrs = recv_x_ptr + rows[:, None] * hidden
    ks = tl.arange(0, BLOCK_K)
    a_ptrs += ks[None, :]
    cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < inter
    n1 = 2 * inter if GATED else inter
    gate_row = (expert * n1 + n * BLOCK_N).to(tl.int32)
    if W_TMA:  # the pointer tiles are never formed
        g_ptrs = w13_ptr
        u_ptrs = w13_ptr
    else:
        g_ptrs = w13_ptr + expert.to(tl.int64) * n1 * hidden + cols[None, :].to(tl.int64) * hidden + ks[:, None]
        u_ptrs = g_ptrs + inter * hidden
    if WEIGHTS_ON_INPUT:
        row_weight = tl.load(recv_meta_ptr + rows * 2 + 1).to(tl.float32, bitcast=True)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, tl.cdiv(hidden, BLOCK_K)):
        k_mask = ks < hidden - k0 * BLOCK_K
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        if W_TMA:
            wg = w13_ptr.load([gate_row, k0 * BLOCK_K]).T
        else:
            wg = tl.load(g_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc_g = _dot(a, wg, acc_g, FP32_PRECISE)
        if GATED:
            if W_TMA:
                wu = w13_ptr.load([gate_row + inter, k0 * BLOCK_K]).T
            else:
                wu = tl.load(u_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc_u = _dot(a, wu, acc_u, FP32_PRECISE)
        a_ptrs += BLOCK_K
        if not W_TMA:
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
    dtype = act_ptr.dtype.element_ty
    if WEIGHTS_ON_INPUT:  # on the float32 sums, as tilemoe.ops' GEMM 1 does (its module docstring says why)
        acc_g = acc_g * row_weight[:, None]
        acc_u = acc_u * row_weight[:, None]
    if HAS_BIAS:
        b_row = b13_ptr + expert.to(tl.int64) * n1
        acc_g += tl.load(b_row + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_row + inter + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # rounded to the operand dtype first, like an unfused h = x @ w13^T
    result = _activate(acc_g.to(dtype).to(tl.float32), ACTIVATION, swiglu_alpha, swiglu_limit)
    if GATED:
        result = result * _up_factor(acc_u.to(dtype).to(tl.float32), ACTIVATION, swiglu_limit)
    tl.store(act_ptr + rows[:, None] * inter + cols[None, :], result.to(dtype), mask=col_mask[None, :])


@triton.jit
def _gemm2_put_kernel(
    act_ptr, recv_meta_ptr, w2_ptr, b2_ptr, nb_local_ptr, bexp_local_ptr, epoch_ptr,
    peer_ret_ptr, peer_cflag_ptr, peer_done_ptr,  # [ep] int64 address tables (the sources' buffers)
    my_rank, ep, hidden, inter, maxb,
    WEIGHTS_ON_INPUT: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_PRECISE: tl.constexpr,
    EVEN_K: tl.constexpr, COMPUTE: tl.constexpr, W_TMA: tl.constexpr, A_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OUT_DTYPE: tl.constexpr, SYS: tl.constexpr,
):  # fmt: skip
    """GEMM 2 tiles (row-block, column block of H): y = act @ w2^T (+ b2) times the routing weight, stored
    straight into the source's ``ret`` at each row's pair index; then the tile's combine flag there. Runs
    after GEMM 1 in stream order, so it only reads what GEMM 1 recorded locally (nb_local, bexp_local);
    program (region s, block 0, column 0) first tells s that GEMM 1 is done (``done``): s may then reuse
    the region it sent here, even when it sent nothing. COMPUTE=False: zeros stored (same bytes moved).
    W_TMA / A_TMA: w2_ptr / act_ptr are TMA descriptors (w2 as [E_local * H, I], act as [rows, I]; boxes
    zero-filled past I); OUT_DTYPE: act's element type (act_ptr may be a descriptor)."""
    pid = tl.program_id(0)
    epoch = tl.load(epoch_ptr)
    nt = tl.cdiv(hidden, BLOCK_N)
    m = pid // nt
    n = pid % nt
    s = (my_rank + m // maxb) % ep
    b = m % maxb
    if (b == 0) & (n == 0):
        done = tl.load(peer_done_ptr + s).to(tl.pointer_type(tl.int64), bitcast=True)
        _release(done + my_rank, epoch << 32, SYS)
    if b < tl.load(nb_local_ptr + s):
        expert = tl.load(bexp_local_ptr + s * maxb + b).to(tl.int64)
        rows = (s * maxb * BLOCK_M + b * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        pair = tl.load(recv_meta_ptr + rows * 2)
        valid = pair >= 0
        ks = tl.arange(0, BLOCK_K)
        cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < hidden
        row0 = (s * maxb * BLOCK_M + b * BLOCK_M).to(tl.int32)
        w_row = (expert * hidden + n * BLOCK_N).to(tl.int32)
        if A_TMA:
            a_ptrs = act_ptr
        else:
            a_ptrs = act_ptr + rows[:, None] * inter + ks[None, :]
        if W_TMA:
            w_ptrs = w2_ptr
        else:
            w_ptrs = w2_ptr + expert * hidden * inter + cols[None, :].to(tl.int64) * inter + ks[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_tiles = tl.cdiv(inter, BLOCK_K)
        if not COMPUTE:
            k_tiles = 0
        for k0 in range(0, k_tiles):
            k_mask = ks < inter - k0 * BLOCK_K
            if A_TMA:
                a = act_ptr.load([row0, k0 * BLOCK_K])
            elif EVEN_K:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            if W_TMA:
                w = w2_ptr.load([w_row, k0 * BLOCK_K]).T
            else:
                w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = _dot(a, w, acc, FP32_PRECISE)
            if not A_TMA:
                a_ptrs += BLOCK_K
            if not W_TMA:
                w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(b2_ptr + expert * hidden + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        dtype = OUT_DTYPE
        if not WEIGHTS_ON_INPUT:
            weight = tl.load(recv_meta_ptr + rows * 2 + 1).to(tl.float32, bitcast=True)
            acc = acc.to(dtype).to(tl.float32) * weight[:, None]
        ret = tl.load(peer_ret_ptr + s).to(tl.pointer_type(dtype), bitcast=True)
        ret = tl.multiple_of(ret, 16)
        dst = ret + tl.where(valid, pair, 0).to(tl.int64)[:, None] * hidden + cols[None, :]
        tl.store(dst, acc.to(dtype), mask=valid[:, None] & col_mask[None, :])
        flag = tl.load(peer_cflag_ptr + s).to(tl.pointer_type(tl.int64), bitcast=True)
        _release(flag + (my_rank * maxb + b) * nt + n, epoch << 32, SYS)


@triton.jit
def _combine_kernel(
    ret_ptr, pair_block_ptr, cflag_ptr, done_ptr, out_ptr, epoch_ptr, err_ptr,
    num_tokens, ep, hidden, max_spin,
    K: tl.constexpr, EP_P2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    SPIN: tl.constexpr, SYS: tl.constexpr,
):  # fmt: skip
    """out[t, cols] = sum_k ret[t*K + k, cols] (weights applied by the destinations), each program waiting
    for the combine flags of the tiles its rows come from, and first for every destination's ``done``."""
    pid_t = tl.program_id(0)
    n = tl.program_id(1)
    epoch = tl.load(epoch_ptr)
    nt = tl.num_programs(1)
    peers = tl.arange(0, EP_P2)
    _wait(done_ptr + peers, peers < ep, epoch, err_ptr, 2, max_spin, SPIN, SYS)
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = tokens < num_tokens
    cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = t_mask[:, None] & (cols[None, :] < hidden)
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k in tl.static_range(K):
        pair = tokens.to(tl.int64) * K + k
        block = tl.load(pair_block_ptr + pair, mask=t_mask, other=0).to(tl.int64)
        _wait(cflag_ptr + block * nt + n, t_mask, epoch, err_ptr, 2, max_spin, SPIN, SYS)
        acc += tl.load(ret_ptr + pair[:, None] * hidden + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + tokens[:, None].to(tl.int64) * hidden + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)  # fmt: skip


@triton.jit
def _layout_count_kernel(
    ids_ptr, owner_ptr, local_ptr, counts_ptr,  # counts: int32 [EP_P2 * L_P2], zeroed before
    num_pairs,
    L_P2: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """``fused_layout`` step 1, one program per BLOCK_S pairs: counts per (destination, local expert) by atomics."""
    p = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    m = p < num_pairs
    e = tl.load(ids_ptr + p, mask=m, other=0).to(tl.int64)
    key = tl.load(owner_ptr + e, mask=m, other=0) * L_P2 + tl.load(local_ptr + e, mask=m, other=0)
    tl.atomic_add(counts_ptr + key, 1, mask=m, sem="relaxed")


@triton.jit
def _layout_scan_kernel(
    counts_ptr, cursor_ptr,  # int32 [EP_P2 * L_P2] each
    nblocks_ptr, bexp_ptr, epoch_ptr, inv_ptr,
    ep, num_local, maxb,
    EP_P2: tl.constexpr, L_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
    FILL: tl.constexpr,
):  # fmt: skip
    """``fused_layout`` step 2, one program per BLOCK_B row-blocks of every destination: padded offsets by a
    cumsum over the experts (each program recomputes the small [ep, L] table), the cursors each expert's rows
    start from and the blocks per destination (program 0, which also advances the epoch), each block's
    expert (the number of experts whose rows end at or before the block's first row), and -1 (padding) into
    ``inv`` for the rows of its blocks, which step 3 then overwrites with the real pairs (a separate fill was
    one more launch per forward)."""
    pid = tl.program_id(0)
    d_idx = tl.arange(0, EP_P2)
    l_idx = tl.arange(0, L_P2)
    dl = d_idx[:, None] * L_P2 + l_idx[None, :]
    live = (d_idx[:, None] < ep) & (l_idx[None, :] < num_local)
    counts = tl.load(counts_ptr + dl, mask=live, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=1)
    if pid == 0:
        tl.store(epoch_ptr, tl.load(epoch_ptr) + 1)
        tl.store(cursor_ptr + dl, ends - padded)
        tl.store(nblocks_ptr + d_idx, (tl.sum(padded, axis=1) // BLOCK_M).to(tl.int64), mask=d_idx < ep)
    b_idx = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    expert = tl.zeros([EP_P2, BLOCK_B], dtype=tl.int32)
    for lx in range(0, num_local - 1):
        end = tl.sum(tl.where(l_idx[None, :] == lx, ends, 0), axis=1)
        expert += (end[:, None] <= b_idx[None, :] * BLOCK_M).to(tl.int32)
    tl.store(bexp_ptr + d_idx[:, None] * maxb + b_idx[None, :], expert,
             mask=(d_idx[:, None] < ep) & (b_idx[None, :] < maxb))  # fmt: skip
    region_rows = maxb * BLOCK_M
    row_end = tl.minimum(region_rows, (pid + 1) * BLOCK_B * BLOCK_M)
    pad = tl.full([FILL], -1, dtype=tl.int32)
    for d in range(ep):
        for r0 in range(pid * BLOCK_B * BLOCK_M, row_end, FILL):
            r = r0 + tl.arange(0, FILL)
            tl.store(inv_ptr + d * region_rows + r, pad, mask=r < row_end)


@triton.jit
def _layout_place_kernel(
    ids_ptr, owner_ptr, local_ptr, cursor_ptr,  # cursor: int32 [EP_P2 * L_P2], from _layout_scan_kernel
    inv_ptr, pair_block_ptr, counts_ptr,
    num_pairs, region_rows, maxb,
    L_P2: tl.constexpr, TABLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """``fused_layout`` step 3, one program per BLOCK_S pairs: each pair takes the next row of its
    (destination, expert) group (atomic cursor: rows of a group in any order, which changes no result).
    Program 0 also zeroes the TABLE counters of step 1 for the next forward (step 2 read them already, in
    stream order): no zeroing launch per forward."""
    pid = tl.program_id(0)
    p = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    m = p < num_pairs
    e = tl.load(ids_ptr + p, mask=m, other=0).to(tl.int64)
    d = tl.load(owner_ptr + e, mask=m, other=0)
    key = d * L_P2 + tl.load(local_ptr + e, mask=m, other=0)
    row = tl.atomic_add(cursor_ptr + key, 1, mask=m, sem="relaxed")
    tl.store(inv_ptr + d * region_rows + row, p.to(tl.int32), mask=m)
    tl.store(pair_block_ptr + p, (d * maxb + row // BLOCK_M).to(tl.int32), mask=m)
    if pid == 0:
        tl.store(counts_ptr + tl.arange(0, TABLE), tl.zeros([TABLE], dtype=tl.int32))
