"""``epmoe`` on N spawned gloo processes (CPU) against the unsharded float64 reference.

Each spawn costs a few seconds (every process imports torch), so one spawn runs many cases; the worker
raises on the first mismatch and the parent reports which rank and case failed.
"""

from __future__ import annotations

import sys
import time

import pytest
import torch

from tilemoe.config import MoEConfig
from tilemoe.distributed.spawn import raise_on_failure, spawn_ranks

TIMEOUT_S = 30.0
# forkserver: children fork from a clean server holding torch (spawn re-imports it: ~4 s a process here),
# and inherit none of the OpenMP threads that earlier tests started in this process (fork deadlocked there)
START = "forkserver" if sys.platform.startswith("linux") and not torch.cuda.is_initialized() else "spawn"


def _config(e=6, k=2, h=32, i=24, **kw) -> MoEConfig:
    return MoEConfig(num_experts=e, top_k=k, hidden_size=h, intermediate_size=i, **kw)


def _inputs(config, tokens, rank, seed, hot_expert=None):
    """Weights identical on every rank (same seed); tokens and routing per rank."""
    from tilemoe.testing import make_input, make_routing, make_weights

    weights = make_weights(config, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed * 100 + rank + 1)
    x = make_input(tokens, config, generator=g)
    topk_weights, topk_ids = make_routing(tokens, config, generator=g, hot_expert=hot_expert)
    return weights, x, topk_weights, topk_ids


def _routed_case(rank, world, case):
    """One routed-experts case: the EP layer's output on this rank's tokens vs the float64 reference."""
    import torch.distributed as dist

    from tilemoe.distributed import ExpertParallelMoE, ExpertPlacement, expert_shard
    from tilemoe.impls.reference import reference_experts_fp64
    from tilemoe.testing import assert_close

    config = _config(**case.get("config", {}))
    tokens = case["tokens"][rank]
    weights, x, tw, ti = _inputs(config, tokens, rank, case["seed"], case.get("hot_expert"))
    placement = None
    if "owner" in case:
        placement = ExpertPlacement.from_map(case["owner"], world)
    layer = ExpertParallelMoE(
        config,
        None,
        "epmoe",
        placement=placement,
        max_tokens=case.get("max_tokens"),
        local_impl=case.get("impl", "auto"),
    )
    with torch.no_grad():
        layer.w13.copy_(expert_shard(weights["w13"], layer.local_experts))
        layer.w2.copy_(expert_shard(weights["w2"], layer.local_experts))
    out = layer.forward_routed(x, tw, ti)
    ref = reference_experts_fp64(x, weights["w13"], weights["w2"], tw, ti, config=config)
    assert_close(out, ref, torch.float32, name=f"{case['name']} rank {rank}")
    stats = layer.load_stats()
    all_ids = [None] * world
    dist.all_gather_object(all_ids, ti)
    expected = torch.bincount(torch.cat(all_ids).reshape(-1).long(), minlength=config.num_experts)
    assert stats["per_expert"] == expected.tolist(), (case["name"], stats, expected)
    owner = torch.tensor(layer.placement.owner)
    assert stats["per_rank"] == [int(expected[owner == r].sum()) for r in range(world)]
    assert stats["dropped"] == 0
    return stats


def _dispatch_identity(rank, world):
    """Experts that return their input: combine(dispatch(x)) must give x * sum_k w = x exactly per row set."""
    from tilemoe.distributed import EPDispatcher, ExpertPlacement

    config = _config(e=5, k=3)
    _, x, tw, ti = _inputs(config, 11 + rank, rank, seed=7)
    placement = ExpertPlacement.contiguous(5, world)
    for capacity in (None, 3 * (11 + world)):
        d = EPDispatcher(placement, None, capacity=capacity)
        recv_x, meta, handle = d.dispatch(x, ti, tw)
        valid = meta.valid
        mine = set(placement.experts_of(rank))
        got = {placement.experts_of(rank)[int(i)] for i in meta.local_ids[valid]}
        assert got <= mine, (got, mine)
        out = d.combine(recv_x.clone(), handle)  # apply_weights: sum_k w[t, k] * x[t] = x[t]
        torch.testing.assert_close(out, x * tw.sum(1, keepdim=True), rtol=1e-6, atol=1e-6)
    return True


