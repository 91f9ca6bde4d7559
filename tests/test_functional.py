"""moe_forward and the MoE module against a dense token-by-token float64 reference written here, edge cases
(T=0, T=1, one expert takes every token, experts that get none) and every bad-input error."""

from __future__ import annotations

import math

import pytest
import torch

from tilemoe.config import MoEConfig
from tilemoe.functional import moe_forward
from tilemoe.module import MoE
from tilemoe.testing import assert_close, make_input, make_routing, make_weights

IMPL = "reference"
E, K, H, I = 8, 2, 16, 12


def cfg(**kw) -> MoEConfig:
    base = {"num_experts": E, "top_k": K, "hidden_size": H, "intermediate_size": I}
    return MoEConfig(**{**base, **kw})


# ------------------------------------------------------------------------- the dense reference, by hand
def act(name: str, v: float) -> float:
    if name == "silu":
        return v / (1 + math.exp(-v))
    if name == "gelu":
        return 0.5 * v * (1 + math.erf(v / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
    if name == "relu":
        return max(v, 0.0)
    raise AssertionError(name)


def mlp(c: MoEConfig, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, b13=None, b2=None) -> torch.Tensor:
    """One expert on one token, float64, activation applied element by element."""
    h = w13.double() @ x
    if b13 is not None:
        h = h + b13.double()
    if c.gated:
        n = h.shape[0] // 2
        gate, up = h[:n].tolist(), h[n:].tolist()
        if c.activation == "swigluoai":
            a = []
            for g, u in zip(gate, up):
                g = min(g, c.swiglu_limit)
                u = min(max(u, -c.swiglu_limit), c.swiglu_limit)
                a.append((u + 1) * g / (1 + math.exp(-c.swiglu_alpha * g)))
        else:
            a = [act(c.activation, g) * u for g, u in zip(gate, up)]
    else:
        a = [act(c.activation, v) for v in h.tolist()]
    y = w2.double() @ torch.tensor(a, dtype=torch.float64)
    if b2 is not None:
        y = y + b2.double()
    return y


def dense_reference(c, x, w, weights, ids, shared=None):
    """sum_k w[t,k] * expert(x[t]) (Llama-4: expert(w[t,k] * x[t])) + shared expert (optionally gated)."""
    x64 = x.reshape(-1, c.hidden_size).double()
    out = torch.zeros_like(x64)
    for t in range(x64.shape[0]):
        for slot in range(c.top_k):
            e, g = int(ids[t, slot]), float(weights[t, slot])
            b13 = None if w["b13"] is None else w["b13"][e]
            b2 = None if w["b2"] is None else w["b2"][e]
            if c.weights_on_input:
                out[t] += mlp(c, g * x64[t], w["w13"][e], w["w2"][e], b13, b2)
            else:
                out[t] += g * mlp(c, x64[t], w["w13"][e], w["w2"][e], b13, b2)
        if shared is not None:
            y = mlp(c, x64[t], shared["shared_w13"], shared["shared_w2"])
            if shared.get("shared_gate") is not None:
                y = y / (1 + math.exp(-float(shared["shared_gate"].double()[0] @ x64[t])))
            out[t] += y
    return out.reshape(x.shape)


def shared_weights(c: MoEConfig, generator, dtype=torch.float32, gate=False) -> dict:
    si = c.shared_intermediate_size
    rows = 2 * si if c.gated else si
    out = {
        "shared_w13": (torch.randn(rows, c.hidden_size, generator=generator) * c.hidden_size**-0.5).to(dtype),
        "shared_w2": (torch.randn(c.hidden_size, si, generator=generator) * si**-0.5).to(dtype),
        "shared_gate": None,
    }
    if gate:
        out["shared_gate"] = torch.randn(1, c.hidden_size, generator=generator).to(dtype)
    return out


# -------------------------------------------------------------------------------------------- numerics
ACTS = [
    ("silu", True),
    ("gelu", True),
    ("gelu_tanh", True),
    ("relu", True),
    ("swigluoai", True),
    ("silu", False),  # plain MLPs: act(x @ w1) @ w2
    ("gelu", False),
    ("gelu_tanh", False),
    ("relu", False),
]


@pytest.mark.parametrize("activation, gated", ACTS)
@pytest.mark.parametrize("expert_bias", [False, True])
def test_moe_forward_matches_dense_reference(activation, gated, expert_bias, generator):
    # swiglu_limit 1.5 so the clamps of swigluoai are reached by O(1) activations
    c = cfg(activation=activation, gated=gated, expert_bias=expert_bias, swiglu_limit=1.5)
    w = make_weights(c, generator=generator)
    x = make_input(13, c, generator=generator) * 2
    weights, ids = make_routing(13, c, generator=generator)
    out = moe_forward(
        x, w["w13"], w["w2"], topk_weights=weights, topk_ids=ids, config=c, impl=IMPL, b13=w["b13"], b2=w["b2"]
    )
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close(out, dense_reference(c, x, w, weights, ids), torch.float32)


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("gated", [True, False])
def test_shared_experts(gate, gated, generator):
    c = cfg(gated=gated, num_shared_experts=2, shared_intermediate_size=20, shared_expert_gate=gate)
    w = make_weights(c, generator=generator)
    s = shared_weights(c, generator, gate=gate)
    x = make_input(9, c, generator=generator)
    weights, ids = make_routing(9, c, generator=generator)
    out = moe_forward(x, w["w13"], w["w2"], topk_weights=weights, topk_ids=ids, config=c, impl=IMPL, **s)
    assert_close(out, dense_reference(c, x, w, weights, ids, shared=s), torch.float32)
    routed_only = moe_forward(x, w["w13"], w["w2"], topk_weights=weights, topk_ids=ids, config=c, impl=IMPL)
    assert not torch.allclose(out, routed_only)


@pytest.mark.parametrize(
    "routing, extra",
    [
        ("softmax_topk", {"renormalize": False}),
        ("topk_softmax", {"router_bias": True}),
        ("sigmoid_grouped_topk", {"n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5}),
        ("softmax_grouped_topk", {"n_group": 2, "topk_group": 1}),
        ("sigmoid_top1_input_scaled", {"top_k": 1}),
    ],
)
def test_router_logits_path_routes_then_computes(routing, extra, generator):
    c = cfg(routing=routing, **extra)
    w = make_weights(c, generator=generator)
    x = make_input(11, c, generator=generator)
    logits = torch.randn(11, E, generator=generator)
    from tilemoe.routing import route

    weights, ids = route(logits, c)
    out = moe_forward(x, w["w13"], w["w2"], router_logits=logits, config=c, impl=IMPL)
    assert_close(out, dense_reference(c, x, w, weights, ids), torch.float32)


def test_llama4_weight_scales_the_expert_input(generator):
    c = cfg(routing="sigmoid_top1_input_scaled", top_k=1, renormalize=False)
    w = make_weights(c, generator=generator)
    x = make_input(7, c, generator=generator) * 3
    logits = torch.randn(7, E, generator=generator)
    out = moe_forward(x, w["w13"], w["w2"], router_logits=logits, config=c, impl=IMPL)
    from tilemoe.routing import route

    weights, ids = route(logits, c)
    assert_close(out, dense_reference(c, x, w, weights, ids), torch.float32)
    # scaling the output instead gives another answer (the expert MLP is not linear)
    on_output = dense_reference(c.replace(routing="topk_softmax", top_k=1), x, w, weights, ids)
    assert not torch.allclose(out.double(), on_output, atol=1e-3)


def test_three_dim_input_keeps_its_shape(generator):
    c = cfg()
    w = make_weights(c, generator=generator)
    x = torch.randn(3, 5, H, generator=generator)
    logits = torch.randn(15, E, generator=generator)
    out = moe_forward(x, w["w13"], w["w2"], router_logits=logits, config=c, impl=IMPL)
    assert out.shape == (3, 5, H)
    flat = moe_forward(x.reshape(15, H), w["w13"], w["w2"], router_logits=logits, config=c, impl=IMPL)
    torch.testing.assert_close(out.reshape(15, H), flat)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_through_the_reference(dtype, generator):
    c = cfg(expert_bias=True)
    w = make_weights(c, generator=generator, dtype=dtype)
    x = make_input(10, c, generator=generator, dtype=dtype)
    weights, ids = make_routing(10, c, generator=generator)
    out = moe_forward(
        x, w["w13"], w["w2"], topk_weights=weights, topk_ids=ids.long(), config=c, impl=IMPL, b13=w["b13"], b2=w["b2"]
    )
    assert out.dtype == dtype
    assert_close(out, dense_reference(c, x, w, weights, ids), dtype)


# ------------------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("shared", [False, True])
def test_zero_tokens(shared, generator):
    c = cfg(num_shared_experts=int(shared), shared_intermediate_size=8 * int(shared), shared_expert_gate=shared)
    w = make_weights(c, generator=generator)
    s = shared_weights(c, generator, gate=True) if shared else {}
    x = torch.empty(0, H)
    out = moe_forward(x, w["w13"], w["w2"], router_logits=torch.empty(0, E), config=c, impl=IMPL, **s)
    assert out.shape == (0, H) and out.dtype == x.dtype
    weights, ids = make_routing(0, c)
    out = moe_forward(x, w["w13"], w["w2"], topk_weights=weights, topk_ids=ids, config=c, impl=IMPL, **s)
    assert out.shape == (0, H)
    out = moe_forward(torch.empty(2, 0, H), w["w13"], w["w2"], router_logits=torch.empty(0, E), config=c, impl=IMPL)
    assert out.shape == (2, 0, H)
    module = MoE(c, impl=IMPL)
    assert module(torch.empty(0, H)).shape == (0, H)


def test_one_token(generator):
    c = cfg(expert_bias=True)
    w = make_weights(c, generator=generator)
    x = make_input(1, c, generator=generator)
    weights, ids = make_routing(1, c, generator=generator)
    out = moe_forward(
        x, w["w13"], w["w2"], topk_weights=weights, topk_ids=ids, config=c, impl=IMPL, b13=w["b13"], b2=w["b2"]
    )
    assert_close(out, dense_reference(c, x, w, weights, ids), torch.float32)


def test_one_expert_takes_every_token(generator):
    c = cfg()
    w = make_weights(c, generator=generator)
    x = make_input(24, c, generator=generator)
    weights, ids = make_routing(24, c, generator=generator, hot_expert=5)
    assert (ids[:, 0] == 5).all()
    out = moe_forward(x, w["w13"], w["w2"], topk_weights=weights, topk_ids=ids, config=c, impl=IMPL)
    assert_close(out, dense_reference(c, x, w, weights, ids), torch.float32)
    # top-1 with every token on expert 5: the layer is expert 5 times the weight
    c1 = cfg(top_k=1)
    ids1 = torch.full((24, 1), 5, dtype=torch.int32)
    ones = torch.ones(24, 1)
    out1 = moe_forward(x, w["w13"], w["w2"], topk_weights=ones, topk_ids=ids1, config=c1, impl=IMPL)
    assert_close(out1, dense_reference(c1, x, w, ones, ids1), torch.float32)


def test_experts_that_get_no_tokens(generator):
    c = cfg(num_experts=16, top_k=1)
    w = make_weights(c, generator=generator)
    x = make_input(3, c, generator=generator)
    ids = torch.tensor([[3], [3], [11]], dtype=torch.int32)  # 14 of 16 experts idle
    weights = torch.tensor([[0.5], [1.0], [2.0]])
    out = moe_forward(x, w["w13"], w["w2"], topk_weights=weights, topk_ids=ids, config=c, impl=IMPL)
    assert_close(out, dense_reference(c, x, w, weights, ids), torch.float32)
    # weights of an idle expert do not matter
    w["w13"][0].fill_(float("nan"))
    again = moe_forward(x, w["w13"], w["w2"], topk_weights=weights, topk_ids=ids, config=c, impl=IMPL)
    torch.testing.assert_close(again, out)


# ---------------------------------------------------------------------------------------------- module
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"num_shared_experts": 1, "shared_intermediate_size": 10, "shared_expert_gate": True},  # Qwen2-MoE
        {"routing": "sigmoid_top1_input_scaled", "top_k": 1, "num_shared_experts": 1, "shared_intermediate_size": 12},
        {"activation": "swigluoai", "expert_bias": True, "router_bias": True, "routing": "topk_softmax"},  # gpt-oss
        {
            "routing": "sigmoid_grouped_topk",
            "n_group": 4,
            "topk_group": 2,
            "score_correction_bias": True,
            "routed_scaling_factor": 2.5,
            "num_shared_experts": 2,
            "shared_intermediate_size": 16,
        },  # DeepSeek-V3
    ],
)
def test_module_matches_dense_reference(extra, generator):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    c = cfg(**extra)
    module = MoE(c, impl=IMPL)
    if module.correction_bias is not None:
        module.correction_bias.copy_(torch.randn(E, generator=generator) * 0.1)
    x = torch.randn(2, 6, H, generator=generator)
    with torch.no_grad():
        out = module(x)
        _, weights, ids = module.route(x.reshape(-1, H))
    w = {
        name: None if p is None else p.detach()
        for name, p in (("w13", module.w13), ("w2", module.w2), ("b13", module.b13), ("b2", module.b2))
    }
    shared = None
    if c.has_shared_experts:
        shared = {"shared_w13": module.shared_w13.detach(), "shared_w2": module.shared_w2.detach()}
        shared["shared_gate"] = None if module.shared_gate is None else module.shared_gate.detach()
    assert out.shape == x.shape
    assert_close(out, dense_reference(c, x, w, weights, ids, shared=shared), torch.float32)


def test_module_rejects_wrong_hidden_size():
    with pytest.raises(ValueError, match=r"x: expected last dim hidden_size=16, got shape \[4, 15\]"):
        MoE(cfg(), impl=IMPL)(torch.zeros(4, 15))


# ------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def layer(generator):
    c = cfg(expert_bias=True, num_shared_experts=1, shared_intermediate_size=6, shared_expert_gate=True)
    w = make_weights(c, generator=generator)
    s = shared_weights(c, generator, gate=True)
    x = make_input(4, c, generator=generator)
    weights, ids = make_routing(4, c, generator=generator)
    return c, x, w, s, weights, ids


def call(layer, **changes):
    c, x, w, s, weights, ids = layer
    kwargs = {
        "x": x,
        "w13": w["w13"],
        "w2": w["w2"],
        "topk_weights": weights,
        "topk_ids": ids,
        "config": c,
        "impl": IMPL,
        "b13": w["b13"],
        "b2": w["b2"],
        **s,
    }
    kwargs.update(changes)
    x = kwargs.pop("x")
    w13 = kwargs.pop("w13")
    w2 = kwargs.pop("w2")
    return moe_forward(x, w13, w2, **kwargs)


def test_valid_layer_runs(layer):
    assert call(layer).shape == (4, H)


META = torch.device("meta")  # stands in for a second device on a CPU-only machine


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"x": torch.zeros(4, 15)}, ValueError, r"x: expected shape \[T, 16\] or \[B, S, 16\], got \[4, 15\]"),
        ({"x": torch.zeros(1, 1, 4, 16)}, ValueError, r"x: expected shape \[T, 16\] or \[B, S, 16\]"),
        ({"x": torch.zeros(4, 16, dtype=torch.int32)}, TypeError, r"x: expected dtype in .*got torch.int32"),
        ({"x": [[0.0] * 16]}, TypeError, r"x: expected a torch.Tensor, got list"),
        ({"config": {"num_experts": 8}}, TypeError, r"config: expected a MoEConfig, got dict"),
        ({"w13": torch.zeros(8, 20, 16)}, ValueError, r"w13: expected shape \[8, 24, 16\], got \[8, 20, 16\]"),
        ({"w13": torch.zeros(7, 24, 16)}, ValueError, r"w13: expected shape \[8, 24, 16\], got \[7, 24, 16\]"),
        ({"w2": torch.zeros(8, 12, 16)}, ValueError, r"w2: expected shape \[8, 16, 12\], got \[8, 12, 16\]"),
        ({"w2": torch.zeros(8, 16, 12).half()}, TypeError, r"w13/w2: expected dtype torch.float32 .*w2 torch.float16"),
        ({"w13": torch.zeros(8, 24, 16, device=META)}, ValueError, r"w13: expected a tensor on cpu .*got one on meta"),
        ({"w2": torch.zeros(8, 16, 12, device=META)}, ValueError, r"w2: expected a tensor on cpu .*got one on meta"),
        ({"b13": torch.zeros(8, 12)}, ValueError, r"b13: expected shape \[8, 24\], got \[8, 12\]"),
        ({"b2": torch.zeros(8, 12)}, ValueError, r"b2: expected shape \[8, 16\], got \[8, 12\]"),
        ({"b2": torch.zeros(8, 16, device=META)}, ValueError, r"b2: expected a tensor on cpu .*got one on meta"),
        (
            {"topk_ids": torch.tensor([[0, 1]] * 3 + [[2, 8]])},
            ValueError,
            r"topk_ids: expected every id in \[0, 8\), got ids in \[0, 8\]",
        ),  # noqa: E501
        (
            {"topk_ids": torch.tensor([[0, 1]] * 3 + [[-1, 2]])},
            ValueError,
            r"topk_ids: expected every id in \[0, 8\), got ids in \[-1, 2\]",
        ),  # noqa: E501
        ({"topk_ids": torch.zeros(4, 2)}, TypeError, r"topk_ids: expected dtype int32 or int64, got torch.float32"),
        (
            {"topk_ids": torch.zeros(4, 3, dtype=torch.int32)},
            ValueError,
            r"topk_ids: expected shape \[4, 2\], got \[4, 3\]",
        ),  # noqa: E501
        (
            {"topk_ids": torch.zeros(4, 2, dtype=torch.int32, device=META)},
            ValueError,
            r"topk_ids: expected a tensor on cpu",
        ),  # noqa: E501
        ({"topk_weights": torch.ones(4, 1)}, ValueError, r"topk_weights: expected shape \[4, 2\], got \[4, 1\]"),
        ({"topk_weights": torch.ones(4, 2, dtype=torch.int64)}, TypeError, r"topk_weights: expected a floating dtype"),
        ({"topk_weights": torch.ones(4, 2, device=META)}, ValueError, r"topk_weights: expected a tensor on cpu"),
        ({"topk_ids": None}, ValueError, r"router_logits: expected router_logits, or both topk_weights and topk_ids"),
        ({"router_logits": torch.zeros(4, 8)}, ValueError, r"router_logits: give either router_logits or topk_weights"),
        (
            {"router_logits": torch.zeros(4, 8), "topk_ids": None, "topk_weights": None, "x": torch.zeros(5, 16)},
            ValueError,
            r"router_logits: expected shape \[5, 8\], got \[4, 8\]",
        ),
        (
            {"router_logits": torch.zeros(4, 8, device=META), "topk_ids": None, "topk_weights": None},
            ValueError,
            r"router_logits: expected a tensor on cpu",
        ),
        ({"shared_w2": None}, ValueError, r"shared_w2: expected a tensor when the other shared expert weights"),
        ({"shared_w13": torch.zeros(6, 16)}, ValueError, r"shared_w13: expected shape \[12, 16\], got \[6, 16\]"),
        ({"shared_w2": torch.zeros(16, 12)}, ValueError, r"shared_w2: expected shape \[16, 6\], got \[16, 12\]"),
        ({"shared_w2": torch.zeros(16, 6).double()}, TypeError, r"shared_w2: expected dtype in \['torch.float32'\]"),
        ({"shared_w2": torch.zeros(16, 6, device=META)}, ValueError, r"shared_w2: expected a tensor on cpu"),
        ({"shared_gate": torch.zeros(16)}, ValueError, r"shared_gate: expected shape \[1, 16\], got \[16\]"),
        ({"shared_gate": None}, ValueError, r"shared_gate: expected a \[1, 16\] tensor \(config.shared_expert_gate"),
        ({"impl": "nope"}, ValueError, r"impl: expected one of \[.*'reference'.*\], got 'nope'"),
    ],
)
def test_bad_input_names_the_argument(layer, changes, error, match):
    with pytest.raises(error, match=match):
        call(layer, **changes)


def test_shared_weights_without_shared_experts_in_config(generator):
    c = cfg()
    w = make_weights(c, generator=generator)
    x = make_input(2, c, generator=generator)
    with pytest.raises(ValueError, match=r"shared_w13: the config has no shared experts"):
        moe_forward(
            x,
            w["w13"],
            w["w2"],
            router_logits=torch.zeros(2, E),
            config=c,
            impl=IMPL,
            shared_w13=torch.zeros(8, H),
            shared_w2=torch.zeros(H, 4),
        )


def test_top_k_above_num_experts():
    with pytest.raises(ValueError, match=r"MoEConfig.top_k: expected top_k <= num_experts \(8\), got 9"):
        cfg(top_k=9)


def test_check_ids_false_skips_the_host_read(layer):
    ids = torch.tensor([[0, 1]] * 3 + [[2, 7]], dtype=torch.int32)
    assert call(layer, topk_ids=ids, check_ids=False).shape == (4, H)
