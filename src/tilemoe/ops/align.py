"""moe_align: the T*K (token, slot) pairs grouped by expert and padded to the GEMM tile, on the device.

Nothing is read back to the host: buffers are sized by an upper bound and the number of rows in use stays
on the device (``num_padded``), so a forward that uses this can be captured in a CUDA graph.

Capacity (rows of ``sorted_ids``): expert e uses round_up(c_e, BLOCK_M) rows, and
sum_e round_up(c_e, BM) <= sum_e (c_e + BM - 1) over the experts hit, at most min(E, S) of them, so
CAP = round_up(S + min(E, S) * (BM - 1), BM) always suffices; blocks past ``num_padded`` exit at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Alignment", "align_capacity", "moe_align", "moe_align_torch"]

# One-program kernel up to this many slots: below it the launches dominate; above it the torch path
# (a device sort, a few kernels) is faster than one program walking all slots.
ONE_PROGRAM_MAX_SLOTS = 4096


@dataclass
class Alignment:
    """Slots grouped by expert (S = T*K slots; slot s is token s // K, pick s % K).

    sorted_ids  [CAP] int32: slot at each padded row; S marks a padding row.
    expert_ids  [CAP // block_m] int32: expert of each block of rows; E past ``num_padded``.
    counts      [E] int32: slots per expert.
    num_padded  [1] int32: rows in use (each expert's rows rounded up to block_m).
    """

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    counts: torch.Tensor
    num_padded: torch.Tensor
    block_m: int


def align_capacity(num_slots: int, num_experts: int, block_m: int) -> int:
    """Rows of ``sorted_ids``: the upper bound of sum_e round_up(count_e, block_m)."""
    bound = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return (bound + block_m - 1) // block_m * block_m


def _check(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise ValueError(f"topk_ids: expected a 2-D tensor [T, K], got {getattr(topk_ids, 'shape', topk_ids)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids: expected dtype int32 or int64, got {topk_ids.dtype}")
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts: expected a positive int, got {num_experts!r}")
    if not isinstance(block_m, int) or block_m <= 0 or block_m & (block_m - 1):
        raise ValueError(f"block_m: expected a power of two, got {block_m!r}")


def moe_align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Reference (and the large-S path): stable sort by expert, scatter into the padded layout.

    topk_ids [T, K] int32/int64 with every id in [0, E). Sync-free on CUDA. Raises ValueError / TypeError on
    a bad argument.
    """
    _check(topk_ids, num_experts, block_m)
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    num_slots = flat.numel()
    capacity = align_capacity(num_slots, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    start = torch.cumsum(counts, 0) - counts
    order = torch.sort(flat, stable=True)[1]
    sorted_expert = flat[order]
    rank = torch.arange(num_slots, device=device) - start[sorted_expert]
    dest = pad_end[sorted_expert] - padded[sorted_expert] + rank
    sorted_ids = torch.full((capacity,), num_slots, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_rows = torch.arange(0, capacity, block_m, device=device)
    expert_ids = torch.searchsorted(pad_end, block_rows, right=True).clamp_max(num_experts).to(torch.int32)
    num_padded = pad_end[-1:].to(torch.int32)
    return Alignment(sorted_ids, expert_ids, counts.to(torch.int32), num_padded, block_m)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Slots of ``topk_ids`` [T, K] grouped by expert and padded to ``block_m`` rows, without a host sync.

    Small S = T*K (decode) on CUDA or the interpreter: one Triton program; else ``moe_align_torch``. Both give the
    same result, the order inside an expert being the slot order. Raises ValueError / TypeError on a bad
    argument.
    """
    _check(topk_ids, num_experts, block_m)
    num_slots = topk_ids.numel()
    on_triton = topk_ids.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if num_slots > ONE_PROGRAM_MAX_SLOTS or num_slots == 0 or not on_triton:
        return moe_align_torch(topk_ids, num_experts, block_m)
    from tilemoe.ops._kernels._align import _align_one_program_kernel

    device = topk_ids.device
    capacity = align_capacity(num_slots, num_experts, block_m)
    sorted_ids = torch.empty(capacity, dtype=torch.int32, device=device)
    expert_ids = torch.empty(capacity // block_m, dtype=torch.int32, device=device)
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    block_e = max(16, 1 << (num_experts - 1).bit_length())
    chunk = 64 if block_e <= 64 else 32
    _align_one_program_kernel[(1,)](
        topk_ids_ptr=topk_ids.reshape(-1).to(torch.int32),
        sorted_ids_ptr=sorted_ids,
        expert_ids_ptr=expert_ids,
        counts_ptr=counts,
        num_padded_ptr=num_padded,
        num_slots=num_slots,
        num_experts=num_experts,
        capacity=capacity,
        BLOCK_M=block_m,
        BLOCK_E=block_e,
        CHUNK=chunk,
        num_warps=4,
    )
    return Alignment(sorted_ids, expert_ids, counts, num_padded, block_m)