def _module_cases(rank, world):
    """apply_expert_parallel of a tilemoe.MoE (router + shared expert) vs the module itself; and impl="epmoe"."""
    from tilemoe import MoE, moe_forward
    from tilemoe.distributed import apply_expert_parallel, ep_context
    from tilemoe.testing import assert_close, make_routing

    torch.manual_seed(3)  # identical weights on every rank
    config = _config(e=8, k=2, num_shared_experts=1, shared_intermediate_size=16, shared_expert_gate=True)
    full = MoE(config, dtype=torch.float32, impl="reference")
    layer = apply_expert_parallel(full, None, "epmoe")
    g = torch.Generator().manual_seed(50 + rank)
    x = torch.randn(2, 5 + rank, config.hidden_size, generator=g)
    assert_close(layer(x), full(x), torch.float32, name=f"module rank {rank}")

    tw, ti = make_routing(9, config, generator=g)
    xt = x.reshape(-1, config.hidden_size)[:9]
    with ep_context(None):
        out = moe_forward(xt, full.w13, full.w2, topk_weights=tw, topk_ids=ti, config=config, impl="epmoe")
    ref = moe_forward(xt, full.w13, full.w2, topk_weights=tw, topk_ids=ti, config=config, impl="reference")
    assert_close(out, ref, torch.float32, name=f"impl epmoe rank {rank}")
    return True


def _tp_case(rank, world):
    """EP + TP (tp 2): apply_expert_parallel of a MoE with expert biases and a shared expert vs the module."""
    from tilemoe import MoE
    from tilemoe.distributed import apply_expert_parallel
    from tilemoe.testing import assert_close

    torch.manual_seed(11)
    config = _config(e=6, k=2, i=24, expert_bias=True, num_shared_experts=1, shared_intermediate_size=8)
    full = MoE(config, dtype=torch.float32, impl="reference")
    layer = apply_expert_parallel(full, None, "epmoe", tp_size=2)
    assert layer.w2.shape[-1] == 12 and layer.ep_size == world // 2
    x = torch.randn(6 + 3 * rank, config.hidden_size, generator=torch.Generator().manual_seed(rank))
    if rank == 1:
        x = x[:0]  # T = 0 on one rank of a TP group
    assert_close(layer(x), full(x), torch.float32, name=f"ep+tp rank {rank}")
    stats = layer.load_stats()
    assert sum(stats["per_expert"]) == config.top_k * sum(6 + 3 * r for r in range(world) if r != 1), stats
    return True


def _run_all(rank, world, cases):
    results = [_routed_case(rank, world, case) for case in cases]
    _dispatch_identity(rank, world)
    _module_cases(rank, world)
    if world in (2, 4):  # ep 1 x tp 2, ep 2 x tp 2
        _tp_case(rank, world)
    return results


def _cases(world):
    t = [16, 7, 12, 3][:world]
    cases = [
        # balanced-ish random routing, T differs per rank
        dict(name="random", tokens=t, seed=1),
        # every token's slot 0 goes to the last expert: one rank gets all the first choices
        dict(name="hot-expert", tokens=[10] * world, seed=2, hot_expert=5),
        # T = 0 on rank 0
        dict(name="t0", tokens=[0] + t[1:], seed=3),
        # fixed capacity (padded, no host sync), dropless capacity max_tokens * K
        dict(name="capacity", tokens=t, seed=4, max_tokens=16),
        # E not a multiple of ep: contiguous uneven
        dict(name="uneven", tokens=t, seed=5, config=dict(e=7, k=3)),
        # explicit, interleaved placement map
        dict(name="map", tokens=t, seed=6, owner=[(e * 3 + 1) % world for e in range(6)]),
    ]
    return cases


@pytest.mark.parametrize("world", [1, 2, 4])
def test_epmoe_matches_reference(world):
    args = (_cases(world),)
    outcomes = spawn_ranks(_run_all, world, args, timeout_s=TIMEOUT_S, join_timeout_s=120, start_method=START)
    raise_on_failure(outcomes)


