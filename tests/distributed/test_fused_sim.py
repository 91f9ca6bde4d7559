"""The fused path's put kernels in the Triton interpreter, every rank simulated in one process."""

from __future__ import annotations

import pytest
import torch

from tilemoe.config import MoEConfig
from tilemoe.distributed import ExpertPlacement, expert_shard
from tilemoe.distributed.fused import simulate_fused_forward
from tilemoe.impls.reference import reference_experts_fp64
from tilemoe.testing import assert_close, make_input, make_routing, make_weights


@pytest.mark.parametrize(
    ("ep", "tokens", "owner", "hot"),
    [
        (2, [9, 20], None, None),  # T differs; 20*K rows > BLOCK_M: several tiles per source
        (3, [0, 7, 5], None, 4),  # T = 0 on rank 0; one expert takes every first choice
        (2, [6, 6], [1, 0, 1, 1, 0, 1], None),  # explicit map, uneven
    ],
)
def test_fused_simulation_matches_reference(ep, tokens, owner, hot, generator):
    config = MoEConfig(num_experts=6, top_k=2, hidden_size=40, intermediate_size=24)
    placement = ExpertPlacement.from_map(owner, ep) if owner else ExpertPlacement.contiguous(6, ep)
    w = make_weights(config, generator=generator)
    xs, tws, tis = [], [], []
    for t in tokens:
        xs.append(make_input(t, config, generator=generator))
        tw, ti = make_routing(t, config, generator=generator, hot_expert=hot)
        tws.append(tw)
        tis.append(ti)
    w13 = [expert_shard(w["w13"], placement.experts_of(r)) for r in range(ep)]
    w2 = [expert_shard(w["w2"], placement.experts_of(r)) for r in range(ep)]
    outs = simulate_fused_forward(xs, tws, tis, w13, w2, placement, config, epoch=3)
    for r in range(ep):
        ref = reference_experts_fp64(xs[r], w["w13"], w["w2"], tws[r], tis[r], config=config)
        assert_close(outs[r], ref, torch.float32, name=f"fused sim rank {r}")


def test_fused_simulation_capacity_too_small(generator):
    config = MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=16)
    placement = ExpertPlacement.contiguous(4, 2)
    w = make_weights(config, generator=generator)
    x = make_input(8, config, generator=generator)
    tw, ti = make_routing(8, config, generator=generator, hot_expert=0)
    shards = [expert_shard(w["w13"], placement.experts_of(r)) for r in range(2)]
    w2s = [expert_shard(w["w2"], placement.experts_of(r)) for r in range(2)]
    with pytest.raises(ValueError, match="capacity"):
        simulate_fused_forward([x, x], [tw, tw], [ti, ti], shards, w2s, placement, config, capacity=4)


@pytest.mark.gpu
def test_fused_simulation_compiled_on_gpu():
    """The same put kernels compiled for the GPU (system-scope release flags), ranks simulated on one device."""
    g = torch.Generator().manual_seed(0)
    config = MoEConfig(num_experts=8, top_k=2, hidden_size=256, intermediate_size=128)
    placement = ExpertPlacement.contiguous(8, 2)
    w = make_weights(config, dtype=torch.bfloat16, device="cuda", generator=g)
    xs, tws, tis = [], [], []
    for t in (100, 37):
        xs.append(make_input(t, config, dtype=torch.bfloat16, device="cuda", generator=g))
        tw, ti = make_routing(t, config, device="cuda", generator=g)
        tws.append(tw)
        tis.append(ti)
    w13 = [expert_shard(w["w13"], placement.experts_of(r)) for r in range(2)]
    w2 = [expert_shard(w["w2"], placement.experts_of(r)) for r in range(2)]
    outs = simulate_fused_forward(xs, tws, tis, w13, w2, placement, config, local_impl="torch_grouped_mm", block_h=128)
    for r in range(2):
        ref = reference_experts_fp64(xs[r], w["w13"], w["w2"], tws[r], tis[r], config=config)
        assert_close(outs[r], ref, torch.bfloat16, name=f"fused sim on GPU rank {r}")
