"""Triton kernels: group the T*K (token, slot) pairs by expert, padded to BLOCK_M.

Dimension letters: T tokens, K top-k, E experts; S = T*K slots (slot s = token s // K, its k-th pick s % K).
    topk_ids     [S]            int32 or int64 expert of each slot (flattened [T, K])
    sorted_ids   [CAP]          int32 slot at each padded position; S marks padding (CAP = capacity)
    expert_ids   [CAP/BLOCK_M]  int32 expert of each BLOCK_M-row block; E for blocks past the end
    counts       [E]            int32 slots per expert
    num_padded   [1]            int32 rows in use: sum_e round_up(counts[e], BLOCK_M)
    expert_starts [E + 1]       int32 first block of each expert's rows, then num_padded / BLOCK_M
Order inside an expert is the slot order (a stable sort), so the result equals ``moe_align_torch``.
``_align_one_program_kernel`` is meant for small S (decode), where launches, not work, cost time; the three
multi-program kernels below it for large S.
"""

import triton
import triton.language as tl

from tilemoe.ops._kernels._pdl import _pdl_prologue


@triton.jit
def _align_one_program_kernel(
    topk_ids_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    counts_ptr,
    num_padded_ptr,
    expert_starts_ptr,
    num_slots,
    num_experts,
    capacity,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_prologue(PDL)
    experts = tl.arange(0, BLOCK_E)
    lanes = tl.arange(0, CHUNK)
    # pass 1: per-expert counts, one-hot sums over chunks of slots
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_slots, CHUNK):
        ids = tl.load(topk_ids_ptr + start + lanes, mask=start + lanes < num_slots, other=BLOCK_E).to(tl.int32)
        ids = tl.where((ids >= 0) & (ids < num_experts), ids, BLOCK_E)  # out of range: no expert (see below)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    total = tl.sum(padded, axis=0)
    tl.store(counts_ptr + experts, counts, mask=experts < num_experts)
    tl.store(num_padded_ptr, total)
    tl.store(expert_starts_ptr + experts, pad_start // BLOCK_M, mask=experts < num_experts)
    tl.store(expert_starts_ptr + num_experts, total // BLOCK_M)
    # padding marks and the expert of each block
    for start in range(0, capacity, CHUNK):
        pos = start + lanes
        tl.store(sorted_ids_ptr + pos, tl.zeros([CHUNK], dtype=tl.int32) + num_slots, mask=pos < capacity)
    num_blocks = capacity // BLOCK_M
    for start in range(0, num_blocks, CHUNK):
        blocks = start + lanes
        # experts whose padded range ends at or before this block's first row come before it
        before = tl.sum((pad_end[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        expert = tl.minimum(before, num_experts)
        tl.store(expert_ids_ptr + blocks, expert, mask=blocks < num_blocks)
    tl.debug_barrier()
    # pass 2: each slot's rank inside its expert = slots of that expert in earlier chunks + earlier in this one
    seen = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_slots, CHUNK):
        ids = tl.load(topk_ids_ptr + start + lanes, mask=start + lanes < num_slots, other=BLOCK_E).to(tl.int32)
        ids = tl.where((ids >= 0) & (ids < num_experts), ids, BLOCK_E)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
        base = tl.sum(onehot * (pad_start + seen)[None, :], axis=1)
        same_before = (ids[:, None] == ids[None, :]) & (lanes[None, :] < lanes[:, None])
        rank = tl.sum(same_before.to(tl.int32), axis=1)
        tl.store(sorted_ids_ptr + base + rank, start + lanes, mask=(start + lanes < num_slots) & (ids < num_experts))
        seen += tl.sum(onehot, axis=0)


# Multi-program align for large S, three launches or two (no host sync, CUDA-graph capturable):
#   hist        [E, C]  int32 scratch, C = cdiv(S, CHUNK) chunks of CHUNK slots:
#                       after _align_histogram_kernel: slots of expert e in chunk c;
#                       after _align_scan_kernel: slots of expert e in chunks before c (exclusive scan over c).
# A small table (E x C) skips the scan: the scatter kernel sums it in every program (SCAN), two launches in all.
# Ids outside [0, E) are read as "no expert" (the sentinel E): such a slot is counted nowhere and never written,
# so a bad id cannot send a store out of bounds (the one-program kernel above does the same, with BLOCK_E).


@triton.jit
def _align_histogram_kernel(
    topk_ids_ptr,
    hist_ptr,
    sorted_ids_ptr,
    num_slots,
    num_experts,
    num_chunks,
    capacity,
    fill_per_program,
    CHUNK: tl.constexpr,
    NUM_BINS: tl.constexpr,
    FILL_BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program c: the expert histogram of chunk c, and padding marks (S) in its share of ``sorted_ids``."""
    _pdl_prologue(PDL)
    pid = tl.program_id(0)
    slots = pid * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(topk_ids_ptr + slots, mask=slots < num_slots, other=num_experts).to(tl.int32)
    ids = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    # NUM_BINS > E: the sentinel E has a bin of its own, never stored
    hist = tl.histogram(ids, NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    tl.store(hist_ptr + bins * num_chunks + pid, hist, mask=bins < num_experts)
    lanes = tl.arange(0, FILL_BLOCK)
    marks = tl.zeros([FILL_BLOCK], dtype=tl.int32) + num_slots
    for start in range(0, fill_per_program, FILL_BLOCK):
        pos = pid * fill_per_program + start + lanes
        tl.store(sorted_ids_ptr + pos, marks, mask=(start + lanes < fill_per_program) & (pos < capacity))


@triton.jit
def _sorted_by_count(keys, lanes):
    """``keys`` (distinct integers, one a lane) in ascending order, what ``tl.sort`` gives: each key's place is the
    number of keys below it. O(n^2) work: for the interpreter, whose ``tl.sort`` runs its xor_sum reduction element
    by element in Python (about 1 s for 512 keys, Triton 3.9), where these two numpy reductions take milliseconds."""
    place = tl.sum((keys[None, :] < keys[:, None]).to(tl.int32), axis=1)
    return tl.sum(tl.where(place[None, :] == lanes[:, None], keys[None, :], 0), axis=1)


@triton.jit
def _align_scan_kernel(
    hist_ptr,
    counts_ptr,
    num_chunks,
    BLOCK_C: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program e: exclusive scan of hist[e, :] over the chunks, in place; counts[e] = the total."""
    _pdl_prologue(PDL)
    expert = tl.program_id(0)
    row = hist_ptr + expert * num_chunks
    carry = tl.sum(tl.zeros([BLOCK_C], dtype=tl.int32), axis=0)
    for start in range(0, num_chunks, BLOCK_C):
        chunks = start + tl.arange(0, BLOCK_C)
        h = tl.load(row + chunks, mask=chunks < num_chunks, other=0)
        tl.store(row + chunks, tl.cumsum(h, axis=0) - h + carry, mask=chunks < num_chunks)
        carry += tl.sum(h, axis=0)
    tl.store(counts_ptr + expert, carry)


@triton.jit
def _align_scatter_kernel(
    topk_ids_ptr,
    hist_ptr,
    counts_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    expert_starts_ptr,
    num_slots,
    num_experts,
    num_chunks,
    num_blocks,
    blocks_per_program,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_SUB: tl.constexpr,
    SCAN: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PDL: tl.constexpr,
    zero_ptr=None,
    zero_numel=0,
    zero_per_program=0,
    ZERO: tl.constexpr = False,
    ZERO_BLOCK: tl.constexpr = 1024,
    SORT_BY_COUNT: tl.constexpr = False,
):
    """Program c: the rows of the slots of chunk c, and the expert of its share of the BLOCK_M-row blocks.

    Every program recomputes the padded layout from ``counts`` (E values): cheaper than one more launch. With
    SCAN, ``hist`` is the histogram kernel's (not scanned) and every program sums the whole [E, C] table itself,
    the counts and its chunk's prefix (program 0 stores ``counts``): no scan launch, for a table small enough.
    With ZERO, each program also stores zeros over ``zero_per_program`` elements of ``zero_ptr`` (its share of
    ``moe_align``'s ``zeros``): stores nothing waits on.

    A slot's row is its expert's next free row + the slots of its expert before it in the chunk. The chunk is sorted
    by (expert, slot) (``tl.sort`` of CHUNK keys), so that rank is the slot's sorted position minus its expert's
    first one, the chunk's histogram cumulated. (Before: [64, E] one-hot sums over the chunk in steps of 64 slots,
    O(E) work a slot: 32.5 us of scatter at 131072 slots and E = 128 on an H100 against 6.8 sorted, session 24.)
    SORT_BY_COUNT (the interpreter's choice, ``moe_align_triton``): the same order from ``_sorted_by_count``.
    """
    _pdl_prologue(PDL)
    pid = tl.program_id(0)
    lanes = tl.arange(0, CHUNK)
    ids = tl.load(topk_ids_ptr + pid * CHUNK + lanes, mask=pid * CHUNK + lanes < num_slots, other=num_experts)
    ids = ids.to(tl.int32)
    experts = tl.arange(0, BLOCK_E)
    if SCAN:
        chunks = tl.arange(0, BLOCK_C)
        hist = tl.load(
            hist_ptr + experts[:, None] * num_chunks + chunks[None, :],
            mask=(experts[:, None] < num_experts) & (chunks[None, :] < num_chunks),
            other=0,
        )
        counts = tl.sum(hist, axis=1)
        seen = tl.sum(tl.where(chunks[None, :] < pid, hist, 0), axis=1)
        if pid == 0:
            tl.store(counts_ptr + experts, counts, mask=experts < num_experts)
    else:
        counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
        seen = tl.load(hist_ptr + experts * num_chunks + pid, mask=experts < num_experts, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    if pid == 0:
        tl.store(num_padded_ptr, tl.sum(padded, axis=0))
        tl.store(expert_starts_ptr + experts, (pad_end - padded) // BLOCK_M, mask=experts < num_experts)
        tl.store(expert_starts_ptr + num_experts, tl.sum(padded, axis=0) // BLOCK_M)
    block_lanes = tl.arange(0, BLOCK_SUB)
    for start in range(0, blocks_per_program, BLOCK_SUB):
        blocks = pid * blocks_per_program + start + block_lanes
        # experts whose padded range ends at or before this block's first row come before it
        before = tl.sum((pad_end[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(
            expert_ids_ptr + blocks,
            tl.minimum(before, num_experts),
            mask=(start + block_lanes < blocks_per_program) & (blocks < num_blocks),
        )
    # next free row of each expert for this chunk: its padded start + its slots in earlier chunks
    next_row = pad_end - padded + seen
    if ZERO:
        zero_lanes = tl.arange(0, ZERO_BLOCK)
        first = pid.to(tl.int64) * zero_per_program
        for z in range(0, zero_per_program, ZERO_BLOCK):
            pos = first + z + zero_lanes
            tl.store(zero_ptr + pos, tl.zeros([ZERO_BLOCK], dtype=zero_ptr.dtype.element_ty), mask=pos < zero_numel)
    valid = (ids >= 0) & (ids < num_experts)
    ids = tl.where(valid, ids, num_experts)
    # the chunk sorted by (expert, lane): the sentinel's keys sort last; lane j of the result is sorted position j
    keys = ids * CHUNK + lanes
    if SORT_BY_COUNT:
        keys = _sorted_by_count(keys, lanes)
    else:
        keys = tl.sort(keys)
    sorted_expert = keys // CHUNK
    chunk_counts = tl.histogram(ids, BLOCK_E, mask=valid)
    # row of sorted position j: its expert's next free row + j - the expert's first sorted position in the chunk
    first_row = next_row - (tl.cumsum(chunk_counts, axis=0) - chunk_counts)
    rows = tl.gather(first_row, tl.minimum(sorted_expert, BLOCK_E - 1), 0) + lanes
    tl.store(sorted_ids_ptr + rows, pid * CHUNK + keys % CHUNK, mask=sorted_expert < num_experts)
