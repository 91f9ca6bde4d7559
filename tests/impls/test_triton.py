"""The registered "triton" implementation: registry, moe_forward, and on the GPU bf16, CUDA graphs,
torch.compile and a randomized sweep against the float64 reference."""

import os
import random

import pytest
import torch

import tilemoe.impls
from tilemoe.bench.timing import capture_graph
from tilemoe.config import MoEConfig
from tilemoe.functional import moe_forward
from tilemoe.impls import get_impl, resolve_impl
from tilemoe.testing import (
    assert_close,
    assert_replays_follow_new_inputs,
    make_input,
    make_routing,
    make_weights,
    reference_experts,
)
from tilemoe.tuning import KernelConfig


def _mismatch(out, x, w, topk_weights, topk_ids, config) -> str | None:
    """The first line of assert_close's message against the float64 reference (bf16 tolerances), or None."""
    try:
        assert_close(out, reference_experts(x, w, topk_weights, topk_ids, config), torch.bfloat16)
    except AssertionError as error:
        return str(error).splitlines()[0][:200]
    return None


def test_registered_with_auto_priority():
    impl = get_impl("triton")
    assert impl.auto_priority == 100 and "cuda" in impl.devices
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert impl.available("cpu") == interpreted
    if interpreted or torch.cuda.is_available():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        assert resolve_impl("auto", torch.device(device)).name == "triton"


def test_moe_forward_through_registry(generator):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not get_impl("triton").available(device):
        pytest.skip("no CUDA and no Triton interpreter")
    config = MoEConfig(num_experts=6, top_k=2, hidden_size=32, intermediate_size=24)
    w = make_weights(config, device=device, generator=generator)
    x = make_input(5, config, device=device, generator=generator)
    logits = torch.randn(5, 6, generator=generator).to(device)
    out = moe_forward(x, w["w13"], w["w2"], router_logits=logits, config=config, impl="triton")
    ref = moe_forward(x, w["w13"], w["w2"], router_logits=logits, config=config, impl="reference")
    assert_close(out, ref, torch.float32)


def test_moe_forward_routes_inside_the_decode_kernel(generator, monkeypatch):
    """moe_forward with router logits goes through the impl's from_logits; with a decode config the routing kernel
    never runs (GEMM 1 routes), and the result is the reference's."""
    import tilemoe.ops.fused_experts as fe
    import tilemoe.ops.route as route_module

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not get_impl("triton").available(device):
        pytest.skip("no CUDA and no Triton interpreter")
    assert get_impl("triton").from_logits is not None and get_impl("reference").from_logits is None
    decode = KernelConfig(block_n1=16, block_k1=32, block_n2=16, block_k2=32, decode=True)
    monkeypatch.setattr(fe, "pick_config", lambda shape, dtype, device_name: decode)
    monkeypatch.setattr(fe, "DECODE_ROUTE_MAX_TOKENS", 3)
    routed = []
    real_route = route_module.route_fast
    monkeypatch.setattr(route_module, "route_fast", lambda *a, **k: routed.append(1) or real_route(*a, **k))
    config = MoEConfig(num_experts=6, top_k=2, hidden_size=32, intermediate_size=24)
    w = make_weights(config, device=device, generator=generator)
    x = make_input(3, config, device=device, generator=generator)
    logits = torch.randn(3, 6, generator=generator).to(device)
    out = moe_forward(x, w["w13"], w["w2"], router_logits=logits, config=config, impl="triton")
    assert routed == [] and fe.decode_route_error is None  # routed in GEMM 1: no routing launch, no fallback
    ref = moe_forward(x, w["w13"], w["w2"], router_logits=logits, config=config, impl="reference")
    assert_close(out, ref, torch.float32)
    empty = moe_forward(x[:0], w["w13"], w["w2"], router_logits=logits[:0], config=config, impl="triton")
    assert empty.shape == (0, 32)


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v2-lite", "gpt-oss-120b"])
@pytest.mark.parametrize("num_tokens", [1, 300])
def test_presets_bf16(preset, num_tokens, generator):
    # the preset's H, I, activation and biases with 8 experts (the float64 reference of all of them is too slow)
    full = MoEConfig.from_pretrained(preset)
    config = full.replace(
        num_experts=8, top_k=min(full.top_k, 8), routing="softmax_topk", n_group=1, topk_group=1,
        num_shared_experts=0, shared_intermediate_size=0,
    )  # fmt: skip
    w = make_weights(config, dtype=torch.bfloat16, device="cuda", generator=generator)
    x = make_input(num_tokens, config, dtype=torch.bfloat16, device="cuda", generator=generator)
    tw, ti = make_routing(num_tokens, config, device="cuda", generator=generator)
    for deterministic in (True, False):
        out = tilemoe.ops.fused_experts.fused_experts(
            x, w["w13"], w["w2"], tw, ti, config=config, b13=w["b13"], b2=w["b2"], deterministic=deterministic
        )
        assert_close(out, reference_experts(x, w, tw, ti, config), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [256, 200, 131])  # 131: an odd row stride