def _mismatch(rank, world):
    from tilemoe.distributed import ExpertParallelMoE

    config = _config(h=32 if rank == 0 else 48)
    ExpertParallelMoE(config, None, "epmoe")
    return "no error"


def test_mismatched_config_names_field_and_ranks():
    outcomes = spawn_ranks(_mismatch, 2, timeout_s=TIMEOUT_S, join_timeout_s=90, start_method=START)
    for o in outcomes:
        assert not o.ok, f"rank {o.rank} did not raise"
        assert "ValueError" in o.error and "config.hidden_size" in o.error, o.error
        assert "32 on ranks [0]" in o.error and "48 on ranks [1]" in o.error, o.error


def _dies(rank, world):
    import os

    from tilemoe.distributed import ExpertParallelMoE

    config = _config()
    layer = ExpertParallelMoE(config, None, "epmoe")
    if rank == 1:
        os._exit(3)  # a rank that dies without a word
    x = torch.randn(8, config.hidden_size)
    tw, ti = torch.full((8, 2), 0.5), torch.tensor([[0, 5]] * 8, dtype=torch.int32)
    start = time.monotonic()
    try:
        layer.forward_routed(x, tw, ti)
    except Exception as error:  # noqa: BLE001
        return f"raised after {time.monotonic() - start:.1f}s: {type(error).__name__}: {error}"
    return "no error"


def test_dead_rank_ends_in_error_not_hang():
    start = time.monotonic()
    outcomes = spawn_ranks(_dies, 2, timeout_s=5.0, join_timeout_s=60, start_method=START)
    elapsed = time.monotonic() - start
    assert not outcomes[1].ok and "exited with code 3" in outcomes[1].error, outcomes[1]
    # rank 0 either returns the error it caught or dies of it; it never hangs
    r0 = outcomes[0]
    assert (r0.ok and str(r0.value).startswith("raised after")) or (not r0.ok and "hang" not in r0.error), r0
    assert elapsed < 60, elapsed


def test_placement_contiguous_uneven_and_map():
    from tilemoe.distributed import ExpertPlacement

    p = ExpertPlacement.contiguous(10, 4)
    assert [p.experts_of(r) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert p.local_index_tensor().tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 0, 1]
    m = ExpertPlacement.from_map(torch.tensor([1, 0, 1, 1]), 2)
    assert m.experts_of(0) == [1] and m.experts_of(1) == [0, 2, 3] and m.max_local == 3
    assert ExpertPlacement.contiguous(2, 4).experts_of(3) == []
    with pytest.raises(ValueError, match=r"owner\[2\] = 5"):
        ExpertPlacement.from_map([0, 1, 5], 2)
    with pytest.raises(ValueError, match="ep_size"):
        ExpertPlacement.contiguous(4, 0)


def _stalls(rank, world):
    from tilemoe.distributed import ExpertParallelMoE

    config = _config()
    layer = ExpertParallelMoE(config, None, "epmoe")
    if rank == 1:
        time.sleep(60)  # alive but silent: never joins the forward
        return "slept"
    x = torch.randn(8, config.hidden_size)
    tw, ti = torch.full((8, 2), 0.5), torch.tensor([[0, 5]] * 8, dtype=torch.int32)
    start = time.monotonic()
    try:
        layer.forward_routed(x, tw, ti)
    except Exception as error:  # noqa: BLE001
        return (time.monotonic() - start, f"{type(error).__name__}: {error}")
    return "no error"


def test_silent_rank_ends_in_timeout_error():
    outcomes = spawn_ranks(_stalls, 2, timeout_s=3.0, join_timeout_s=8, start_method=START)
    r0 = outcomes[0]
    assert r0.ok and isinstance(r0.value, tuple), r0
    waited, message = r0.value
    assert 2.0 < waited < 7.0, r0.value  # the group's 3 s timeout, not a hang
    assert "hang" in outcomes[1].error  # the silent rank is the one the parent had to terminate
