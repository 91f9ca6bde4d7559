"""``backend="fused"`` on 2 GPUs (bf16, the default tile shapes) against the float64 reference: flag-waiting
GEMMs overlapped with the puts, many forwards on the same buffers, CUDA graphs (10,000 replays), the NVSHMEM
symmetric-memory backend, and a lost peer that must end in an error, not a hang.

Run on the device (nvidia-h200-x2) with ``pytest -m gpu tests/distributed``; skipped with fewer than 2 GPUs.
"""

from __future__ import annotations

import time

import pytest
import torch

from tilemoe.distributed.spawn import raise_on_failure, spawn_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
NVSHMEM_ENV = {
    **ENV,
    "NVSHMEM_REMOTE_TRANSPORT": "none",
    "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo",
    "NVSHMEM_SYMMETRIC_SIZE": "4G",
}


def _layer(config, weights, device, max_tokens, **kw):
    from tilemoe.distributed import ExpertParallelMoE, expert_shard

    layer = ExpertParallelMoE(config, None, "fused", dtype=torch.bfloat16, device=device, max_tokens=max_tokens, **kw)
    with torch.no_grad():
        layer.w13.copy_(expert_shard(weights["w13"], layer.local_experts))
        layer.w2.copy_(expert_shard(weights["w2"], layer.local_experts))
    return layer


def _cases(rank, world, symm_mem_backend):
    """Several forwards on one layer (epochs grow, buffers reused): random with T differing per rank,
    every first choice on one rank's expert, T = 0 on rank 0; then an uneven explicit placement."""
    import torch.distributed._symmetric_memory as symm_mem

    from tilemoe import MoEConfig
    from tilemoe.distributed import ExpertPlacement
    from tilemoe.impls.reference import reference_experts_fp64
    from tilemoe.testing import assert_close, make_input, make_routing, make_weights

    if symm_mem_backend == "nvshmem" and not (
        hasattr(symm_mem, "is_nvshmem_available") and symm_mem.is_nvshmem_available()
    ):
        return "no-nvshmem"
    device = torch.device("cuda", torch.cuda.current_device())
    config = MoEConfig(num_experts=8, top_k=2, hidden_size=512, intermediate_size=384)
    weights = make_weights(config, dtype=torch.bfloat16, device=device, generator=torch.Generator().manual_seed(3))
    done = []
    for placement in (None, ExpertPlacement.from_map([1, 0, 1, 1, 1, 1, 1, 0], 2)):
        kw = {"placement": placement} if placement is not None else {}
        layer = _layer(config, weights, device, 700, symm_mem_backend=symm_mem_backend, **kw)
        for name, tokens, hot in (("random", [700, 257], None), ("hot", [512, 512], 6), ("t0", [0, 300], None)):
            g = torch.Generator().manual_seed(len(done) * 10 + rank)
            x = make_input(tokens[rank], config, dtype=torch.bfloat16, device=device, generator=g)
            tw, ti = make_routing(tokens[rank], config, device=device, generator=g, hot_expert=hot)
            out = layer.forward_routed(x, tw, ti)
            ref = reference_experts_fp64(x, weights["w13"], weights["w2"], tw, ti, config=config)
            assert_close(out, ref, torch.bfloat16, name=f"fused/{symm_mem_backend} {name} rank {rank}")
            done.append(name)
        layer.fused.check()
    return done


def test_fused_cuda_symm_mem_bf16_matches_reference():
    outcomes = spawn_ranks(_cases, 2, ("cuda",), backend="nccl", timeout_s=120, join_timeout_s=300, env=ENV)
    assert raise_on_failure(outcomes)[0] == ["random", "hot", "t0"] * 2


def test_fused_nvshmem_bf16_matches_reference():
    outcomes = spawn_ranks(_cases, 2, ("nvshmem",), backend="nccl", timeout_s=120, join_timeout_s=300, env=NVSHMEM_ENV)
    values = raise_on_failure(outcomes)
    if values[0] == "no-nvshmem":
        pytest.skip("this torch build has no NVSHMEM")
    assert values[0] == ["random", "hot", "t0"] * 2


def _graph_10k(rank, world, replays):
    from tilemoe import MoEConfig
    from tilemoe.impls.reference import reference_experts_fp64
    from tilemoe.testing import assert_close, make_input, make_routing, make_weights

    device = torch.device("cuda", torch.cuda.current_device())
    config = MoEConfig(num_experts=8, top_k=2, hidden_size=256, intermediate_size=256)
    weights = make_weights(config, dtype=torch.bfloat16, device=device, generator=torch.Generator().manual_seed(4))
    tokens = 128
    layer = _layer(config, weights, device, tokens)
    g = torch.Generator().manual_seed(50 + rank)
    x = make_input(tokens, config, dtype=torch.bfloat16, device=device, generator=g)
    tw, ti = make_routing(tokens, config, device=device, generator=g)
    static = [x.clone(), tw.clone(), ti.clone()]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            layer.forward_routed(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # NCCL's watchdog thread runs
        out = layer.forward_routed(*static)
    x2 = make_input(tokens, config, dtype=torch.bfloat16, device=device, generator=g)
    tw2, ti2 = make_routing(tokens, config, device=device, generator=g, hot_expert=rank)
    for dst, src in zip(static, (x2, tw2, ti2)):
        dst.copy_(src)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    start = time.monotonic()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    seconds = time.monotonic() - start
    assert torch.cuda.memory_allocated() <= before, "memory grew over the replays"
    layer.fused.check()
    assert int(layer.fused.state.epoch.item()) == 3 + replays  # warm-up runs and replays (capture runs nothing)
    ref = reference_experts_fp64(x2, weights["w13"], weights["w2"], tw2, ti2, config=config)
    assert_close(out, ref, torch.bfloat16, name=f"fused graph after {replays} replays rank {rank}")
    return seconds


def test_fused_cuda_graph_10k_replays_no_hang_no_leak():
    outcomes = spawn_ranks(_graph_10k, 2, (10_000,), backend="nccl", timeout_s=120, join_timeout_s=300, env=ENV)
    raise_on_failure(outcomes)


def _lost_peer(rank, world):
    """Rank 1 never joins the forward: rank 0's waits give up after ~0.2 s and check() names the cause."""
    import torch.distributed as dist

    from tilemoe import MoEConfig
    from tilemoe.testing import make_input, make_routing, make_weights

    device = torch.device("cuda", torch.cuda.current_device())
    config = MoEConfig(num_experts=4, top_k=2, hidden_size=256, intermediate_size=256)
    weights = make_weights(config, dtype=torch.bfloat16, device=device, generator=torch.Generator().manual_seed(5))
    layer = _layer(config, weights, device, 64)
    layer.fused.max_spin = 200_000
    message = ""
    if rank == 0:
        g = torch.Generator().manual_seed(6)
        x = make_input(64, config, dtype=torch.bfloat16, device=device, generator=g)
        tw, ti = make_routing(64, config, device=device, generator=g)
        start = time.monotonic()
        layer.forward_routed(x, tw, ti)
        with pytest.raises(RuntimeError, match="waited too long") as info:
            layer.fused.check()
        assert time.monotonic() - start < 60
        message = str(info.value)
    dist.barrier()
    return message


def test_fused_lost_peer_ends_in_error():
    outcomes = spawn_ranks(_lost_peer, 2, backend="nccl", timeout_s=120, join_timeout_s=200, env=ENV)
    assert "dispatch" in raise_on_failure(outcomes)[0]
