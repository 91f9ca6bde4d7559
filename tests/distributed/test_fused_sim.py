"""The fused path's kernels (layout, dispatch puts with per-block flags, flag-checking GEMMs, remote-store
epilogue, combine) in the Triton interpreter, every rank simulated in one process, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from tilemoe.config import MoEConfig
from tilemoe.distributed import ExpertPlacement, expert_shard
from tilemoe.distributed.fused import SimulatedFusedEP, simulate_fused_forward
from tilemoe.distributed.fused_layout import FusedGeometry, fused_layout, fused_layout_torch, layout_scratch_size
from tilemoe.impls.reference import reference_experts_fp64
from tilemoe.testing import assert_close, make_input, make_routing, make_weights


def _case(config, placement, tokens, dtype, generator, hot=None):
    w = make_weights(config, dtype=dtype, generator=generator)
    xs, tws, tis = [], [], []
    for t in tokens:
        xs.append(make_input(t, config, dtype=dtype, generator=generator))
        tw, ti = make_routing(t, config, generator=generator, hot_expert=hot)
        tws.append(tw)
        tis.append(ti)
    ep = placement.ep_size
    shards = {name: [expert_shard(w[name], placement.experts_of(r)) if w[name] is not None else None
                     for r in range(ep)] for name in ("w13", "w2", "b13", "b2")}  # fmt: skip
    return w, xs, tws, tis, shards


def _check(outs, w, xs, tws, tis, config, dtype, what):
    for r, out in enumerate(outs):
        ref = reference_experts_fp64(xs[r], w["w13"], w["w2"], tws[r], tis[r], config=config,
                                     b13=w["b13"], b2=w["b2"])  # fmt: skip
        assert out.dtype == dtype
        assert_close(out, ref, dtype, name=f"{what} rank {r}")


@pytest.mark.parametrize(
    ("ep", "tokens", "owner", "hot", "dtype"),
    [
        (1, [13], None, None, torch.float32),  # one rank: only the own region, no remote rows
        (2, [9, 20], None, None, torch.float16),  # T differs; 20*K rows: several blocks per region
        (4, [0, 7, 5, 3], None, 4, torch.float32),  # T = 0 on rank 0; one expert takes every first choice
        (2, [6, 6], [1, 0, 1, 1, 1, 1], None, torch.float32),  # explicit map: rank 0 owns 1 expert, rank 1 five
    ],
)
def test_fused_simulation_matches_reference(ep, tokens, owner, hot, dtype, generator):
    config = MoEConfig(num_experts=6, top_k=2, hidden_size=40, intermediate_size=24)
    placement = ExpertPlacement.from_map(owner, ep) if owner else ExpertPlacement.contiguous(6, ep)
    w, xs, tws, tis, s = _case(config, placement, tokens, dtype, generator, hot)
    outs = simulate_fused_forward(xs, tws, tis, s["w13"], s["w2"], placement, config)
    _check(outs, w, xs, tws, tis, config, dtype, "fused sim")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("gated", [True, False])
def test_fused_simulation_tma(gated, dtype, generator, monkeypatch):
    """Weights and GEMM 2's input through TMA descriptors (``FusedTiles.tma``); H, I not multiples of the 16-wide
    boxes (zero-filled past H / I); the descriptors are really built and used."""
    import dataclasses

    from tilemoe.distributed import fused_ops
    from tilemoe.distributed.fused_ops import INTERPRETER_TILES

    built = []
    real = fused_ops.FusedRank.descriptor

    def spy(self, tensor, block_rows, block_cols):
        desc = real(self, tensor, block_rows, block_cols)
        built.append(desc is not None)
        return desc

    monkeypatch.setattr(fused_ops.FusedRank, "descriptor", spy)
    config = MoEConfig(num_experts=6, top_k=2, hidden_size=40, intermediate_size=24, gated=gated, expert_bias=True)
    placement = ExpertPlacement.contiguous(6, 2)
    w, xs, tws, tis, s = _case(config, placement, [9, 20], dtype, generator)
    tiles = dataclasses.replace(INTERPRETER_TILES, tma=True)
    sim = SimulatedFusedEP(placement, config, max_tokens=20, dtype=dtype, tiles=tiles)
    outs = sim.forward(xs, tws, tis, s["w13"], s["w2"], b13=s["b13"], b2=s["b2"])
    _check(outs, w, xs, tws, tis, config, dtype, "fused sim tma")
    assert built and all(built)  # w13 (GEMM 1), w2 and act (GEMM 2) on both ranks


@pytest.mark.parametrize(
    ("put_split", "tokens"),
    [
        (2, [9, 20]),  # H = 40 in two slices of 32 and 8 columns (BLOCK_H = 32)
        (4, [0, 17]),  # four slices, the last two empty (flags only); T = 0 on rank 0
    ],
)
def test_fused_simulation_put_split(put_split, tokens, generator):
    """Each block's put cut into column slices with a flag each (``FusedTiles.put_split``); two forwards on the
    same buffers (the slice flags carry the epoch like the block flags)."""
    import dataclasses

    from tilemoe.distributed.fused_ops import INTERPRETER_TILES

    config = MoEConfig(num_experts=6, top_k=2, hidden_size=40, intermediate_size=24)
    placement = ExpertPlacement.contiguous(6, 2)
    tiles = dataclasses.replace(INTERPRETER_TILES, put_split=put_split)
    sim = SimulatedFusedEP(placement, config, max_tokens=20, dtype=torch.float16, tiles=tiles)
    assert sim.ranks[0].buf["bflag"].numel() == 2 * sim.geom.max_blocks * put_split
    for _ in range(2):
        w, xs, tws, tis, s = _case(config, placement, tokens, torch.float16, generator)
        outs = sim.forward(xs, tws, tis, s["w13"], s["w2"])
        _check(outs, w, xs, tws, tis, config, torch.float16, f"fused sim put_split={put_split}")


def test_fused_simulation_epochs_reuse_buffers(generator):
    """Three forwards on the same buffers, new routing each time (one with T = 0 on a rank): flags carry the
    epoch and are never reset; a bias and a plain (non-gated) MLP go through the epilogues."""
    config = MoEConfig(num_experts=4, top_k=2, hidden_size=32, intermediate_size=16, gated=False,
                       activation="gelu", expert_bias=True)  # fmt: skip
    placement = ExpertPlacement.contiguous(4, 2)
    sim = SimulatedFusedEP(placement, config, max_tokens=10)
    for tokens in ([10, 4], [0, 7], [3, 10]):
        w, xs, tws, tis, s = _case(config, placement, tokens, torch.float32, generator)
        outs = sim.forward(xs, tws, tis, s["w13"], s["w2"], b13=s["b13"], b2=s["b2"])
        _check(outs, w, xs, tws, tis, config, torch.float32, f"epoch T={tokens}")
    assert [int(r.epoch) for r in sim.ranks] == [3, 3]


def test_fused_simulation_missing_puts_is_an_error(generator):
    """A source whose puts never arrive: the destinations' GEMM 1 finds its flags down and says so."""
    config = MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=16)
    placement = ExpertPlacement.contiguous(4, 2)
    sim = SimulatedFusedEP(placement, config, max_tokens=8)
    w, xs, tws, tis, s = _case(config, placement, [8, 8], torch.float32, generator)
    with pytest.raises(ValueError, match="GEMM 1.*rank 0.*dispatch"):
        sim.forward(xs, tws, tis, s["w13"], s["w2"], skip_puts_of=1)


