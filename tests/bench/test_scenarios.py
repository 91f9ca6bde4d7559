"""Routing scenarios, trace replay, metrics and the timing helper of the bench."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tilemoe.bench.metrics import layer_bytes, layer_flops, load_stats, roofline_seconds
from tilemoe.bench.scenarios import expert_loads, load_trace, make_routing_for
from tilemoe.bench.timing import TimingStats, measure
from tilemoe.config import MoEConfig
from tilemoe.routing import route, router_logits


def _config(e=60, k=4):
    return MoEConfig(num_experts=e, top_k=k, hidden_size=16, intermediate_size=8)


def _distinct_per_token(ids):
    return ids.numel() == 0 or bool((ids.sort(dim=1).values.diff(dim=1) > 0).all())


@pytest.mark.parametrize("scenario", ["random", "balanced", "imbalanced", "zipf"])
@pytest.mark.parametrize("tokens", [0, 1, 7, 300])
def test_scenarios_shape_range_distinct(scenario, tokens):
    config = _config()
    w, ids = make_routing_for(scenario, tokens, config, generator=torch.Generator().manual_seed(1))
    assert ids.shape == (tokens, 4) and ids.dtype == torch.int32 and w.shape == (tokens, 4)
    assert w.dtype == torch.float32
    if tokens:
        assert int(ids.min()) >= 0 and int(ids.max()) < 60
        assert torch.allclose(w.sum(-1), torch.ones(tokens))
    assert _distinct_per_token(ids)


@pytest.mark.parametrize("tokens,e,k", [(300, 60, 4), (1000, 128, 8), (61, 7, 3)])
def test_balanced_is_exact(tokens, e, k):
    ids = make_routing_for("balanced", tokens, _config(e, k), generator=torch.Generator().manual_seed(0))[1]
    loads = expert_loads(ids, e)
    assert int(loads.sum()) == tokens * k
    assert int(loads.max()) - int(loads.min()) <= 1


@pytest.mark.parametrize("factor", [1.5, 3.0, 6.0])
@pytest.mark.parametrize("tokens,e,k", [(256, 60, 4), (1024, 128, 8)])
def test_imbalanced_reaches_factor_within_10_percent(tokens, e, k, factor):
    ids = make_routing_for(
        "imbalanced", tokens, _config(e, k), generator=torch.Generator().manual_seed(3), imbalance_factor=factor
    )[1]
    stats = load_stats(ids, e)
    assert abs(stats.max_imbalance - factor) <= 0.1 * factor, stats
    assert _distinct_per_token(ids)


@pytest.mark.parametrize("scenario", ["balanced", "imbalanced"])
def test_counted_scenarios_share_experts_at_random(scenario):
    # top-8 of 128 experts: a router gives nearly every token its own expert set; the runs the counts are written in
    # gave 16 (balanced) or 128 (imbalanced) sets over 4096 tokens, each x row's K uses side by side in a kernel
    config = _config(128, 8)
    ids = make_routing_for(scenario, 4096, config, generator=torch.Generator().manual_seed(2))[1]
    assert torch.unique(ids.sort(dim=1).values, dim=0).shape[0] == 4096
    assert _distinct_per_token(ids)


def test_balanced_pairs_are_uniform():
    # top-2 of 8 experts, balanced: each of the 28 pairs of experts holds about 2048 / 28 = 73 tokens (the runs gave
    # 4 pairs); 0.6-1.4x of that is more than 3 standard deviations of a random pairing either way
    config = _config(8, 2)
    ids = make_routing_for("balanced", 2048, config, generator=torch.Generator().manual_seed(4))[1].long()
    pairs = ids.sort(dim=1).values
    counts = torch.bincount(pairs[:, 0] * 8 + pairs[:, 1], minlength=64).view(8, 8)
    upper = counts[torch.triu_indices(8, 8, offset=1).unbind()]
    assert upper.numel() == 28 and int(upper.sum()) == 2048
    assert int(upper.min()) >= 0.6 * 2048 / 28 and int(upper.max()) <= 1.4 * 2048 / 28, upper.tolist()


def test_mix_tokens_keeps_counts_and_distinct_rows():
    from tilemoe.bench.scenarios import _mix_tokens

    ids = torch.tensor([[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5], [0, 3, 6]])
    mixed = _mix_tokens(ids, 50, torch.Generator().manual_seed(0))
    assert torch.equal(torch.bincount(mixed.flatten()), torch.bincount(ids.flatten()))
    assert _distinct_per_token(mixed) and not torch.equal(mixed, ids)
    # every token holds every expert: no swap can be made, and none is
    full = torch.arange(4).repeat(6, 1)
    assert torch.equal(_mix_tokens(full, 20, torch.Generator().manual_seed(0)), full)


def test_random_uses_the_config_routing():
    config = _config()
    x = torch.randn(9, 16)
    gen = torch.Generator().manual_seed(5)
    w, ids = make_routing_for("random", 9, config, generator=gen, x=x)
    weight = torch.randn(60, 16, generator=torch.Generator().manual_seed(5)) * 16**-0.5
    w_ref, ids_ref = route(router_logits(x, weight), config)
    assert torch.equal(ids, ids_ref) and torch.allclose(w, w_ref)


def test_zipf_is_skewed():
    ids = make_routing_for("zipf", 2000, _config(), generator=torch.Generator().manual_seed(0), zipf_alpha=1.5)[1]
    assert load_stats(ids, 60).max_imbalance > 5


@pytest.mark.parametrize("suffix", [".json", ".pt", ".npy"])
def test_trace_replay(tmp_path, suffix):
    ids = torch.tensor([[0, 1], [2, 3], [4, 0]])
    path = tmp_path / f"trace{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"topk_ids": ids.tolist(), "topk_weights": [[0.5, 0.5]] * 3}))
    elif suffix == ".pt":
        torch.save(ids, path)
    else:
        np.save(path, ids.numpy())
    trace = load_trace(path)
    config = _config(e=5, k=2)
    w, got = make_routing_for("trace", 7, config, generator=torch.Generator(), trace=trace)
    assert got.tolist() == (ids.repeat(3, 1)[:7]).tolist()  # repeated to 7 tokens
    assert torch.allclose(w, torch.full((7, 2), 0.5))
    with pytest.raises(ValueError, match="expected K=3"):
        make_routing_for("trace", 7, _config(e=5, k=3), generator=torch.Generator(), trace=trace)


def test_trace_bad_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("0 1")
    with pytest.raises(ValueError, match="routing_trace"):
        load_trace(path)


def test_metrics():
    config = MoEConfig(num_experts=4, top_k=2, hidden_size=8, intermediate_size=6)
    # 2 FLOPs per MAC, both matmuls (w13: 2I x H, w2: H x I) for each of T*K pairs
    assert layer_flops(config, 3) == 2 * 3 * 2 * (8 * 12 + 6 * 8)
    ids = torch.tensor([[0, 1], [0, 1], [0, 1]])
    stats = load_stats(ids, 4)
    assert (stats.max_load, stats.min_load, stats.avg_load, stats.experts_hit) == (3, 0, 1.5, 2)
    assert stats.max_imbalance == 2.0
    nbytes = layer_bytes(config, 3, stats.experts_hit, 2)
    assert nbytes == 2 * (2 * (8 * 12 + 6 * 8) + 2 * 3 * 8) + 3 * 2 * 8
    assert roofline_seconds(1e12, 1e9, 1e12, 1e12) == 1.0
    assert roofline_seconds(1e9, 1e12, 1e12, 1e12) == 1.0


def test_measure_and_stats():
    calls = []
    stats = measure(lambda inp: calls.append(inp), [1, 2, 3], warmup=2, iters=5, device="cpu")
    assert len(stats.times_ms) == 5 and calls == [1, 2, 3, 1, 2, 3, 1]  # inputs rotate
    s = TimingStats(times_ms=[1.0, 2.0, 3.0, 4.0, 100.0])
    assert s.p50 == 3.0 and s.mean == 22.0 and s.p50 <= s.p95 <= s.p99 <= 100.0


def test_roofline_percent_against_mean_and_median():
    from tilemoe.bench.runner import _fill_timing

    row = {"roofline_ms": 1.5, "flops": 3e9, "bytes": 6e6, "note": ""}
    _fill_timing(row, TimingStats(times_ms=[1.0, 2.0, 3.0, 4.0, 100.0]), tokens=8)  # one slow call: mean 22, p50 3
    assert row["pct_roofline"] == pytest.approx(100.0 * 1.5 / 22.0)
    assert row["pct_roofline_p50"] == pytest.approx(50.0)
    assert row["throughput_tok_per_sec"] == pytest.approx(8 / 22e-3)
