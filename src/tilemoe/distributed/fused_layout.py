"""Geometry and per-forward layout of the ``fused`` expert-parallel path (plain torch ops, no host sync).

Letters: T tokens on a rank (at most ``max_tokens``), K top-k, S = T*K (token, pick) pairs, pair p = t*K + k;
ep ranks; L = the largest number of experts one rank owns; BM = ``block_m`` (rows of one GEMM row-block).

Every destination rank's receive buffers have one *region* per source rank, R = MAXB * BM rows each. Inside
the region of source s, s lays out its pairs for that destination sorted by destination-local expert, each
expert's rows padded to a multiple of BM, so that every row-block of BM rows holds one expert and comes from
one source (and holds at least one real row). MAXB = cdiv(max_tokens * K, BM) + L blocks always suffice:
one destination gets at most S pairs, and padding adds less than one block per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from tilemoe.distributed.placement import ExpertPlacement

# pairs per program of the count and place steps, row-blocks per program of the scan step (64: qwen3-30b-a3b at
# T = 8192 has 576 blocks per region, 9 scan programs to fill its padding rows with)
LAYOUT_BLOCK_S = 1024
LAYOUT_BLOCK_B = 64
LAYOUT_FILL = 1024  # inv rows one store of the scan step marks as padding


@dataclass(frozen=True)
class FusedGeometry:
    """Sizes shared by every rank (the symmetric buffers are allocated from them, the same on every rank)."""

    ep_size: int
    max_tokens: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    max_local: int  # L
    block_m: int  # BM

    @property
    def max_blocks(self) -> int:
        """MAXB: row-blocks per source region."""
        return triton.cdiv(self.max_tokens * self.top_k, self.block_m) + self.max_local

    @property
    def region_rows(self) -> int:
        """R = MAXB * BM rows per source region."""
        return self.max_blocks * self.block_m

    @property
    def recv_rows(self) -> int:
        """ep * R rows of a receive buffer."""
        return self.ep_size * self.region_rows

    @classmethod
    def of(cls, placement: ExpertPlacement, *, max_tokens: int, top_k: int, hidden_size: int,
           intermediate_size: int, block_m: int) -> FusedGeometry:  # fmt: skip
        return cls(placement.ep_size, max_tokens, top_k, hidden_size, intermediate_size,
                   max(1, placement.max_local), block_m)  # fmt: skip


@dataclass
class FusedLayout:
    """Where this (source) rank's pairs go, computed on the device from its routing.

    inv          [ep * R] int32   pair placed at each row of each destination's region for this source (-1 pad)
    nblocks      [ep] int64       row-blocks this source fills in each destination's region
    block_expert [ep, MAXB] int32 destination-local expert of each of those blocks
    pair_block   [S] int32        d * MAXB + block of each pair: where its output comes back from (combine flags)
    """

    inv: torch.Tensor
    nblocks: torch.Tensor
    block_expert: torch.Tensor
    pair_block: torch.Tensor


def fused_layout(
    topk_ids: torch.Tensor,
    owner: torch.Tensor,
    local_index: torch.Tensor,
    geom: FusedGeometry,
    scratch: torch.Tensor,
    epoch: torch.Tensor,
    out: FusedLayout | None = None,
) -> FusedLayout:
    """The padded per-destination layout of ``topk_ids`` [T, K] on the device, which also advances ``epoch``
    (int64 [1]) by one; scratch: int32 [>= layout_scratch_size(geom)], ZERO on the first call (every call leaves
    it zeroed for the next); out: a ``new_layout_buffers(geom)`` to write into (kept across forwards: no
    allocation per call), else new tensors. Rows within one (destination, expert) group come in any order
    (``fused_layout_torch`` keeps pair order). No host sync, CUDA-graph capturable. Raises ValueError when
    scratch or out is too small.

    Three launches (two for T = 0), multi-program (the first version walked all S pairs twice and every region
    row in one program, and two more launches zeroed the counters and filled ``inv``):
    1. counts per (destination, local expert): one program per ``LAYOUT_BLOCK_S`` pairs, atomics;
    2. padded offsets, blocks per destination, each block's expert, and -1 into the rows of ``inv``: one program
       per ``LAYOUT_BLOCK_B`` blocks (the [ep, L] table is small: every program rescans it); the epoch advances;
    3. every pair takes the next row of its group: one program per ``LAYOUT_BLOCK_S`` pairs, atomic cursors;
       the counters of step 1 are zeroed for the next call.
    """
    from tilemoe.distributed.fused_kernels import _layout_count_kernel, _layout_place_kernel, _layout_scan_kernel

    ep_p2, l_p2 = triton.next_power_of_2(geom.ep_size), triton.next_power_of_2(geom.max_local)
    if scratch.numel() < layout_scratch_size(geom) or scratch.dtype != torch.int32:
        raise ValueError(
            f"scratch: expected int32 [>= {layout_scratch_size(geom)}], got {scratch.dtype} {scratch.numel()}"
        )
    s = topk_ids.numel()
    ep, maxb = geom.ep_size, geom.max_blocks
    if out is None:
        out = new_layout_buffers(geom, topk_ids.device, max_pairs=s)
    elif out.pair_block.numel() < s or out.inv.numel() != ep * geom.region_rows:
        raise ValueError(
            f"out: expected buffers for {ep * geom.region_rows} region rows and >= {s} pairs, got "
            f"{out.inv.numel()} and {out.pair_block.numel()}"
        )
    counts, cursor = scratch[: ep_p2 * l_p2], scratch[ep_p2 * l_p2 : 2 * ep_p2 * l_p2]
    lay = FusedLayout(out.inv, out.nblocks, out.block_expert, out.pair_block[:s])
    ids = topk_ids.reshape(-1).contiguous()
    if s:
        _layout_count_kernel[(triton.cdiv(s, LAYOUT_BLOCK_S),)](
            ids_ptr=ids, owner_ptr=owner, local_ptr=local_index, counts_ptr=counts, num_pairs=s,
            L_P2=l_p2, BLOCK_S=LAYOUT_BLOCK_S, num_warps=4,
        )  # fmt: skip
    _layout_scan_kernel[(triton.cdiv(maxb, LAYOUT_BLOCK_B),)](
        counts_ptr=counts, cursor_ptr=cursor, nblocks_ptr=lay.nblocks, bexp_ptr=lay.block_expert, epoch_ptr=epoch,
        inv_ptr=lay.inv, ep=ep, num_local=geom.max_local, maxb=maxb,
        EP_P2=ep_p2, L_P2=l_p2, BLOCK_M=geom.block_m, BLOCK_B=LAYOUT_BLOCK_B, FILL=LAYOUT_FILL, num_warps=4,
    )  # fmt: skip
    if s:
        _layout_place_kernel[(triton.cdiv(s, LAYOUT_BLOCK_S),)](
            ids_ptr=ids, owner_ptr=owner, local_ptr=local_index, cursor_ptr=cursor,
            inv_ptr=lay.inv, pair_block_ptr=lay.pair_block, counts_ptr=counts,
            num_pairs=s, region_rows=geom.region_rows, maxb=maxb,
            L_P2=l_p2, TABLE=ep_p2 * l_p2, BLOCK_M=geom.block_m, BLOCK_S=LAYOUT_BLOCK_S, num_warps=4,
        )  # fmt: skip
    return lay


def new_layout_buffers(geom: FusedGeometry, device: torch.device | str, max_pairs: int | None = None) -> FusedLayout:
    """Uninitialised buffers for ``fused_layout(..., out=)``: inv [ep * R], nblocks [ep], block_expert
    [ep, MAXB], pair_block [max_pairs] (default max_tokens * K)."""
    ep, maxb = geom.ep_size, geom.max_blocks
    pairs = geom.max_tokens * geom.top_k if max_pairs is None else max_pairs
    return FusedLayout(
        torch.empty(ep * geom.region_rows, dtype=torch.int32, device=device),
        torch.empty(ep, dtype=torch.int64, device=device),
        torch.empty((ep, maxb), dtype=torch.int32, device=device),
        torch.empty(max(1, pairs), dtype=torch.int32, device=device),
    )


def layout_scratch_size(geom: FusedGeometry) -> int:
    """int32 elements ``fused_layout`` needs as scratch (counts and cursors per (destination, expert))."""
    return 2 * triton.next_power_of_2(geom.ep_size) * triton.next_power_of_2(geom.max_local)


def fused_layout_torch(
    topk_ids: torch.Tensor, owner: torch.Tensor, local_index: torch.Tensor, geom: FusedGeometry
) -> FusedLayout:
    """The padded per-destination layout of ``topk_ids`` [T, K] in plain torch ops (the reference of
    ``fused_layout``; rows of a group in pair order; does not touch the epoch); no host sync.

    owner / local_index: [E] int64 (``ExpertPlacement.owner_tensor`` / ``local_index_tensor``) on the device.
    1. counts per (destination, local expert) by scatter_add (fixed size: no sync), padded to BM;
    2. region offsets = exclusive cumsum of the padded counts per destination; blocks per destination;
    3. a stable sort of the pairs by (destination, local expert): a pair's row = its expert's offset + its
       rank among the pairs of that (destination, expert);
    4. the inverse (row -> pair) by scatter, and each block's expert by a search over the offsets.
    """
    ep, lmax, bm, maxb, r = geom.ep_size, geom.max_local, geom.block_m, geom.max_blocks, geom.region_rows
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    s = flat.numel()
    dest = owner[flat]
    key = dest * lmax + local_index[flat]
    counts = torch.zeros(ep * lmax, dtype=torch.int64, device=device).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts + bm - 1) // bm * bm
    ends = padded.view(ep, lmax).cumsum(1)
    offsets = (ends - padded.view(ep, lmax)).reshape(-1)
    nblocks = ends[:, -1] // bm
    order = torch.sort(key, stable=True)[1]
    sorted_key = key[order]
    group_start = counts.cumsum(0) - counts
    row = offsets[sorted_key] + torch.arange(s, dtype=torch.int64, device=device) - group_start[sorted_key]
    inv = torch.full((ep * r,), -1, dtype=torch.int32, device=device)
    inv[dest[order] * r + row] = order.to(torch.int32)
    pair_row = torch.empty(s, dtype=torch.int64, device=device)
    pair_row[order] = row
    pair_block = (dest * maxb + pair_row // bm).to(torch.int32)
    block_start = (torch.arange(maxb, dtype=torch.int64, device=device) * bm).expand(ep, maxb).contiguous()
    block_expert = torch.searchsorted(ends.contiguous(), block_start, right=True).clamp_(max=lmax - 1)
    return FusedLayout(inv, nblocks, block_expert.to(torch.int32).contiguous(), pair_block)
