"""Every rung of the implementation ladder against the float64 reference, and the fused activation kernel."""

from __future__ import annotations

import os

import pytest
import torch

from tilemoe.config import MoEConfig
from tilemoe.impls import get_impl
from tilemoe.impls.reference import reference_experts_fp64
from tilemoe.ops.act_and_mul import act_and_mul
from tilemoe.ops.activation import act_and_mul_torch
from tilemoe.testing import POISON, assert_close, make_input, make_routing, make_weights

# grouped_compiled compiles per config (seconds on CPU): tested below on one case only
CPU_LADDER = ["naive", "batched", "fused_act", "memeff", "grouped", "torch_grouped_mm"]

# (T, E, K, activation, gated, expert_bias, routing, hot_expert)
CASES = [
    (0, 6, 2, "silu", True, False, "softmax_topk", None),  # no tokens
    (1, 6, 2, "silu", True, False, "softmax_topk", None),  # one token: most experts get none
    (7, 6, 1, "gelu", True, False, "softmax_topk", None),  # K=1, T not a multiple of anything
    (33, 7, 3, "silu", True, False, "softmax_topk", 4),  # E not a power of two, one expert gets every token
    (33, 12, 4, "relu", False, True, "softmax_topk", None),  # plain MLP with biases
    (33, 5, 2, "swigluoai", True, True, "softmax_topk", None),  # gpt-oss activation with biases
    (7, 6, 1, "silu", True, False, "sigmoid_top1_input_scaled", None),  # Llama-4: weight scales the input
    (17, 6, 6, "gelu_tanh", True, False, "softmax_topk", None),  # K = E: every expert on every token
]


def _available(name: str) -> bool:
    return get_impl(name).available("cpu")


def _run_case(name, case, dtype, generator):
    t, e, k, act, gated, bias, routing, hot = case
    config = MoEConfig(
        num_experts=e,
        top_k=k,
        hidden_size=24,
        intermediate_size=20,
        activation=act,
        gated=gated,
        expert_bias=bias,
        routing=routing,
    )
    w = make_weights(config, dtype=dtype, generator=generator)
    x = make_input(t, config, dtype=dtype, generator=generator)
    tw, ti = make_routing(t, config, generator=generator, hot_expert=hot)
    ref = reference_experts_fp64(x, w["w13"], w["w2"], tw, ti, config=config, b13=w["b13"], b2=w["b2"])
    out = get_impl(name).fn(x, w["w13"], w["w2"], tw, ti, config=config, b13=w["b13"], b2=w["b2"])
    assert out.dtype == dtype and out.shape == (t, config.hidden_size)
    if hot is not None:
        assert (ti[:, 0] == hot).all()  # the case really sends every token to one expert
    assert_close(out, ref, name=name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-K{c[2]}-{c[3]}-{c[6]}")
@pytest.mark.parametrize("name", CPU_LADDER)
def test_ladder_matches_reference_fp32(name, case, generator):
    if not _available(name):
        pytest.skip(f"{name} not available here")
    _run_case(name, case, torch.float32, generator)


@pytest.mark.parametrize("name", ["naive", "batched", "memeff", "grouped", "torch_grouped_mm"])
def test_ladder_fp16(name, generator):
    if not _available(name):
        pytest.skip(f"{name} not available here")
    _run_case(name, CASES[3], torch.float16, generator)


def test_grouped_compiled_matches_reference(generator):
    if not _available("grouped_compiled"):
        pytest.skip("torch.compile needs a C++ compiler on CPU")
    _run_case("grouped_compiled", CASES[5], torch.float32, generator)  # swigluoai + biases


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["grouped_graphs", "grouped_compiled", "fused_act", "torch_grouped_mm"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-K{c[2]}-{c[3]}-{c[6]}")
def test_ladder_cuda_bf16(name, case, generator):
    if not get_impl(name).available("cuda"):
        pytest.skip(f"{name} not available on this GPU")
    t, e, k, act, gated, bias, routing, hot = case
    config = MoEConfig(
        num_experts=e, top_k=k, hidden_size=64, intermediate_size=32, activation=act, gated=gated,
        expert_bias=bias, routing=routing,
    )  # fmt: skip
    w = make_weights(config, dtype=torch.bfloat16, device="cuda", generator=generator)
    x = make_input(t, config, dtype=torch.bfloat16, device="cuda", generator=generator)
    tw, ti = make_routing(t, config, device="cuda", generator=generator, hot_expert=hot)
    ref = reference_experts_fp64(x, w["w13"], w["w2"], tw, ti, config=config, b13=w["b13"], b2=w["b2"])
    for _ in range(2):  # the second call of grouped_graphs replays the captured graph
        out = get_impl(name).fn(x, w["w13"], w["w2"], tw, ti, config=config, b13=w["b13"], b2=w["b2"])
        assert_close(out, ref, name=name)


def test_batched_out_of_memory_propagates(monkeypatch, generator):
    """The bench turns this error into an OOM row; the impl must raise it, not swallow it."""

    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (forced by the test)")

    monkeypatch.setattr("tilemoe.impls.batched.torch.einsum", fail)
    with pytest.raises(torch.OutOfMemoryError):
        _run_case("batched", CASES[3], torch.float32, generator)


def test_registry_levels():
    levels = {n: get_impl(n).level for n in ["naive", "batched", "fused_act", "memeff", "grouped"]}
    assert levels == {"naive": 0, "batched": 1, "fused_act": 2, "memeff": 3, "grouped": 4}
    assert get_impl("grouped_graphs").level == 5 and get_impl("grouped_graphs").devices == ("cuda",)
    assert get_impl("grouped_compiled").level == 6
    assert get_impl("grouped").auto_priority == 10 and get_impl("torch_grouped_mm").auto_priority == 50


# --------------------------------------------------------------------------------- act_and_mul kernel
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="no triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "activation,gated",
    [("silu", True), ("gelu", True), ("gelu_tanh", True), ("relu", True), ("swigluoai", True), ("silu", False),
     ("gelu", False), ("relu", False)],
)  # fmt: skip
def test_act_and_mul_kernel(activation, gated, dtype, generator):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # I=37: not a multiple of the column block; 13 rows: not a multiple of the row block
    config = MoEConfig(num_experts=2, top_k=1, hidden_size=8, intermediate_size=37, activation=activation, gated=gated)
    h = (torch.randn(13, config.w13_rows, generator=generator) * 4).to(device, dtype)  # *4 reaches the clamps
    out = torch.full((13, 37), POISON, dtype=dtype, device=device)
    got = act_and_mul(h, config, out=out)
    assert got is out
    assert_close(got, act_and_mul_torch(h.double(), config))


def test_act_and_mul_checks():
    config = MoEConfig(num_experts=2, top_k=1, hidden_size=8, intermediate_size=4)
    with pytest.raises(ValueError, match="h: expected 8 columns"):
        act_and_mul(torch.zeros(3, 5), config)
    with pytest.raises(TypeError, match="h: expected dtype"):
        act_and_mul(torch.zeros(3, 8, dtype=torch.float64), config)
    assert act_and_mul(torch.zeros(0, 8), config).shape == (0, 4)
