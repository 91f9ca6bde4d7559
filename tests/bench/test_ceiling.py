"""The cuBLAS ceiling of `tilemoe bench --bmm-ceiling`: its work is the layer's two GEMMs on balanced rows."""

from __future__ import annotations

import pytest
import torch

from tilemoe.bench.ceiling import bmm_ceiling
from tilemoe.bench.metrics import layer_flops
from tilemoe.config import MoEConfig
from tilemoe.testing import make_weights


@pytest.mark.parametrize("gated", [True, False])  # w13 holds 2I rows (gate, up) or I rows
def test_ceiling_computes_each_experts_two_gemms(gated):
    config = MoEConfig(num_experts=5, top_k=2, hidden_size=24, intermediate_size=12, gated=gated)
    weights = make_weights(config, dtype=torch.float64, device=torch.device("cpu"))
    # T*K = 18 slots over 4 hit experts: ceil(18 / 4) = 5 rows each
    ceiling = bmm_ceiling(config, 9, 4, weights, dtype=torch.float64, device=torch.device("cpu"))
    assert (ceiling.experts, ceiling.rows_per_expert) == (4, 5)
    out = ceiling.fn(None)
    assert out.shape == (4, 5, config.hidden_size)
    for e in range(4):  # each expert's rows through its own weights
        torch.testing.assert_close(ceiling.out1[e], ceiling.a1[e] @ weights["w13"][e].T)
        torch.testing.assert_close(out[e], ceiling.a2[e] @ weights["w2"][e].T)


def test_ceiling_flops_equal_the_layers_when_rows_divide_evenly():
    config = MoEConfig(num_experts=8, top_k=2, hidden_size=32, intermediate_size=16)
    weights = make_weights(config, dtype=torch.float32, device=torch.device("cpu"))
    ceiling = bmm_ceiling(config, 12, 8, weights, dtype=torch.float32, device=torch.device("cpu"))
    assert ceiling.flops == layer_flops(config, 12)  # 24 slots, 3 rows per expert: no rounding
    rounded = bmm_ceiling(config, 13, 8, weights, dtype=torch.float32, device=torch.device("cpu"))
    assert rounded.rows_per_expert == 4 and rounded.flops > layer_flops(config, 13)  # 26 slots round up to 32


def test_ceiling_edges():
    config = MoEConfig(num_experts=4, top_k=1, hidden_size=8, intermediate_size=4)
    weights = make_weights(config, dtype=torch.float32, device=torch.device("cpu"))
    cpu = torch.device("cpu")
    assert bmm_ceiling(config, 0, 0, weights, dtype=torch.float32, device=cpu) is None  # T = 0: no work
    for bad in (0, 5):
        with pytest.raises(ValueError, match=f"experts_hit: expected 1..4, got {bad}"):
            bmm_ceiling(config, 3, bad, weights, dtype=torch.float32, device=cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ceiling_captures_in_a_cuda_graph():
    from tilemoe.bench.timing import Timer

    config = MoEConfig(num_experts=8, top_k=2, hidden_size=256, intermediate_size=128)
    cuda = torch.device("cuda")
    weights = make_weights(config, dtype=torch.bfloat16, device=cuda)
    ceiling = bmm_ceiling(config, 64, 8, weights, dtype=torch.bfloat16, device=cuda)
    timer = Timer(ceiling.fn, [None], device=cuda, cuda_graph=True, graph_calls=4)
    assert timer.graphs is not None and timer.note == ""
    ceiling.out2.fill_(float("nan"))
    stats = timer.run(3)
    assert stats.cuda_graph and all(t > 0 for t in stats.times_ms)
    expected = torch.bmm(ceiling.a2.float(), ceiling.w2_t.float())
    torch.testing.assert_close(ceiling.out2.float(), expected, atol=0.1, rtol=2e-2)  # the replays wrote every row
