"""route_triton against tilemoe.routing.route: ids exactly, weights to float32 rounding."""

import pytest
import torch

from tilemoe.config import MoEConfig
from tilemoe.ops.route import route_triton
from tilemoe.routing import route

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    ("routing", "experts", "top_k", "extra"),
    [
        ("softmax_topk", 6, 2, {}),
        ("softmax_topk", 10, 8, {"renormalize": False, "routed_scaling_factor": 2.5}),
        ("topk_softmax", 7, 4, {}),
        ("sigmoid_top1_input_scaled", 5, 1, {}),
        ("softmax_topk", 160, 6, {}),
        ("sigmoid_grouped_topk", 16, 4, {"n_group": 4, "topk_group": 2}),
    ],
)
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 64])
def test_matches_reference(routing, experts, top_k, extra, num_tokens, generator):
    config = MoEConfig(num_experts=experts, top_k=top_k, hidden_size=8, intermediate_size=8, routing=routing, **extra)
    logits = torch.randn(num_tokens, experts, generator=generator).to(DEVICE)
    if num_tokens > 1:
        logits[1, :3] = logits[1, 3]  # ties: the lower index must win
    weights, ids = route_triton(logits, config)
    ref_w, ref_i = route(logits, config)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.cpu(), ref_i.cpu())
    torch.testing.assert_close(weights.cpu(), ref_w.cpu(), rtol=1e-5, atol=1e-6)


def test_bf16_logits_and_bad_shape(generator):
    config = MoEConfig(num_experts=8, top_k=2, hidden_size=8, intermediate_size=8)
    logits = torch.randn(5, 8, generator=generator).to(DEVICE, torch.bfloat16)
    w, i = route_triton(logits, config)
    rw, ri = route(logits, config)
    assert torch.equal(i.cpu(), ri.cpu())
    torch.testing.assert_close(w.cpu(), rw.cpu(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="router_logits"):
        route_triton(logits[:, :7], config)
