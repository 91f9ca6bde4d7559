"""The multi-program ``fused_layout`` (Triton, interpreter) against ``fused_layout_torch``: exact equality once
the rows inside each (destination, expert) group are put in pair order (the Triton layout's atomic cursors
leave them in any order; the torch reference keeps pair order)."""

from __future__ import annotations

import pytest
import torch

from tilemoe.config import MoEConfig
from tilemoe.distributed import ExpertPlacement
from tilemoe.distributed.fused_layout import (
    LAYOUT_BLOCK_B,
    LAYOUT_BLOCK_S,
    FusedGeometry,
    fused_layout,
    fused_layout_torch,
    layout_scratch_size,
    new_layout_buffers,
)
from tilemoe.testing import make_routing


def _in_pair_order(lay, geom: FusedGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """inv with each group's real rows sorted (padding rows stay last), and pair_block recomputed from it."""
    ep, r, bm = geom.ep_size, geom.region_rows, geom.block_m
    inv = lay.inv.view(ep, r).clone().long()
    for d in range(ep):
        nb = int(lay.nblocks[d])
        experts = lay.block_expert[d, :nb]
        for e in experts.unique().tolist():
            blocks = (experts == e).nonzero().flatten()
            r0, r1 = int(blocks.min()) * bm, (int(blocks.max()) + 1) * bm
            seg = inv[d, r0:r1]
            real = seg[seg >= 0]
            assert torch.all(seg[: real.numel()] >= 0), "padding rows must come after the group's real rows"
            seg[: real.numel()] = real.sort()[0]
    pair_block = torch.empty(lay.pair_block.numel(), dtype=torch.int64)
    rows = (inv >= 0).nonzero()
    pair_block[inv[rows[:, 0], rows[:, 1]]] = rows[:, 0] * geom.max_blocks + rows[:, 1] // bm
    return inv.flatten(), pair_block


@pytest.mark.parametrize(
    ("tokens", "top_k", "owner", "block_m"),
    [
        (0, 2, None, 4),  # T = 0: no pairs, only the scan runs (nblocks 0, epoch advances)
        (1, 2, None, 4),  # one token
        (7, 3, [2, 0, 2, 2, 1, 2], 4),  # uneven map: rank 1 owns one expert, rank 2 four, T not a multiple of BM
        (300, 4, None, 4),  # 1200 pairs: two count / place programs; MAXB > LAYOUT_BLOCK_B: two scan programs
        (300, 2, [1, 1, 1, 1, 1, 0], 16),  # rank 1 takes almost everything; BM 16
    ],
)
def test_fused_layout_equals_torch(tokens, top_k, owner, block_m, generator):
    config = MoEConfig(num_experts=6, top_k=top_k, hidden_size=8, intermediate_size=8)
    placement = ExpertPlacement.from_map(owner, max(owner) + 1) if owner else ExpertPlacement.contiguous(6, 3)
    geom = FusedGeometry.of(placement, max_tokens=max(tokens, 1), top_k=top_k, hidden_size=8, intermediate_size=8,
                            block_m=block_m)  # fmt: skip
    if tokens == 300 and top_k == 4:
        assert tokens * top_k > LAYOUT_BLOCK_S and geom.max_blocks > LAYOUT_BLOCK_B  # the multi-program case
    _, ids = make_routing(tokens, config, generator=generator)
    owner_t, local_t = placement.owner_tensor(), placement.local_index_tensor()
    ref = fused_layout_torch(ids, owner_t, local_t, geom)
    epoch = torch.tensor([41], dtype=torch.int64)
    scratch = torch.zeros(layout_scratch_size(geom), dtype=torch.int32)
    table = layout_scratch_size(geom) // 2
    # stale buffers kept across forwards (as FusedRank keeps them): every element the layout owns is rewritten
    out = new_layout_buffers(geom, "cpu")
    for t in (out.inv, out.nblocks, out.block_expert, out.pair_block):
        t.fill_(5)
    for forward in range(3):  # the same scratch and buffers: nothing carries over between forwards
        lay = fused_layout(ids, owner_t, local_t, geom, scratch, epoch, out if forward else None)
        assert int(epoch) == 42 + forward
        # the counters are left zeroed for the next call (no zeroing launch); the cursors are not read again
        assert torch.equal(scratch[:table], torch.zeros(table, dtype=torch.int32))
        assert torch.equal(lay.nblocks, ref.nblocks)
        assert torch.equal(lay.block_expert, ref.block_expert)
        inv, pair_block = _in_pair_order(lay, geom)
        assert torch.equal(inv, ref.inv.long())
        assert torch.equal(pair_block, ref.pair_block.long())
        # the Triton pair_block agrees with where the Triton layout put each pair
        rows = (lay.inv.view(geom.ep_size, -1) >= 0).nonzero()
        placed = lay.inv.view(geom.ep_size, -1)[rows[:, 0], rows[:, 1]].long()
        assert torch.equal(lay.pair_block[placed].long(), rows[:, 0] * geom.max_blocks + rows[:, 1] // block_m)
