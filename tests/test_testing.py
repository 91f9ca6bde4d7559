"""tilemoe.testing.assert_close: the per-dtype rule every fast path is held to."""

import pytest
import torch

from tilemoe.config import MoEConfig
from tilemoe.impls import get_impl
from tilemoe.routing import route
from tilemoe.testing import assert_close, make_input, make_weights, reference_experts


def _reference(rms: float, generator) -> torch.Tensor:
    return torch.randn(100, 100, generator=generator, dtype=torch.float64) * rms


def test_atol_grows_with_the_reference_rms(generator):
    """An error of 0.05 on every element: within bf16's atol (2e-2) scaled by an RMS of 3, not at an RMS of 1."""
    ref = _reference(3.0, generator)
    assert_close(ref + 0.05, ref, torch.bfloat16)
    ref = _reference(1.0, generator)
    with pytest.raises(AssertionError, match=r"elements beyond atol=0\.02"):
        assert_close(ref + 0.05, ref, torch.bfloat16)


@pytest.mark.parametrize("rms", [1.0, 3.0, 100.0])
def test_a_wrong_row_or_an_unwritten_element_still_fails(rms, generator):
    ref = _reference(rms, generator)
    out = ref.clone()
    out[7] = 0.0  # a token's row never combined: 1% of the elements
    with pytest.raises(AssertionError, match="mismatch"):
        assert_close(out, ref, torch.bfloat16)
    out = ref.clone()
    out[3, 4] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(out, ref, torch.bfloat16)


def test_torchs_own_bf16_layer_at_a_large_scale_passes(generator):
    """The layer the GPU fuzz drew (session 29): sigmoid weights scaled by 2.5, K = 6, biases; torch's bf16 loop
    (``naive``) is within bf16's rule once atol follows the output's RMS (~3 here)."""
    config = MoEConfig(num_experts=47, top_k=6, hidden_size=308, intermediate_size=347, activation="gelu_tanh",
                       expert_bias=True, routed_scaling_factor=2.5, renormalize=False,
                       routing="sigmoid_grouped_topk", n_group=1, topk_group=1)  # fmt: skip
    w = make_weights(config, dtype=torch.bfloat16, generator=generator)
    x = make_input(427, config, dtype=torch.bfloat16, generator=generator)
    weights, ids = route(torch.randn(427, 47, generator=generator), config)
    out = get_impl("naive").fn(x, w["w13"], w["w2"], weights, ids, config=config, b13=w["b13"], b2=w["b2"])
    ref = reference_experts(x, w, weights, ids, config)
    assert ref.pow(2).mean().sqrt() > 2.0
    assert_close(out, ref, torch.bfloat16)
