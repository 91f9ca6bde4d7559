"""``epmoe`` over NCCL on 2 GPUs in bf16 against the float64 reference; CUDA-graph replay 10,000 times.

Run on the device (nvidia-h200-x2) with ``pytest -m gpu tests/distributed``; skipped with fewer than 2 GPUs.
Keep NCCL_NVLS_ENABLE=0 set there (bench/gpu_check_ep.sh does).
"""

from __future__ import annotations

import pytest
import torch

from tilemoe.distributed.spawn import raise_on_failure, spawn_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _setup(rank, tokens, seed, config, hot_expert=None):
    from tilemoe.testing import make_input, make_routing, make_weights

    device = torch.device("cuda", torch.cuda.current_device())
    weights = make_weights(config, dtype=torch.bfloat16, device=device, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed * 10 + rank)
    x = make_input(tokens, config, dtype=torch.bfloat16, device=device, generator=g)
    tw, ti = make_routing(tokens, config, device=device, generator=g, hot_expert=hot_expert)
    return device, weights, x, tw, ti


def _layer(config, weights, device, backend="epmoe", **kw):
    from tilemoe.distributed import ExpertParallelMoE, expert_shard

    layer = ExpertParallelMoE(config, None, backend, dtype=torch.bfloat16, device=device, **kw)
    with torch.no_grad():
        layer.w13.copy_(expert_shard(weights["w13"], layer.local_experts))
        layer.w2.copy_(expert_shard(weights["w2"], layer.local_experts))
    return layer


def _nccl_cases(rank, world):
    from tilemoe import MoEConfig
    from tilemoe.impls.reference import reference_experts_fp64
    from tilemoe.testing import assert_close

    config = MoEConfig(num_experts=8, top_k=2, hidden_size=256, intermediate_size=128)
    done = []
    for local_impl in ("torch_grouped_mm", "auto"):
        for name, tokens, hot, kw in (
            ("random", [96, 33], None, {}),  # T differs per rank
            ("hot-expert", [64, 64], 7, {}),  # every first choice on rank 1
            ("t0", [0, 40], None, {}),  # T = 0 on rank 0
            ("capacity", [96, 33], None, {"max_tokens": 96}),  # padded, no host sync
        ):
            device, weights, x, tw, ti = _setup(rank, tokens[rank], 1 + len(done), config, hot)
            layer = _layer(config, weights, device, local_impl=local_impl, **kw)
            out = layer.forward_routed(x, tw, ti)
            ref = reference_experts_fp64(x, weights["w13"], weights["w2"], tw, ti, config=config)
            assert_close(out, ref, torch.bfloat16, name=f"{name} {layer.local_impl} rank {rank}")
            assert layer.load_stats()["dropped"] == 0
            done.append((name, layer.local_impl))
    return done


def test_epmoe_nccl_bf16_matches_reference():
    raise_on_failure(spawn_ranks(_nccl_cases, 2, backend="nccl", timeout_s=120, join_timeout_s=400, env=ENV))


def _graph_10k(rank, world, replays):
    from tilemoe import MoEConfig
    from tilemoe.impls.reference import reference_experts_fp64
    from tilemoe.testing import assert_close, make_routing

    config = MoEConfig(num_experts=8, top_k=2, hidden_size=256, intermediate_size=128)
    tokens = 64
    device, weights, x, tw, ti = _setup(rank, tokens, 5, config)
    layer = _layer(config, weights, device, max_tokens=tokens)
    static = {"x": x.clone(), "tw": tw.clone(), "ti": ti.clone()}

    def step():
        return layer.forward_routed(static["x"], static["tw"], static["ti"])

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # NCCL's watchdog thread runs
        out = step()
    graph.replay()
    ref = reference_experts_fp64(x, weights["w13"], weights["w2"], tw, ti, config=config)
    assert_close(out, ref, torch.bfloat16, name=f"graph replay rank {rank}")

    # new inputs in the captured buffers, then many replays: same answer, no growth in memory
    g = torch.Generator().manual_seed(99 + rank)
    x2 = torch.randn(tokens, config.hidden_size, generator=g).to(device, torch.bfloat16)
    tw2, ti2 = make_routing(tokens, config, device=device, generator=g, hot_expert=rank)
    static["x"].copy_(x2)
    static["tw"].copy_(tw2)
    static["ti"].copy_(ti2)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    assert after <= before, f"memory grew over {replays} replays: {before} -> {after} bytes"
    ref2 = reference_experts_fp64(x2, weights["w13"], weights["w2"], tw2, ti2, config=config)
    assert_close(out, ref2, torch.bfloat16, name=f"after {replays} replays rank {rank}")
    return replays


def test_epmoe_cuda_graph_10k_replays_no_hang_no_leak():
    outcomes = spawn_ranks(_graph_10k, 2, (10_000,), backend="nccl", timeout_s=120, join_timeout_s=400, env=ENV)
    assert raise_on_failure(outcomes) == [10_000, 10_000]


def _module(rank, world):
    from tilemoe import MoE, MoEConfig
    from tilemoe.distributed import apply_expert_parallel
    from tilemoe.testing import assert_close

    torch.manual_seed(0)
    config = MoEConfig(num_experts=16, top_k=4, hidden_size=512, intermediate_size=256)
    full = MoE(config, dtype=torch.bfloat16, device="cuda", impl="reference")
    layer = apply_expert_parallel(full, None, "epmoe")
    x = torch.randn(3, 40 + rank, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    assert_close(layer(x), full(x), torch.bfloat16, name=f"apply_expert_parallel rank {rank}")
    return layer.local_impl


def test_apply_expert_parallel_nccl_bf16():
    raise_on_failure(spawn_ranks(_module, 2, backend="nccl", timeout_s=120, join_timeout_s=300, env=ENV))


def _fused(rank, world):
    """backend="fused" (symmetric memory, device-initiated puts) vs the reference; T = 0 on one rank; then
    captured in a CUDA graph and replayed with new inputs."""
    from tilemoe import MoEConfig
    from tilemoe.impls.reference import reference_experts_fp64
    from tilemoe.testing import assert_close

    config = MoEConfig(num_experts=8, top_k=2, hidden_size=256, intermediate_size=128)
    device, weights, x, tw, ti = _setup(rank, [96, 33][rank], 21, config)
    layer = _layer(config, weights, device, max_tokens=96, backend="fused")
    for step, (xs, tws, tis) in enumerate([(x, tw, ti), (x[: 0 if rank == 0 else 33], tw[:0 if rank == 0 else 33],
                                                          ti[: 0 if rank == 0 else 33])]):  # fmt: skip
        out = layer.forward_routed(xs, tws, tis)
        ref = reference_experts_fp64(xs, weights["w13"], weights["w2"], tws, tis, config=config)
        assert_close(out, ref, torch.bfloat16, name=f"fused step {step} rank {rank}")
    static = [x.clone(), tw.clone(), ti.clone()]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer.forward_routed(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = layer.forward_routed(*static)
    _, _, x2, tw2, ti2 = _setup(rank, [96, 33][rank], 22, config)
    static[0].copy_(x2)
    static[1].copy_(tw2)
    static[2].copy_(ti2)
    for _ in range(100):
        graph.replay()
    torch.cuda.synchronize()
    ref2 = reference_experts_fp64(x2, weights["w13"], weights["w2"], tw2, ti2, config=config)
    assert_close(out, ref2, torch.bfloat16, name=f"fused graph rank {rank}")
    return True


def test_fused_backend_symmetric_memory():
    raise_on_failure(spawn_ranks(_fused, 2, backend="nccl", timeout_s=120, join_timeout_s=300, env=ENV))