def test_atomic_combine(dtype, hidden, generator):
    # deterministic=False: GEMM 2 adds each slot's row into its token's row with atomics in x.dtype
    config = MoEConfig(num_experts=10, top_k=4, hidden_size=hidden, intermediate_size=96, expert_bias=True)
    w = make_weights(config, dtype=dtype, device="cuda", generator=generator)
    tiles = KernelConfig(block_m=64, block_n1=64, block_k1=64, block_n2=64, block_k2=64)
    for num_tokens, hot_expert in ((300, None), (77, 3), (1, None)):
        x = make_input(num_tokens, config, dtype=dtype, device="cuda", generator=generator)
        tw, ti = make_routing(num_tokens, config, device="cuda", generator=generator, hot_expert=hot_expert)
        for kernel_config in (tiles, None):
            out = tilemoe.ops.fused_experts.fused_experts(
                x, w["w13"], w["w2"], tw, ti, config=config, b13=w["b13"], b2=w["b2"], kernel_config=kernel_config,
                deterministic=False,
            )  # fmt: skip
            assert_close(out, reference_experts(x, w, tw, ti, config), dtype)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(generator):
    config = MoEConfig(num_experts=12, top_k=4, hidden_size=256, intermediate_size=192)
    w = make_weights(config, dtype=torch.bfloat16, device="cuda", generator=generator)
    x = make_input(33, config, dtype=torch.bfloat16, device="cuda", generator=generator)
    tw, ti = make_routing(33, config, device="cuda", generator=generator)
    fn = get_impl("triton").fn
    graph, out = capture_graph(lambda: fn(x, w["w13"], w["w2"], tw, ti, config=config))
    # new inputs copied in place: the replay must follow them (new routing too)
    assert_replays_follow_new_inputs(graph, out, x, w, tw, ti, config, generator, replays=2)


