"""``tilemoe bench --timed-scope``: layer scope (router GEMM + routing + experts) against experts scope, on CPU."""

from __future__ import annotations

import argparse
import csv

import pytest
import torch

import tilemoe.bench.layer as layer
import tilemoe.bench.runner as runner
from tilemoe.bench.cli import build_settings
from tilemoe.bench.metrics import layer_bytes, layer_flops
from tilemoe.bench.roofline import Roofline
from tilemoe.cli import main
from tilemoe.config import MoEConfig
from tilemoe.impls import register_impl, unregister_impl
from tilemoe.impls.grouped import grouped_forward
from tilemoe.routing import route

TINY = ["--manual-config", "--num-experts", "6", "--num-experts-per-tok", "2", "--hidden-size", "16"]
TINY += ["--intermediate-size", "8", "--warmup-iters", "0", "--benchmark-iters", "1", "--rounds", "1"]
ROOFLINE = Roofline(device_name="cpu", dtype="float32", copy_gbps=10.0, matmul_tflops=0.1)  # not measured here


@pytest.fixture(autouse=True)
def _cache_dir_one_thread(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEMOE_CACHE_DIR", str(tmp_path / "cache"))
    # one thread: on a busy 2-core CI machine an OpenMP index_add_ of one row took 20 ms with 2 threads, 7 us with 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def spy():
    """An implementation that records what it was given and computes the experts with ``grouped``."""
    calls = []

    @register_impl("spy_for_test", description="records its inputs, then runs grouped")
    def _spy(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None):
        calls.append((x.clone(), topk_weights.clone(), topk_ids.clone()))
        return grouped_forward(x, w13, w2, topk_weights, topk_ids, config=config, b13=b13, b2=b2)

    yield calls
    unregister_impl("spy_for_test")


@pytest.fixture
def scenario_log(monkeypatch):
    """The (x, topk_weights, topk_ids) each scenario produced, in order."""
    made = []
    original = runner.make_routing_for

    def recording(*args, **kwargs):
        weights, ids = original(*args, **kwargs)
        made.append((kwargs["x"], weights, ids))
        return weights, ids

    monkeypatch.setattr(runner, "make_routing_for", recording)
    return made


def test_layer_scope_calls_from_logits(scenario_log):
    """An implementation that routes inside its kernels (``from_logits``) is timed through it in the layer scope:
    given the router logits, whose routing gives the scenario's ids; its routed-input ``fn`` only in the experts
    scope."""
    calls = {"from_logits": [], "fn": []}

    def from_logits(x, w13, w2, router_logits, *, config, correction_bias=None, b13=None, b2=None):
        calls["from_logits"].append(router_logits.clone())
        weights, ids = route(router_logits, config, correction_bias=correction_bias)
        return grouped_forward(x, w13, w2, weights, ids, config=config, b13=b13, b2=b2)

    @register_impl("routes_itself_for_test", description="routes from the logits", from_logits=from_logits)
    def _fn(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None):
        calls["fn"].append(topk_ids.clone())
        return grouped_forward(x, w13, w2, topk_weights, topk_ids, config=config, b13=b13, b2=b2)

    try:
        config = MoEConfig(num_experts=6, top_k=2, hidden_size=16, intermediate_size=8)
        for scope in ("layer", "experts"):
            s = runner.BenchSettings(
                config=config, impls=["routes_itself_for_test"], num_tokens=[24], scenarios=["imbalanced"],
                device=torch.device("cpu"), warmup=0, iters=1, rounds=1, timed_scope=scope,
            )  # fmt: skip
            (row,) = runner.run_case(s, "imbalanced", 24, runner.make_bench_weights(s), ROOFLINE)
            assert row["status"] == "OK", row
            used, unused = ("from_logits", "fn") if scope == "layer" else ("fn", "from_logits")
            assert calls[used] and not calls[unused], scope
            if scope == "layer":
                scenario_ids = scenario_log[-1][2]
                assert calls["from_logits"][0].shape == (24, 6)
                assert torch.equal(route(calls["from_logits"][0], config)[1].long(), scenario_ids.long())
            calls = {"from_logits": [], "fn": []}
    finally:
        unregister_impl("routes_itself_for_test")


def _run(config, scenario, scope, tokens=24):
    s = runner.BenchSettings(
        config=config, impls=["spy_for_test"], num_tokens=[tokens], scenarios=[scenario], device=torch.device("cpu"),
        warmup=0, iters=1, rounds=1, timed_scope=scope,
    )  # fmt: skip
    weights = runner.make_bench_weights(s)
    (row,) = runner.run_case(s, scenario, tokens, weights, ROOFLINE)
    return row, weights


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_csv_column_and_layer_counts_the_router(tmp_path):
    rows = {}
    for scope in ("layer", "experts"):
        base = tmp_path / scope
        args = ["bench", *TINY, "--impl", "grouped", "--num-tokens", "5", "--scenarios", "random"]
        assert main([*args, "--timed-scope", scope, "--output-file", str(base), "--output-format", "csv"]) == 0
        (rows[scope],) = _read_csv(tmp_path / f"{scope}.csv")
    default = tmp_path / "default"
    assert main(["bench", *TINY, "--impl", "grouped", "--num-tokens", "5", "--output-file", str(default)]) == 0
    assert {r["timed_scope"] for r in _read_csv(tmp_path / "default.csv")} == {"layer"}  # the default
    lay, exp = rows["layer"], rows["experts"]
    assert (lay["timed_scope"], exp["timed_scope"]) == ("layer", "experts")
    assert lay["status"] == exp["status"] == "OK"
    t, h, e = 5, 16, 6
    assert int(lay["flops"]) - int(exp["flops"]) == 2 * t * h * e  # the router GEMM
    assert int(lay["bytes"]) - int(exp["bytes"]) == 4 * (e * h + t * e)  # fp32 router weight + logits
    assert float(lay["roofline_ms"]) >= float(exp["roofline_ms"])


# one preset per routing family; sizes cut so that H >= E (the router steers through x) and it runs in a second
PRESETS = [
    "qwen3-30b-a3b",  # softmax_topk
    "gpt-oss-20b",  # topk_softmax
    "glm-4.5-air",  # sigmoid_grouped_topk, correction bias, one group
    "kimi-k2",  # sigmoid_grouped_topk, E=384 (not a power of two), bias, scaling 2.827
    "deepseek-v3",  # sigmoid_grouped_topk, 8 groups, 4 kept: balanced ids cross the group limit
    "deepseek-v2",  # softmax_grouped_topk, 8 groups, 3 kept, unnormalised weights * 16
]


@pytest.mark.parametrize("scenario", ["random", "balanced", "imbalanced"])
@pytest.mark.parametrize("name", PRESETS)
def test_layer_ids_are_the_scenario_ids(name, scenario, spy, scenario_log):
    base = MoEConfig.from_pretrained(name)
    config = base.replace(hidden_size=max(64, base.num_experts + 8), intermediate_size=16)
    row, weights = _run(config, scenario, "layer")
    assert row["status"] == "OK", row["note"]
    ((x_scenario, _, scenario_ids),) = scenario_log
    x, got_weights, got_ids = spy[0]
    assert torch.equal(got_ids, scenario_ids)  # the experts ran on the scenario's routing
    # ... and the routing inside the timed call produced it (where a router can: see tilemoe.bench.layer)
    logits = torch.nn.functional.linear(x, weights["router_weight"])
    ref_weights, routed_ids = route(logits, config, correction_bias=weights["correction_bias"])
    reachable = layer.reachable_tokens(scenario_ids, config)
    assert torch.equal(routed_ids[reachable], scenario_ids[reachable])
    torch.testing.assert_close(got_weights, ref_weights)
    assert torch.equal(x[:, config.num_experts :], x_scenario[:, config.num_experts :])  # only x[:, :E] steered
    group_limited = config.routing.endswith("grouped_topk") and config.topk_group < config.n_group
    if not group_limited or scenario == "random":  # the routing's own ids: never past the group limit
        assert bool(reachable.all()) and row["note"] == ""
    else:
        assert "passed through" in row["note"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_scope_half_precision_passes_the_gate(dtype):
    # bf16/fp16 router GEMM and logits still pick the scenario's ids; DeepSeek-V2's weights (unnormalised,
    # * 16) must stay small enough for the gate's absolute tolerance
    base = MoEConfig.from_pretrained("deepseek-v2")
    s = runner.BenchSettings(
        config=base.replace(hidden_size=192, intermediate_size=16), impls=["grouped"], num_tokens=[16],
        scenarios=["random", "imbalanced"], device=torch.device("cpu"), dtype=dtype, warmup=0, iters=1, rounds=1,
        timed_scope="layer",
    )  # fmt: skip
    rows = runner.run_bench(s, ROOFLINE)
    assert [r["status"] for r in rows] == ["OK", "OK"], [r["note"] for r in rows]


def test_experts_scope_is_the_old_call(spy, scenario_log):
    config = MoEConfig(num_experts=8, top_k=2, hidden_size=32, intermediate_size=16)
    row, weights = _run(config, "imbalanced", "experts", tokens=12)
    assert set(weights) == {"w13", "w2", "b13", "b2"} and row["timed_scope"] == "experts"
    ((x_scenario, scenario_weights, scenario_ids),) = scenario_log
    x, got_weights, got_ids = spy[0]
    assert torch.equal(x, x_scenario) and torch.equal(got_weights, scenario_weights)
    assert torch.equal(got_ids, scenario_ids)
    assert row["flops"] == layer_flops(config, 12) == 2 * 12 * 2 * (32 * 32 + 16 * 32)
    assert row["bytes"] == layer_bytes(config, 12, int(scenario_ids.unique().numel()), 4)
    _, layer_weights = _run(config, "imbalanced", "layer", tokens=12)
    assert torch.equal(layer_weights["w13"], weights["w13"])  # the router is drawn after the experts


def test_hidden_smaller_than_experts_passes_the_ids_through(spy, scenario_log):
    config = MoEConfig(num_experts=32, top_k=4, hidden_size=16, intermediate_size=8)
    row, _ = _run(config, "balanced", "layer", tokens=10)
    assert row["status"] == "OK" and "hidden_size 16 < num_experts 32" in row["note"]
    assert torch.equal(spy[0][2], scenario_log[0][2])


def test_a_router_that_misses_the_scenario_raises(spy, monkeypatch):
    monkeypatch.setattr(layer, "NOT_CHOSEN_GAP", -8.0)  # the other experts now outrank the chosen ones
    config = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8)
    with pytest.raises(RuntimeError, match="did not reproduce the 'balanced' scenario's ids"):
        _run(config, "balanced", "layer", tokens=6)


def test_reachable_tokens():
    config = MoEConfig(num_experts=8, top_k=2, hidden_size=8, intermediate_size=8, routing="sigmoid_grouped_topk",
                       n_group=4, topk_group=1)  # fmt: skip
    ids = torch.tensor([[0, 1], [0, 2], [3, 3], [7, 6]])  # same group, two groups, repeated id, same group
    assert layer.reachable_tokens(ids, config).tolist() == [True, False, False, True]
    assert layer.reachable_tokens(ids, config.replace(topk_group=4)).tolist() == [True, True, False, True]
    assert not layer.reachable_tokens(ids, config.replace(hidden_size=4)).any()


def test_journey_keeps_timing_the_experts():
    from tilemoe.bench import journey

    parser = argparse.ArgumentParser()
    journey.add_parser(parser.add_subparsers())
    settings, header = build_settings(parser.parse_args(["journey", *TINY[:-2]]), command="journey")
    assert settings.timed_scope == "experts" and "timed_scope" not in header["timing"]


def test_bad_scope_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["bench", *TINY, "--timed-scope", "router"])
    assert "invalid choice: 'router'" in capsys.readouterr().err
    s = runner.BenchSettings(config=MoEConfig(8, 2, 16, 8), impls=[], num_tokens=[1], scenarios=["random"],
                             device=torch.device("cpu"), timed_scope="router")  # fmt: skip
    with pytest.raises(ValueError, match="timed_scope: expected one of"):
        runner.run_bench(s, ROOFLINE)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v3", "kimi-k2"])
@pytest.mark.parametrize("scenario", ["random", "balanced"])
def test_layer_scope_on_gpu_graph_replays(name, scenario):
    # bf16 on the GPU: route_triton inside the timed call, captured in a CUDA graph with the triton experts
    base = MoEConfig.from_pretrained(name)
    config = base.replace(hidden_size=max(1024, base.num_experts), intermediate_size=128)
    s = runner.BenchSettings(
        config=config, impls=["triton", "torch_grouped_mm"], num_tokens=[256], scenarios=[scenario],
        device=torch.device("cuda"), dtype=torch.bfloat16, warmup=2, iters=5, rounds=1, cuda_graph=True,
        timed_scope="layer",
    )  # fmt: skip
    rows = runner.run_bench(s, ROOFLINE)
    for row in rows:
        assert row["status"] == "OK", row["note"]
        assert row["timed_scope"] == "layer" and row["latency_mean_ms"] > 0
    assert rows[0]["cuda_graph"] is True, rows[0]["note"]  # triton: no host sync anywhere in the layer
