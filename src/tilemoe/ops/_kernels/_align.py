"""Triton kernel: group the T*K (token, slot) pairs by expert, padded to BLOCK_M, in one program.

Dimension letters: T tokens, K top-k, E experts; S = T*K slots (slot s = token s // K, its k-th pick s % K).
    topk_ids     [S]            int32 expert of each slot (flattened [T, K])
    sorted_ids   [CAP]          int32 slot at each padded position; S marks padding (CAP = capacity)
    expert_ids   [CAP/BLOCK_M]  int32 expert of each BLOCK_M-row block; E for blocks past the end
    counts       [E]            int32 slots per expert
    num_padded   [1]            int32 rows in use: sum_e round_up(counts[e], BLOCK_M)
Order inside an expert is the slot order (a stable sort), so the result equals ``moe_align_torch``.
One program: it is meant for small S (decode), where launches, not work, cost time.
"""

import triton
import triton.language as tl


@triton.jit
def _align_one_program_kernel(
    topk_ids_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    counts_ptr,
    num_padded_ptr,
    num_slots,
    num_experts,
    capacity,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
):
    experts = tl.arange(0, BLOCK_E)
    lanes = tl.arange(0, CHUNK)
    # pass 1: per-expert counts, one-hot sums over chunks of slots
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_slots, CHUNK):
        ids = tl.load(topk_ids_ptr + start + lanes, mask=start + lanes < num_slots, other=BLOCK_E)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    total = tl.sum(padded, axis=0)
    tl.store(counts_ptr + experts, counts, mask=experts < num_experts)
    tl.store(num_padded_ptr, total)
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
        ids = tl.load(topk_ids_ptr + start + lanes, mask=start + lanes < num_slots, other=BLOCK_E)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
        base = tl.sum(onehot * (pad_start + seen)[None, :], axis=1)
        same_before = (ids[:, None] == ids[None, :]) & (lanes[None, :] < lanes[:, None])
        rank = tl.sum(same_before.to(tl.int32), axis=1)
        tl.store(sorted_ids_ptr + base + rank, start + lanes, mask=start + lanes < num_slots)
        seen += tl.sum(onehot, axis=0)
