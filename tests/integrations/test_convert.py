"""Weight-layout converters: exact round trips, and each layout checked against how its owner computes with it."""

import pytest
import torch

from tilemoe import convert

E, I, H = 3, 4, 5  # distinct sizes, so a swapped axis changes the shape and fails


@pytest.fixture
def w13_w2(generator):
    w13 = torch.randn(E, 2 * I, H, generator=generator)
    w2 = torch.randn(E, H, I, generator=generator)
    return w13, w2


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a, b)


def _gated(x: torch.Tensor, w13: torch.Tensor, e: int) -> torch.Tensor:
    """tilemoe's meaning of w13: gate rows then up rows."""
    h = x @ w13[e].t()
    return torch.nn.functional.silu(h[:, :I]) * h[:, I:]


@pytest.mark.parametrize(
    "transposed, interleaved",
    [(False, False), (True, False), (True, True), (False, True)],  # standard, Llama-4, gpt-oss, interleaved only
)
def test_hf_stacked_round_trip(w13_w2, transposed, interleaved):
    w13, w2 = w13_w2
    hf_w13 = convert.w13_to_hf(w13, transposed=transposed, interleaved=interleaved)
    hf_w2 = convert.w2_to_hf(w2, transposed=transposed)
    assert hf_w13.shape == ((E, H, 2 * I) if transposed else (E, 2 * I, H))
    assert hf_w2.shape == ((E, I, H) if transposed else (E, H, I))
    back13 = convert.w13_from_hf(hf_w13, transposed=transposed, interleaved=interleaved)
    back2 = convert.w2_from_hf(hf_w2, transposed=transposed)
    _same(back13, w13)
    _same(back2, w2)
    assert back13.is_contiguous() and back2.is_contiguous()
    # never a view of the input: writing a result leaves its source alone
    for src, out in ((w13, hf_w13), (hf_w13, back13), (w2, hf_w2), (hf_w2, back2)):
        assert out.data_ptr() != src.data_ptr()


def test_gpt_oss_layout_matches_its_gate(w13_w2, generator):
    """gpt-oss: gate = (x @ gate_up_proj)[..., ::2], up = [..., 1::2] (GptOssExperts._apply_gate)."""
    w13, _ = w13_w2
    hf = convert.w13_to_hf(w13, transposed=True, interleaved=True)
    x = torch.randn(7, H, generator=generator)
    for e in range(E):
        gate_up = x @ hf[e]
        ours = x @ w13[e].t()
        torch.testing.assert_close(gate_up[:, ::2], ours[:, :I])
        torch.testing.assert_close(gate_up[:, 1::2], ours[:, I:])


def test_llama4_layout_matches_its_bmm(w13_w2, generator):
    """Llama-4: gate, up = (x @ gate_up_proj).chunk(2); out = (up * act(gate)) @ down_proj."""
    w13, w2 = w13_w2
    hf13 = convert.w13_to_hf(w13, transposed=True)
    hf2 = convert.w2_to_hf(w2, transposed=True)
    x = torch.randn(6, H, generator=generator)
    for e in range(E):
        gate, up = (x @ hf13[e]).chunk(2, dim=-1)
        theirs = (up * torch.nn.functional.silu(gate)) @ hf2[e]
        torch.testing.assert_close(theirs, _gated(x, w13, e) @ w2[e].t())


@pytest.mark.parametrize("interleaved", [False, True])
def test_bias_round_trip(generator, interleaved):
    b13 = torch.randn(E, 2 * I, generator=generator)
    hf = convert.b13_to_hf(b13, interleaved=interleaved)
    if interleaved:
        _same(hf[:, 0::2], b13[:, :I])
        _same(hf[:, 1::2], b13[:, I:])
    else:
        _same(hf, b13)
    back = convert.b13_from_hf(hf, interleaved=interleaved)
    _same(back, b13)
    assert back.data_ptr() != b13.data_ptr()


@pytest.mark.parametrize(
    "names, prefix",
    [
        ("mixtral", "model.layers.0.block_sparse_moe.experts."),
        ("gate_up_down", "model.layers.3.mlp.experts."),
        (("wg", "wu", "wd"), "x."),  # any (gate, up, down) naming
    ],
)
def test_per_expert_state_dict_round_trip(w13_w2, names, prefix):
    w13, w2 = w13_w2
    sd = convert.to_per_expert_state_dict(w13, w2, prefix, names=names)
    gate, up, down = convert.PER_EXPERT_NAMES[names] if isinstance(names, str) else names
    assert len(sd) == 3 * E
    for e in range(E):
        _same(sd[f"{prefix}{e}.{gate}.weight"], w13[e, :I])
        _same(sd[f"{prefix}{e}.{up}.weight"], w13[e, I:])
        _same(sd[f"{prefix}{e}.{down}.weight"], w2[e])
    back13, back2 = convert.from_per_expert_state_dict(sd, prefix, E, names=names)
    _same(back13, w13)
    _same(back2, w2)