@pytest.mark.gpu
def test_torch_compile(generator):
    config = MoEConfig(num_experts=8, top_k=2, hidden_size=128, intermediate_size=64, activation="swigluoai")
    w = make_weights(config, dtype=torch.bfloat16, device="cuda", generator=generator)
    x = make_input(20, config, dtype=torch.bfloat16, device="cuda", generator=generator)
    logits = torch.randn(20, 8, generator=generator).to("cuda")

    @torch.compile
    def layer(x, logits):
        return moe_forward(x, w["w13"], w["w2"], router_logits=logits, config=config, impl="triton") * 2

    out = layer(x, logits)
    ref = moe_forward(x, w["w13"], w["w2"], router_logits=logits, config=config, impl="reference")
    assert_close(out, 2 * ref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("part", range(4))
def test_randomized_sweep_bf16(part):
    """4 x 50 = 200 random shapes, routings and options; every one must match the float64 reference."""
    seed = torch.seed() + part  # fresh cases every run; the seed is in the failure message to replay them
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    # a few forced configs (each compiles once) besides pick_config's own
    forced = [None, None, KernelConfig(block_m=16, block_n1=16, block_k1=32, block_n2=32, block_k2=16),
              KernelConfig(block_m=64, block_n1=32, block_k1=64, block_n2=64, block_k2=32),
              KernelConfig(block_m=64, block_n1=64, block_k1=64, block_n2=64, block_k2=64, tma=True, split_tail=True),
              KernelConfig(block_m=32, block_n1=32, block_k1=32, block_n2=32, block_k2=32, split_tail=True,
                           persistent=True),
              KernelConfig(block_m=64, block_n1=64, block_k1=64, block_n2=64, block_k2=64, tma=True, split_tail=True,
                           sorted_x=True, gate_up_dot=True),
              KernelConfig(block_m=64, block_n1=64, block_k1=64, block_n2=64, block_k2=64, tma=True, sorted_x=True,
                           gate_up_dot=True, persistent1=True, persistent=True),
              KernelConfig(block_m=64, block_n1=64, block_k1=64, block_n2=64, block_k2=64, tma=True, split_tail=True,
                           gate_up_dot=True, persistent1=True, persistent=True, persistent_tails=True),
              KernelConfig(block_m=32, block_n1=32, block_k1=32, block_n2=32, block_k2=32, tma=True, persistent1=True,
                           gemm1_clears_out=True),
              KernelConfig(block_m=64, block_n1=64, block_k1=64, block_n2=64, block_k2=64, split_tail=True,
                           gemm1_clears_out=True),
              KernelConfig(block_m=128, block_n1=128, block_k1=64, num_warps1=8, num_stages1=4, block_n2=128,
                           block_k2=64, num_warps2=8, num_stages2=4, tma=True, gluon=True),
              KernelConfig(block_m=64, block_n1=64, block_k1=64, block_n2=64, block_k2=64, tma=True, gluon=True,
                           gate_up_dot=True, persistent1=True, expert_groups=True, group_m1=2),
              KernelConfig(block_m=64, block_n1=64, block_k1=64, block_n2=64, block_k2=64, tma=True, sorted_x=True,
                           gate_up_dot=True, persistent1=True, persistent=True, expert_groups=True, group_m1=3,
                           group_m2=16),
              KernelConfig(block_m=32, block_n1=32, block_k1=32, block_n2=32, block_k2=32, split_tail=True,
                           expert_groups=True, group_m1=1, group_m2=2),
              KernelConfig(block_m=32, block_n1=32, block_k1=32, block_n2=32, block_k2=32, one_launch=True,
                           expert_groups=True, group_m1=2, group_m2=3)]  # fmt: skip
    mismatches = []
    for case in range(50):
        e = rng.choice([1, 3, 8, 13, 64, 160])
        k = rng.randint(1, min(e, 8))
        config = MoEConfig(
            num_experts=e, top_k=k, hidden_size=rng.choice([16, 72, 128, 200, 512]),
            intermediate_size=rng.choice([8, 40, 96, 256]), activation=rng.choice(["silu", "gelu", "swigluoai"]),
            expert_bias=rng.random() < 0.3, routing="softmax_topk" if k > 1 else rng.choice(
                ["softmax_topk", "sigmoid_top1_input_scaled"]),
        )  # fmt: skip
        t = rng.choice([0, 1, 2, 7, 64, 300, 1000])
        kc = rng.choice(forced)  # None: pick_config's choice
        w = make_weights(config, dtype=torch.bfloat16, device="cuda", generator=gen)
        x = make_input(t, config, dtype=torch.bfloat16, device="cuda", generator=gen)
        tw, ti = make_routing(t, config, device="cuda", generator=gen, hot_expert=0 if rng.random() < 0.1 else None)
        out = tilemoe.ops.fused_experts.fused_experts(
            x, w["w13"], w["w2"], tw, ti, config=config, b13=w["b13"], b2=w["b2"], kernel_config=kc,
            deterministic=rng.random() < 0.5,
        )  # fmt: skip
        try:
            assert_close(out, reference_experts(x, w, tw, ti, config), torch.bfloat16)
        except AssertionError as error:
            mismatches.append(f"case {case}: {config} T={t} {kc}: {error}")
    assert not mismatches, f"seed {seed}: {len(mismatches)} / 50 mismatches:\n" + "\n".join(mismatches[:5])


@pytest.mark.gpu
@pytest.mark.parametrize("block_n2", [256, 128])
def test_weights_on_input_large_tiles_bf16(block_n2):
    """Regression (H100, Triton 3.6): with the routing weight scaling the input (Llama 4), GEMM 1 once scaled its A
    tile in registers inside the k loop, and the 128-row TMA tiles gave wrong rows in about 4% of the runs of these
    one-expert shapes (bench/NOTES.md, version 6). Many fresh runs, every one checked."""
    config = MoEConfig(num_experts=1, top_k=1, hidden_size=512, intermediate_size=128, activation="gelu",
                       routing="sigmoid_top1_input_scaled")  # fmt: skip
    kc = KernelConfig(block_m=128, block_n1=128, block_k1=64, num_warps1=8, num_stages1=4, block_n2=block_n2,
                      block_k2=64, num_warps2=8, num_stages2=4, tma=True)  # fmt: skip
    failures = []
    for run in range(12):
        gen = torch.Generator().manual_seed(run)
        t = (1000, 2000)[run % 2]
        w = make_weights(config, dtype=torch.bfloat16, device="cuda", generator=gen)
        x = make_input(t, config, dtype=torch.bfloat16, device="cuda", generator=gen)
        tw, ti = make_routing(t, config, device="cuda", generator=gen)
        tw = tw * torch.rand(tw.shape, generator=gen).to("cuda")  # weights other than 1: the scaling is seen
        out = tilemoe.ops.fused_experts.fused_experts(x, w["w13"], w["w2"], tw, ti, config=config, kernel_config=kc)
        if error := _mismatch(out, x, w, tw, ti, config):
            failures.append(f"run {run} T={t}: {error}")
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "forms",
    [
        dict(sorted_x=True),
        dict(gate_up_dot=True),
        dict(sorted_x=True, gate_up_dot=True, persistent1=True),
        dict(sorted_x=True, gate_up_dot=True, persistent1=True, persistent=True),
        dict(sorted_x=True, gate_up_dot=True, split_tail=True),
        # the persistent loops with half tiles (not flattened): production tiles must still fit shared memory
        dict(
            sorted_x=True, gate_up_dot=True, split_tail=True, persistent1=True, persistent=True, persistent_tails=True
        ),
        dict(gate_up_dot=True, split_tail=True, persistent=True, persistent_tails=True),
    ],
)
@pytest.mark.parametrize(
    "tiles",
    [
        (128, 128, 64, 8, 4, 256, 64, 8, 4),  # the large-T tiles of the H100 table
        (128, 64, 64, 4, 4, 128, 64, 4, 4),  # a [128, 128] gate/up accumulator on 4 warps
        (64, 128, 64, 4, 4, 128, 64, 4, 4),
    ],
)
def test_gemm1_dense_forms_bf16(forms, tiles):
    """GEMM 1's TMA input, gate/up dot and persistent loop with the production tiles, in bf16 (the interpreter's dot
    is wrong for bf16): shapes of real models with 8 experts, one not TMA-readable (H = 200: the plain fallback)."""
    bm, bn1, bk1, w1, s1, bn2, bk2, w2, s2 = tiles
    kc = KernelConfig(block_m=bm, block_n1=bn1, block_k1=bk1, num_warps1=w1, num_stages1=s1, block_n2=bn2,
                      block_k2=bk2, num_warps2=w2, num_stages2=s2, tma=True, **forms)  # fmt: skip
    failures = []
    for hidden, inter, top_k, activation, bias in [
        (2048, 768, 8, "silu", False),  # qwen3-30b-a3b
        (4096, 1408, 2, "silu", False),
        (2880, 2880, 4, "swigluoai", True),  # gpt-oss-120b
        (200, 96, 2, "gelu", False),
    ]:
        config = MoEConfig(num_experts=8, top_k=top_k, hidden_size=hidden, intermediate_size=inter,
                           activation=activation, expert_bias=bias)  # fmt: skip
        for t in (1, 300, 1000):
            gen = torch.Generator().manual_seed(t + hidden)
            w = make_weights(config, dtype=torch.bfloat16, device="cuda", generator=gen)
            x = make_input(t, config, dtype=torch.bfloat16, device="cuda", generator=gen)
            tw, ti = make_routing(t, config, device="cuda", generator=gen)
            out = tilemoe.ops.fused_experts.fused_experts(
                x, w["w13"], w["w2"], tw, ti, config=config, b13=w["b13"], b2=w["b2"], kernel_config=kc
            )
            if error := _mismatch(out, x, w, tw, ti, config):
                failures.append(f"H={hidden} I={inter} T={t}: {error}")
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "deepseek-v2-lite", "gpt-oss-120b", "llama4-scout"])
def test_from_logits_decode_bf16_and_graph(preset, monkeypatch):
    """Routing inside the decode GEMM 1 on the GPU, with a decode entry's tiles: ids exactly the routing kernel's, the
    output the reference's, and the same under CUDA-graph replay with new inputs copied in (at T = 2 and 8 too: the
    kernel's limit raised, as a user may)."""
    import tilemoe.ops.fused_experts as fe
    from tilemoe.ops.fused_experts import fused_experts_from_logits
    from tilemoe.ops.route import route_triton

    monkeypatch.setattr(fe, "DECODE_ROUTE_MAX_TOKENS", 8)

    full = MoEConfig.from_pretrained(preset)
    config = full.replace(num_experts=16, top_k=min(full.top_k, 4), n_group=1, topk_group=1, num_shared_experts=0,
                          shared_intermediate_size=0)  # fmt: skip
    kc = KernelConfig(block_m=16, block_n1=64, block_k1=128, num_stages1=4, block_n2=32, block_k2=256,
                      num_stages2=4, decode=True)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    w = make_weights(config, dtype=torch.bfloat16, device="cuda", generator=gen)
    for t in (1, 2, 8):
        x = make_input(t, config, dtype=torch.bfloat16, device="cuda", generator=gen)
        logits = torch.randn(t, config.num_experts, generator=gen).to("cuda")

        def call(x=x, logits=logits):
            return fused_experts_from_logits(
                x, w["w13"], w["w2"], logits, config=config, b13=w["b13"], b2=w["b2"], kernel_config=kc
            )

        out, weights, ids = call()
        assert tilemoe.ops.fused_experts.decode_route_error is None  # the routing GEMM 1 built and ran
        ref_w, ref_i = route_triton(logits, config)
        assert torch.equal(ids, ref_i) and torch.equal(weights, ref_w)
        assert_close(out, reference_experts(x, w, ref_w, ref_i, config), torch.bfloat16)
        graph, (g_out, _, g_ids) = capture_graph(call)
        x.copy_(make_input(t, config, dtype=torch.bfloat16, device="cuda", generator=gen))
        logits.copy_(torch.randn(t, config.num_experts, generator=gen))
        g_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref_w, ref_i = route_triton(logits, config)
        assert torch.equal(g_ids, ref_i)
        assert_close(g_out, reference_experts(x, w, ref_w, ref_i, config), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kc",
    [
        KernelConfig(block_m=128, block_n1=128, block_k1=64, num_warps1=8, num_stages1=4, block_n2=256, block_k2=64,
                     num_warps2=8, num_stages2=4, tma=True, one_launch=True),
        KernelConfig(block_m=128, block_n1=128, block_k1=64, num_warps1=8, num_stages1=4, block_n2=256, block_k2=64,
                     num_warps2=8, num_stages2=4, tma=True, one_launch=True, split_tail=True, sorted_x=True,
                     gate_up_dot=True),
        KernelConfig(block_m=64, block_n1=128, block_k1=64, num_warps1=4, num_stages1=4, block_n2=128, block_k2=64,
                     num_warps2=4, num_stages2=4, tma=True, one_launch=True),
        # little shared memory (2 stages, pointer loads): compiles even if Triton gave each GEMM's loop its own buffers
        KernelConfig(block_m=64, block_n1=64, block_k1=64, num_warps1=4, num_stages1=2, block_n2=64, block_k2=64,
                     num_warps2=4, num_stages2=2, one_launch=True, split_tail=True),
    ],
)  # fmt: skip
def test_one_launch_bf16_many_runs(kc, monkeypatch):
    """Both GEMMs in one persistent launch on the GPU, where GEMM 2 tiles really wait for GEMM 1 tiles run by other
    SMs: fresh inputs each run, every run against the reference, no ready wait given up, and the same under graph
    replay (the ready words are zeroed inside the graph)."""
    import tilemoe.ops._fused_experts_launch as launch_module

    launched = []
    real = launch_module._launch_one
    monkeypatch.setattr(launch_module, "_launch_one", lambda *a, **k: launched.append(real(*a, **k)) or launched[-1])
    failures = []
    for run, (hidden, inter, top_k, t) in enumerate(
        [(2048, 768, 8, 1000), (2048, 768, 8, 300), (4096, 1408, 2, 1000), (2880, 2880, 4, 700), (200, 96, 2, 1000)] * 2
    ):
        gpt_oss = hidden == 2880
        config = MoEConfig(num_experts=8, top_k=top_k, hidden_size=hidden, intermediate_size=inter,
                           activation="swigluoai" if gpt_oss else "silu", expert_bias=gpt_oss)  # fmt: skip
        gen = torch.Generator().manual_seed(run)
        w = make_weights(config, dtype=torch.bfloat16, device="cuda", generator=gen)
        x = make_input(t, config, dtype=torch.bfloat16, device="cuda", generator=gen)
        tw, ti = make_routing(t, config, device="cuda", generator=gen)
        out = tilemoe.ops.fused_experts.fused_experts(
            x, w["w13"], w["w2"], tw, ti, config=config, b13=w["b13"], b2=w["b2"], kernel_config=kc,
            deterministic=run % 2 == 0,
        )  # fmt: skip
        gave_up = int(launched[-1][1][-1]) != 0
        if error := ("a GEMM 2 tile gave up waiting" if gave_up else _mismatch(out, x, w, tw, ti, config)):
            failures.append(f"run {run} H={hidden} I={inter} T={t}: {error}")
    assert not failures, "\n".join(failures)
    # graph replay with new inputs
    config = MoEConfig(num_experts=8, top_k=8, hidden_size=2048, intermediate_size=768)
    gen = torch.Generator().manual_seed(99)
    w = make_weights(config, dtype=torch.bfloat16, device="cuda", generator=gen)
    x = make_input(512, config, dtype=torch.bfloat16, device="cuda", generator=gen)
    tw, ti = make_routing(512, config, device="cuda", generator=gen)

    graph, out = capture_graph(
        lambda: tilemoe.ops.fused_experts.fused_experts(x, w["w13"], w["w2"], tw, ti, config=config, kernel_config=kc)
    )
    assert_replays_follow_new_inputs(graph, out, x, w, tw, ti, config, gen, replays=3)
