"""moe_align: the T*K (token, slot) pairs grouped by expert and padded to the GEMM tile, on the device.

Nothing is read back to the host: buffers are sized by an upper bound and the number of rows in use stays
on the device (``num_padded``), so a forward that uses this can be captured in a CUDA graph.

Capacity (rows of ``sorted_ids``): expert e uses round_up(c_e, BLOCK_M) rows, and
sum_e round_up(c_e, BM) <= sum_e (c_e + BM - 1) over the experts hit, at most min(E, S) of them, so
CAP = round_up(S + min(E, S) * (BM - 1), BM) always suffices; blocks past ``num_padded`` exit at once.

Two Triton paths give the same result as the reference ``moe_align_torch``: one program for small S (decode),
and ``moe_align_triton`` for large S, three launches over chunks of slots (histogram, scan, scatter), or two
where the scatter kernel sums the histogram itself.

``zeros``: a buffer the align also fills with zeros (the atomic combine's output, ``KernelConfig.align_clears_out``):
``moe_align_triton``'s scatter programs, latency-bound with HBM mostly idle, store a share each, instead of a fill
kernel of its own; the other paths zero it with torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tilemoe.ops._launch import pdl_options

__all__ = ["Alignment", "align_capacity", "moe_align", "moe_align_torch", "moe_align_triton"]

# One-program kernel up to this many slots, the multi-program path (three launches) above. H100, E=128, p50 of
# CUDA-graph replays: one program 22.4 us vs 18.8 (chunk 128) at S=256, 31.1 vs 15.6 at S=512 (the torch sort
# path: 76-170 us); so one program only for decode-sized S, where its single launch wins.
ONE_PROGRAM_MAX_SLOTS = 128
# Slots per program of the multi-program path by S: (the largest S, its chunk) in turn, ALIGN_CHUNK_LARGE above.
# H100, the layer's points (bench/align_probe.py, random routing, graphs of ten calls in turn, session 24, the sorted
# scatter): mixtral-8x7b T=1024 (S=2048) 64 5.0 us vs 128 5.2; deepseek-v2-lite T=1024 (6144) 6.9 both; qwen3-30b-a3b
# T=1024 (8192) 128 7.6 vs 64 8.1; qwen3 T=4096 (32768) 256 8.9 vs 128 9.5, 512 10.0; gpt-oss-120b T=16384 (65536)
# 256 13.3 vs 512 13.5, 128 14.8; qwen3 T=16384 (131072) 512 15.0 vs 256 15.5.
ALIGN_CHUNK_BY_SLOTS = ((4096, 64), (16384, 128), (131071, 256))
ALIGN_CHUNK_LARGE = 512
# moe_align_triton's default chunk
ALIGN_CHUNK = 128
# The scatter kernel scans the [E, C] histogram itself (no scan launch) up to this many padded entries: each of
# its C programs then reads the whole table (64 KB at most, from L2; 128 values a thread at 4 warps). Same probe,
# chunk 64: deepseek-v2-lite T=1024 ([64, 128]) 7.4 us vs 9.0 with the scan, mixtral-8x7b ([16, 32]) 5.3 vs 6.6,
# qwen3-30b-a3b ([128, 128]) 9.8 vs 10.0; over the limit it loses (qwen3 T=4096, [128, 256] at chunk 128: 33.5 us
# vs 16.9). Those were the one-hot scatter's; with the sort, [128, 64] fused won (qwen3 T=1024, chunk 128: 7.6 us vs
# 8.5), and at T=4096 (session 25, chunk 256) [128, 128] fused 8.4 us vs 9.0 (qwen3) and [64, 96] 7.3 vs 8.7
# (deepseek-v2-lite), while [128, 256] (chunk 128) still loses (23.3 vs 9.5).
FUSED_SCAN_MAX_ENTRIES = 16384
# Elements of ``zeros`` one store of the scatter kernel covers (8 of a 16-bit dtype a thread at 4 warps)
ZERO_BLOCK = 1024


@dataclass
class Alignment:
    """Slots grouped by expert (S = T*K slots; slot s is token s // K, pick s % K).

    sorted_ids  [CAP] int32: slot at each padded row; S marks a padding row.
    expert_ids  [CAP // block_m] int32: expert of each block of rows; E past ``num_padded``.
    counts      [E] int32: slots per expert.
    num_padded  [1] int32: rows in use (each expert's rows rounded up to block_m).
    expert_starts [E + 1] int32: the first block of each expert's rows, then the blocks in use (num_padded //
                block_m): expert e has blocks [expert_starts[e], expert_starts[e + 1]), none when its count is 0.
    """

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    counts: torch.Tensor
    num_padded: torch.Tensor
    block_m: int
    expert_starts: torch.Tensor


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
    expert_starts = torch.cat([pad_end.new_zeros(1), pad_end // block_m]).to(torch.int32)
    return Alignment(sorted_ids, expert_ids, counts.to(torch.int32), num_padded, block_m, expert_starts)


def align_chunk(num_slots: int) -> int:
    """Slots per program of ``moe_align_triton`` for S = ``num_slots`` (measured on an H100, see
    ALIGN_CHUNK_BY_SLOTS)."""
    for most_slots, chunk in ALIGN_CHUNK_BY_SLOTS:
        if num_slots <= most_slots:
            return chunk
    return ALIGN_CHUNK_LARGE


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, *, zeros: torch.Tensor | None = None
) -> Alignment:
    """Slots of ``topk_ids`` [T, K] grouped by expert and padded to ``block_m`` rows, without a host sync.

    On CUDA or the interpreter: one Triton program for S = T*K <= ``ONE_PROGRAM_MAX_SLOTS`` (decode), else
    ``moe_align_triton``; elsewhere ``moe_align_torch``. All give the same result, the order inside an expert
    being the slot order. ``zeros`` (optional, a contiguous tensor on topk_ids' device) comes back filled with zeros
    (by ``moe_align_triton``'s programs where that path runs). Raises ValueError / TypeError on a bad argument.
    """
    _check(topk_ids, num_experts, block_m)
    _check_zeros(zeros, topk_ids)
    num_slots = topk_ids.numel()
    on_triton = topk_ids.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if num_slots > ONE_PROGRAM_MAX_SLOTS and on_triton:
        return moe_align_triton(topk_ids, num_experts, block_m, chunk=align_chunk(num_slots), zeros=zeros)
    if zeros is not None:
        zeros.zero_()
    if num_slots == 0 or not on_triton:
        return moe_align_torch(topk_ids, num_experts, block_m)
    return _moe_align_one_program(topk_ids, num_experts, block_m)


def _check_zeros(zeros: torch.Tensor | None, topk_ids: torch.Tensor) -> None:
    if zeros is None:
        return
    if not isinstance(zeros, torch.Tensor):
        raise TypeError(f"zeros: expected a tensor or None, got {type(zeros).__name__}")
    if zeros.device != topk_ids.device:
        raise ValueError(f"zeros: expected a tensor on {topk_ids.device} (topk_ids' device), got {zeros.device}")
    if not zeros.is_contiguous():
        raise ValueError(f"zeros: expected a contiguous tensor, got strides {tuple(zeros.stride())}")


def _moe_align_one_program(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    from tilemoe.ops._kernels._align import _align_one_program_kernel

    device = topk_ids.device
    num_slots = topk_ids.numel()
    capacity = align_capacity(num_slots, num_experts, block_m)
    sorted_ids = torch.empty(capacity, dtype=torch.int32, device=device)
    expert_ids = torch.empty(capacity // block_m, dtype=torch.int32, device=device)
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    expert_starts = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    block_e = max(16, 1 << (num_experts - 1).bit_length())
    chunk = 64 if block_e <= 64 else 32
    _align_one_program_kernel[(1,)](
        **pdl_options(device),
        topk_ids_ptr=topk_ids.reshape(-1),
        sorted_ids_ptr=sorted_ids,
        expert_ids_ptr=expert_ids,
        counts_ptr=counts,
        num_padded_ptr=num_padded,
        expert_starts_ptr=expert_starts,
        num_slots=num_slots,
        num_experts=num_experts,
        capacity=capacity,
        BLOCK_M=block_m,
        BLOCK_E=block_e,
        CHUNK=chunk,
        num_warps=4,
    )
    return Alignment(sorted_ids, expert_ids, counts, num_padded, block_m, expert_starts)


def moe_align_triton(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    *,
    chunk: int = ALIGN_CHUNK,
    fused_scan: bool | None = None,
    zeros: torch.Tensor | None = None,
) -> Alignment:
    """The large-S path of ``moe_align``: three Triton launches over chunks of ``chunk`` slots, no host sync.

    1. histogram: per-chunk expert counts hist[E, C]; padding marks (S) written into ``sorted_ids``.
    2. scan (one program per expert): hist[e, :] -> slots of e in earlier chunks; counts[e].
    3. scatter (one program per chunk): the padded layout from ``counts``, ``num_padded``, this program's share
       of ``expert_ids``, and each slot's row = its expert's start + earlier chunks + earlier slots in the chunk.

    ``fused_scan``: the scatter programs sum the histogram themselves and step 2 is not launched; None (default)
    fuses where the padded table has at most ``FUSED_SCAN_MAX_ENTRIES`` entries. ``zeros``: filled with zeros by the
    scatter programs, a share each (``moe_align``).

    Same arguments and result as ``moe_align`` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``); ``chunk`` is a
    power of two >= 64. Ids outside [0, E) are counted nowhere and never written (the reference raises on them).
    Raises ValueError / TypeError on a bad argument.
    """
    _check(topk_ids, num_experts, block_m)
    if not isinstance(chunk, int) or chunk < 64 or chunk & (chunk - 1):
        raise ValueError(f"chunk: expected a power of two >= 64, got {chunk!r}")
    if fused_scan not in (None, True, False):
        raise TypeError(f"fused_scan: expected True, False or None, got {fused_scan!r}")
    _check_zeros(zeros, topk_ids)
    num_slots = topk_ids.numel()
    if num_slots == 0:
        if zeros is not None:
            zeros.zero_()
        return moe_align_torch(topk_ids, num_experts, block_m)
    device = topk_ids.device
    capacity = align_capacity(num_slots, num_experts, block_m)
    num_blocks = capacity // block_m
    sorted_ids = torch.empty(capacity, dtype=torch.int32, device=device)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    expert_starts = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    from tilemoe.ops._kernels._align import _align_histogram_kernel, _align_scan_kernel, _align_scatter_kernel

    flat = topk_ids.reshape(-1)
    num_chunks = _cdiv(num_slots, chunk)
    hist = torch.empty((num_experts, num_chunks), dtype=torch.int32, device=device)
    block_e = max(16, 1 << (num_experts - 1).bit_length())
    _align_histogram_kernel[(num_chunks,)](
        **pdl_options(device),
        topk_ids_ptr=flat,
        hist_ptr=hist,
        sorted_ids_ptr=sorted_ids,
        num_slots=num_slots,
        num_experts=num_experts,
        num_chunks=num_chunks,
        capacity=capacity,
        fill_per_program=_cdiv(capacity, num_chunks),
        CHUNK=chunk,
        NUM_BINS=max(32, 1 << num_experts.bit_length()),  # > E: the sentinel E gets a bin; >= a warp
        FILL_BLOCK=256,
        num_warps=4,
    )
    block_c = max(16, 1 << (num_chunks - 1).bit_length())
    if fused_scan is None:
        fused_scan = block_e * block_c <= FUSED_SCAN_MAX_ENTRIES
    if not fused_scan:
        _align_scan_kernel[(num_experts,)](
            **pdl_options(device),
            hist_ptr=hist,
            counts_ptr=counts,
            num_chunks=num_chunks,
            BLOCK_C=min(1024, block_c),
            num_warps=4,
        )
    zero_flat = zeros.view(-1) if zeros is not None and zeros.numel() else None
    zero_per_program = 0  # each program's share of the zeros, whole stores of ZERO_BLOCK
    if zero_flat is not None:
        zero_per_program = _cdiv(_cdiv(zero_flat.numel(), num_chunks), ZERO_BLOCK) * ZERO_BLOCK
    _align_scatter_kernel[(num_chunks,)](
        **pdl_options(device),
        topk_ids_ptr=flat,
        hist_ptr=hist,
        counts_ptr=counts,
        sorted_ids_ptr=sorted_ids,
        expert_ids_ptr=expert_ids,
        num_padded_ptr=num_padded,
        expert_starts_ptr=expert_starts,
        num_slots=num_slots,
        num_experts=num_experts,
        num_chunks=num_chunks,
        num_blocks=num_blocks,
        blocks_per_program=_cdiv(num_blocks, num_chunks),
        BLOCK_M=block_m,
        BLOCK_E=block_e,
        CHUNK=chunk,
        BLOCK_SUB=64 if block_e <= 128 else 32,  # blocks a step of the expert_ids loop ([BLOCK_SUB, BLOCK_E] tiles)
        SCAN=fused_scan,
        BLOCK_C=block_c if fused_scan else 1,
        zero_ptr=zero_flat,
        zero_numel=0 if zero_flat is None else zero_flat.numel(),
        zero_per_program=zero_per_program,
        ZERO=zero_flat is not None,
        ZERO_BLOCK=ZERO_BLOCK,
        SORT_BY_COUNT=not topk_ids.is_cuda,  # the interpreter (see _sorted_by_count)
        num_warps=4 if block_e <= 128 else 8,
    )
    return Alignment(sorted_ids, expert_ids, counts, num_padded, block_m, expert_starts)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