def test_per_expert_state_dict_errors(w13_w2):
    w13, w2 = w13_w2
    sd = convert.to_per_expert_state_dict(w13, w2, "p.", names="mixtral")
    del sd["p.2.w3.weight"]
    with pytest.raises(KeyError, match=r"p\.2\.w3\.weight"):
        convert.from_per_expert_state_dict(sd, "p.", E, names="mixtral")
    sd = convert.to_per_expert_state_dict(w13, w2, "p.", names="mixtral")
    sd["p.1.w2.weight"] = torch.zeros(H, I + 1)
    with pytest.raises(ValueError, match="differ in shape"):
        convert.from_per_expert_state_dict(sd, "p.", E, names="mixtral")
    with pytest.raises(ValueError, match="names"):
        convert.to_per_expert_state_dict(w13, w2, "p.", names="llama")
    with pytest.raises(ValueError, match="w2: expected shape"):
        convert.to_per_expert_state_dict(w13, w2[:, :, :-1], "p.")


@pytest.mark.parametrize("transposed", [True, False])
def test_epmoe_round_trip(w13_w2, generator, transposed):
    w13, w2 = w13_w2
    wi_0, wi_1, wo = convert.to_epmoe(w13, w2, transposed=transposed)
    if transposed:  # sgl-jax EPMoE: x @ wi_0 [E, H, I] is the gate, (act * up) @ wo [E, I, H]
        assert wi_0.shape == wi_1.shape == (E, H, I) and wo.shape == (E, I, H)
        x = torch.randn(4, H, generator=generator)
        for e in range(E):
            theirs = (torch.nn.functional.silu(x @ wi_0[e]) * (x @ wi_1[e])) @ wo[e]
            torch.testing.assert_close(theirs, _gated(x, w13, e) @ w2[e].t())
    else:
        assert wi_0.shape == (E, I, H) and wo.shape == (E, H, I)
    back13, back2 = convert.from_epmoe(wi_0, wi_1, wo, transposed=transposed)
    _same(back13, w13)
    _same(back2, w2)


@pytest.mark.parametrize("transposed", [True, False])
def test_fused_epmoe_round_trip(w13_w2, generator, transposed):
    w13, w2 = w13_w2
    w1, w2f = convert.to_fused_epmoe(w13, w2, transposed=transposed)
    if transposed:  # sgl-jax FusedEPMoE: w1 [E, 2, H, I] with [gate, up] on dim 1, w2 [E, I, H]
        assert w1.shape == (E, 2, H, I) and w2f.shape == (E, I, H)
        x = torch.randn(4, H, generator=generator)
        for e in range(E):
            theirs = (torch.nn.functional.silu(x @ w1[e, 0]) * (x @ w1[e, 1])) @ w2f[e]
            torch.testing.assert_close(theirs, _gated(x, w13, e) @ w2[e].t())
    else:
        assert w1.shape == (E, 2, I, H) and w2f.shape == (E, H, I)
    back13, back2 = convert.from_fused_epmoe(w1, w2f, transposed=transposed)
    _same(back13, w13)
    _same(back2, w2)
    assert back13.data_ptr() != w1.data_ptr()


def test_bad_inputs_name_the_argument(w13_w2):
    w13, w2 = w13_w2
    with pytest.raises(ValueError, match="gate_up_proj: expected a 3-D"):
        convert.w13_from_hf(w13[0])
    with pytest.raises(ValueError, match="gate_up_proj: expected an even"):
        convert.w13_from_hf(torch.zeros(E, 3, H), interleaved=True)
    with pytest.raises(TypeError, match="down_proj"):
        convert.w2_from_hf([[1.0]])
    with pytest.raises(ValueError, match="wo: expected shape"):
        convert.from_epmoe(*convert.to_epmoe(w13, w2)[:2], torch.zeros(E, H, I))
    with pytest.raises(ValueError, match="w1: expected a 4-D"):
        convert.from_fused_epmoe(w13, w2)
    with pytest.raises(ValueError, match="w2: expected shape"):
        convert.to_fused_epmoe(w13, w2.transpose(1, 2))