def test_fused_simulation_too_many_tokens(generator):
    config = MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=16)
    placement = ExpertPlacement.contiguous(4, 2)
    sim = SimulatedFusedEP(placement, config, max_tokens=4)
    w, xs, tws, tis, s = _case(config, placement, [5, 1], torch.float32, generator)
    with pytest.raises(ValueError, match="max_tokens=4"):
        sim.forward(xs, tws, tis, s["w13"], s["w2"])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fused_layout_invariants(impl, generator):
    """Every pair placed exactly once; blocks hold one expert each and at least one real row; nothing placed
    past a destination's blocks; the Triton layout also advances the epoch."""
    config = MoEConfig(num_experts=7, top_k=3, hidden_size=8, intermediate_size=8)
    placement = ExpertPlacement.contiguous(7, 3)
    geom = FusedGeometry.of(placement, max_tokens=50, top_k=3, hidden_size=8, intermediate_size=8, block_m=4)
    _, ids = make_routing(50, config, generator=generator, hot_expert=2)
    owner, local = placement.owner_tensor(), placement.local_index_tensor()
    if impl == "triton":
        epoch = torch.tensor([5], dtype=torch.int64)
        scratch = torch.zeros(layout_scratch_size(geom), dtype=torch.int32)  # zero at first, left zeroed
        lay = fused_layout(ids, owner, local, geom, scratch, epoch)
        assert int(epoch) == 6
    else:
        lay = fused_layout_torch(ids, owner, local, geom)
    inv = lay.inv.view(3, geom.region_rows).long()
    flat = ids.reshape(-1)
    placed = inv[inv >= 0]
    assert torch.equal(placed.sort()[0], torch.arange(flat.numel()))
    for d in range(3):
        nb = int(lay.nblocks[d])
        assert int((inv[d, nb * 4 :] >= 0).sum()) == 0
        for b in range(nb):
            pairs = inv[d, b * 4 : (b + 1) * 4]
            real = pairs[pairs >= 0]
            assert real.numel() >= 1
            assert torch.all(local[flat[real]] == lay.block_expert[d, b])
            assert torch.all(owner[flat[real]] == d)
            assert torch.all(lay.pair_block[real] == d * geom.max_blocks + b)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("tma", "put_split", "half"),
    [
        (False, 1, False),
        (True, 1, False),
        (False, 4, False),
        (True, 1, True),  # the half-height tiles fused_tiles_for takes from a 128-row split-tail entry
    ],
)
def test_fused_simulation_compiled_on_gpu(tma, put_split, half):
    """The same kernels compiled for the GPU (system-scope flags, real spins), ranks simulated on one device,
    phases in order so no spin ever waits; bf16 at the default tile shapes, with and without TMA, and with
    each block's put in 4 column slices (H = 256: two 128-column slices with rows, two empty ones)."""
    from tilemoe.distributed.fused_ops import FusedTiles

    g = torch.Generator().manual_seed(0)
    config = MoEConfig(num_experts=8, top_k=2, hidden_size=256, intermediate_size=384)
    placement = ExpertPlacement.contiguous(8, 2)
    w = make_weights(config, dtype=torch.bfloat16, device="cuda", generator=g)
    xs, tws, tis = [], [], []
    for t in (300, 37):
        xs.append(make_input(t, config, dtype=torch.bfloat16, device="cuda", generator=g))
        tw, ti = make_routing(t, config, device="cuda", generator=g)
        tws.append(tw)
        tis.append(ti)
    w13 = [expert_shard(w["w13"], placement.experts_of(r)) for r in range(2)]
    w2 = [expert_shard(w["w2"], placement.experts_of(r)) for r in range(2)]
    tiles = FusedTiles(tma=tma, put_split=put_split)
    if half:  # 64 rows, 8 warps, 256-wide GEMM 2 tiles
        tiles = FusedTiles(block_m=64, block_n1=128, block_k1=64, num_warps1=8, num_stages1=4, block_n2=256,
                           block_k2=64, num_warps2=8, num_stages2=4, tma=True)  # fmt: skip
    outs = simulate_fused_forward(xs, tws, tis, w13, w2, placement, config, tiles=tiles)
    for r in range(2):
        ref = reference_experts_fp64(xs[r], w["w13"], w["w2"], tws[r], tis[r], config=config)
        assert_close(outs[r], ref, torch.bfloat16, name=f"fused sim on GPU rank {r}")
