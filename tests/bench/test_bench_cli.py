"""`tilemoe bench` driven through tilemoe.cli.main at tiny sizes on CPU."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch

from tilemoe.bench.cli import validate_parallel
from tilemoe.cli import main
from tilemoe.config import MoEConfig
from tilemoe.impls import register_impl, unregister_impl
from tilemoe.impls._registry import _REGISTRY

LEADING = [
    "implementation",
    "scenario",
    "num_tokens",
    "ep_size",
    "tp_size",
    "num_experts",
    "num_experts_per_tok",
    "latency_mean_ms",
    "latency_std_ms",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "max_load",
    "min_load",
    "avg_load",
    "max_imbalance",
    "throughput_tok_per_sec",
]
TINY = ["--manual-config", "--num-experts", "6", "--num-experts-per-tok", "2", "--hidden-size", "16"]
TINY += ["--intermediate-size", "8", "--warmup-iters", "1", "--benchmark-iters", "3", "--rounds", "2"]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEMOE_CACHE_DIR", str(tmp_path / "cache"))


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _bench_rows(tmp_path, name: str, *args: str) -> dict[str, dict]:
    """``tilemoe bench`` at the tiny size with ``args``, exited 0; its CSV rows by implementation."""
    assert main(["bench", *TINY, *args, "--output-file", str(tmp_path / name), "--output-format", "csv"]) == 0
    return {r["implementation"]: r for r in _read_csv(tmp_path / f"{name}.csv")}


def test_bench_outputs_csv_markdown_json(tmp_path, capsys):
    base = tmp_path / "out" / "bench"
    rc = main(
        ["bench", *TINY, "--impl", "grouped", "naive", "--num-tokens", "0", "5", "--scenarios", "random", "balanced"]
        + ["--output-file", str(base), "--output-format", "all"]
    )
    assert rc == 0
    header = (base.parent / "bench.csv").read_text().splitlines()[0].split(",")
    assert header[: len(LEADING)] == LEADING
    assert {"tflops", "gbps", "pct_roofline", "pct_roofline_p50", "peak_memory_mb", "status", "speedup", "device",
            "dtype"} <= set(header)  # fmt: skip
    rows = _read_csv(base.parent / "bench.csv")
    assert len(rows) == 2 * 2 * 2  # impls x scenarios x token counts
    assert {r["status"] for r in rows} == {"OK"}
    five = [r for r in rows if r["num_tokens"] == "5"]
    assert all(float(r["latency_mean_ms"]) > 0 and float(r["throughput_tok_per_sec"]) > 0 for r in five)
    assert all(r["speedup"] == "1" for r in five if r["implementation"] == "grouped")  # grouped is the baseline
    md = (base.parent / "bench.md").read_text()
    for text in ("# tilemoe bench", "torch", "triton", "**command**", "## random, 5 tokens", "## balanced, 0 tokens"):
        assert text in md
    assert "| grouped | OK |" in md and "speedup vs grouped" in md
    data = json.loads((base.parent / "bench.json").read_text())
    assert data["header"]["config"]["num_experts"] == 6 and len(data["rows"]) == 8
    out = capsys.readouterr().out
    assert "grouped" in out and "wrote" in out


def test_kernel_config_column_names_what_the_tuned_kernels_ran(tmp_path):
    # on the CPU (the interpreter) no device table: the heuristic; implementations without tuned kernels: empty
    rows = _bench_rows(tmp_path, "cfg", "--impl", "triton", "grouped", "--num-tokens", "5", "--scenarios", "random")
    assert rows["triton"]["status"] == "OK" and rows["triton"]["kernel_config"] == "heuristic"
    assert rows["grouped"]["kernel_config"] == ""


def test_oom_row_and_run_goes_on(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 190.00 GiB (forced by the test)")

    monkeypatch.setattr("tilemoe.impls.batched.torch.einsum", fail)
    rows = _bench_rows(tmp_path, "oom", "--impl", "batched", "grouped", "--num-tokens", "4", "--scenarios", "random")
    assert rows["batched"]["status"] == "OOM" and rows["batched"]["latency_mean_ms"] == ""
    assert "out of memory" in rows["batched"]["note"]
    assert rows["grouped"]["status"] == "OK"


@pytest.fixture
def wrong_impl():
    @register_impl("wrong_for_test", description="deliberately wrong: drops the last expert slot")
    def wrong(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None):
        from tilemoe.impls.grouped import grouped_forward

        return grouped_forward(x, w13, w2, topk_weights * 0.5, topk_ids, config=config, b13=b13, b2=b2)

    yield "wrong_for_test"
    unregister_impl("wrong_for_test")


def test_failed_row_is_not_timed(tmp_path, wrong_impl):
    base = tmp_path / "failed"
    rc = main(["bench", *TINY, "--impl", wrong_impl, "grouped", "--num-tokens", "6", "--scenarios", "balanced"]
              + ["--output-file", str(base), "--output-format", "both"])  # fmt: skip
    assert rc == 0
    rows = {r["implementation"]: r for r in _read_csv(tmp_path / "failed.csv")}
    assert rows[wrong_impl]["status"] == "FAILED"
    assert rows[wrong_impl]["latency_mean_ms"] == "" and "reference" in rows[wrong_impl]["note"]
    assert rows["grouped"]["status"] == "OK"
    assert f"| {wrong_impl} | FAILED |" in (tmp_path / "failed.md").read_text()


def test_unknown_impl_lists_available(capsys):
    assert main(["bench", *TINY, "--impl", "nope", "--num-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown implementation(s) ['nope']" in err and "grouped" in err


def test_ep_size_divisibility_error(capsys):
    args = ["bench", "--manual-config", "--num-experts", "60", "--num-experts-per-tok", "4", "--hidden-size", "16"]
    assert main([*args, "--intermediate-size", "8", "--ep-size", "8"]) == 2
    err = capsys.readouterr().err
    assert "num_experts (60) must be divisible by ep_size (8): valid ep sizes are 1, 2, 3, 4, 5, 6, 10, 12, 15," in err


def test_tp_size_exceeds_device_count(monkeypatch):
    import argparse

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = argparse.Namespace(ep_size=2, tp_size=4, nnodes=1, node_rank=0)
    config = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8)
    with pytest.raises(ValueError, match="tp_size exceeds device count"):
        validate_parallel(args, config, torch.device("cuda"))
    args = argparse.Namespace(ep_size=2, tp_size=None, nnodes=1, node_rank=0)
    validate_parallel(args, config, torch.device("cuda"))
    assert (args.tp_size, args.tp_actual) == (2, 1)


def test_routing_trace_replay(tmp_path):
    ids = [[0, 1]] * 5 + [[2, 3]]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(ids))
    base = tmp_path / "trace_out"
    rc = main(["bench", *TINY, "--impl", "grouped", "--num-tokens", "6", "--routing-trace", str(trace)]
              + ["--output-file", str(base), "--output-format", "csv"])  # fmt: skip
    assert rc == 0
    (row,) = _read_csv(tmp_path / "trace_out.csv")
    assert row["scenario"] == "trace" and row["status"] == "OK"
    assert (row["max_load"], row["min_load"]) == ("5", "0")  # experts 0 and 1 got 5 tokens, 4 and 5 none
    assert float(row["max_imbalance"]) == pytest.approx(5 / 2)


def test_plot_and_profile(tmp_path):
    base = tmp_path / "p" / "run"
    prof = tmp_path / "traces"
    rc = main(["bench", *TINY, "--impl", "grouped", "--num-tokens", "2", "4", "--scenarios", "random", "zipf"]
              + ["--output-file", str(base), "--plot", "--profile", "--profile-dir", str(prof)])  # fmt: skip
    assert rc == 0
    for scenario in ("random", "zipf"):
        png = tmp_path / "p" / f"run_{scenario}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = json.loads((prof / "random_T4_grouped.json").read_text())
    assert trace["traceEvents"]


def test_default_run_is_the_small_cpu_case(capsys, monkeypatch):
    # The README's first quick-start command, as CI runs it (no GPU): the scaled-down default model.
    if torch.cuda.is_available():
        pytest.skip("the GPU default is the real model")
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "scaled down" in out and "torch_grouped_mm" in out and "grouped" in out


def test_unavailable_impl_is_skipped_row(tmp_path, monkeypatch):
    impl = _REGISTRY["grouped"]
    monkeypatch.setitem(_REGISTRY, "grouped", dataclasses.replace(impl, is_available=lambda: False))
    base = tmp_path / "skip"
    rc = main(["bench", *TINY, "--impl", "grouped", "naive", "--num-tokens", "3", "--scenarios", "random"]
              + ["--output-file", str(base), "--output-format", "csv"])  # fmt: skip
    assert rc == 0
    rows = {r["implementation"]: r for r in _read_csv(tmp_path / "skip.csv")}
    assert rows["grouped"]["status"] == "SKIPPED" and rows["naive"]["status"] == "OK"


def test_reference_on_a_token_subset_still_gates(tmp_path, monkeypatch, wrong_impl):
    """Big shapes check a sample of the rows; a wrong impl must still fail there, a right one pass."""
    import tilemoe.bench.runner as runner

    per_token = 2 * 2 * (16 * 16 + 8 * 16)  # layer FLOPs of one token for the TINY config
    monkeypatch.setitem(runner.REF_FLOP_BUDGET, "cpu", 5 * per_token)
    rows = _read_csv(_run(tmp_path, ["--impl", "grouped", wrong_impl, "--num-tokens", "40"]))
    status = {r["implementation"]: r["status"] for r in rows}
    assert status == {"grouped": "OK", wrong_impl: "FAILED"}
    assert len(runner._reference_rows(40, MoEConfig(6, 2, 16, 8), torch.device("cpu"))) == 5


def _run(tmp_path, extra):
    base = tmp_path / "run"
    assert (
        main(["bench", *TINY, "--scenarios", "random", "--output-file", str(base), "--output-format", "csv", *extra])
        == 0
    )
    return tmp_path / "run.csv"


def test_cuda_graph_flag_on_cpu_times_eagerly(tmp_path):
    (row,) = _read_csv(_run(tmp_path, ["--impl", "grouped", "--num-tokens", "3", "--cuda-graph"]))
    assert row["status"] == "OK" and row["cuda_graph"] == "False" and "CUDA device" in row["note"]


def test_graph_calls_flag(tmp_path, capsys):
    (row,) = _read_csv(_run(tmp_path, ["--impl", "grouped", "--num-tokens", "3", "--cuda-graph", "--graph-calls", "4"]))
    assert row["status"] == "OK" and row["cuda_graph"] == "False" and row["graph_calls"] == "0"  # CPU: eager
    assert main(["bench", *TINY, "--num-tokens", "3", "--graph-calls", "0"]) == 2
    assert "--graph-calls: expected a count >= 1, got 0" in capsys.readouterr().err


def test_ep_size_goes_to_the_distributed_runner(monkeypatch, capsys):
    import importlib.util

    args = [*TINY, "--num-tokens", "2", "--ep-size", "2"]
    if importlib.util.find_spec("tilemoe.bench.distributed_runner") is None:
        with pytest.raises(RuntimeError, match="expert-parallel benchmark not available"):
            main(["bench", *args])
    else:
        import tilemoe.bench.distributed_runner as dr

        seen = {}
        monkeypatch.setattr(dr, "run_distributed", lambda a, c: seen.update(ep=a.ep_size, e=c.num_experts) or 0)
        assert main(["bench", *args]) == 0
        assert seen == {"ep": 2, "e": 6}


def test_imbalanced_cli_reaches_factor_without_manual_flag(tmp_path):
    # the four sizes without --manual-config work too; avg load = 60*2/6 = 20, target 2.5 -> hot expert 50
    base = tmp_path / "imb"
    args = ["--num-experts", "6", "--num-experts-per-tok", "2", "--hidden-size", "16", "--intermediate-size", "8"]
    args += ["--benchmark-iters", "1", "--warmup-iters", "0", "--impl", "grouped", "--num-tokens", "60"]
    args += ["--scenarios", "imbalanced", "--imbalance-factor", "2.5", "--output-file", str(base)]
    assert main(["bench", *args, "--output-format", "csv"]) == 0
    (row,) = _read_csv(tmp_path / "imb.csv")
    assert abs(float(row["max_imbalance"]) - 2.5) <= 0.25 and row["max_load"] == "50"


def test_roofline_is_measured_once_and_cached(tmp_path, monkeypatch):
    import tilemoe.bench.roofline as roofline

    first = roofline.get_roofline(torch.device("cpu"), torch.float32)
    assert first.copy_gbps > 0 and first.matmul_tflops > 0
    assert (tmp_path / "cache" / "roofline.json").exists()

    def no_measure(*args, **kwargs):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(roofline, "measure_roofline", no_measure)
    assert roofline.get_roofline(torch.device("cpu"), torch.float32) == first


def test_bmm_ceiling_columns_and_markdown(tmp_path, monkeypatch, capsys):
    # the ceiling is timed after the implementations, as many calls: count them
    import tilemoe.bench.ceiling as ceiling_mod

    calls = []
    real = ceiling_mod.bmm_ceiling

    class Counting(ceiling_mod.BmmCeiling):
        def fn(self, _inputs=None):
            calls.append(1)
            return super().fn(_inputs)

    def counting(*args, **kwargs):
        ceiling = real(*args, **kwargs)
        return None if ceiling is None else Counting(**vars(ceiling))

    monkeypatch.setattr("tilemoe.bench.runner.bmm_ceiling", counting)
    base = tmp_path / "ceil"
    rc = main(["bench", *TINY, "--impl", "grouped", "naive", "--num-tokens", "0", "7", "--scenarios", "random"]
              + ["--bmm-ceiling", "--output-file", str(base), "--output-format", "all"])  # fmt: skip
    assert rc == 0
    rows = _read_csv(tmp_path / "ceil.csv")
    zero = [r for r in rows if r["num_tokens"] == "0"]
    assert all(r["ceiling_bmm_ms"] == "" and r["pct_ceiling_bmm"] == "" for r in zero)  # T = 0: no work, no ceiling
    seven = [r for r in rows if r["num_tokens"] == "7"]
    ceiling = {r["ceiling_bmm_ms"] for r in seven}
    assert len(ceiling) == 1 and float(ceiling.pop()) > 0  # one ceiling per case, on every row
    for r in seven:
        expected = 100 * float(r["ceiling_bmm_ms"]) / float(r["latency_mean_ms"])
        assert float(r["pct_ceiling_bmm"]) == pytest.approx(expected, rel=1e-4)
    assert len(calls) == 1 + 3  # one warm-up call, then the 3 timed calls (TINY: --warmup-iters 1 --benchmark-iters 3)
    md = (tmp_path / "ceil.md").read_text()
    assert "cuBLAS bmm ceiling" in md and "% bmm ceiling" in md
    assert json.loads((tmp_path / "ceil.json").read_text())["header"]["timing"]["bmm_ceiling"] is True
    assert "%ceil" in capsys.readouterr().out  # the console table has the column too


def test_no_bmm_ceiling_by_default(tmp_path):
    (row,) = _read_csv(_run(tmp_path, ["--impl", "grouped", "--num-tokens", "3"]))
    assert row["ceiling_bmm_ms"] == "" and row["pct_ceiling_bmm"] == ""


def test_bmm_ceiling_failure_is_a_note_not_a_stop(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (forced by the test)")

    monkeypatch.setattr("tilemoe.bench.runner.bmm_ceiling", fail)
    (row,) = _read_csv(_run(tmp_path, ["--impl", "grouped", "--num-tokens", "3", "--bmm-ceiling"]))
    assert row["status"] == "OK" and row["ceiling_bmm_ms"] == ""
    assert "bmm ceiling not timed (out of memory)" in row["note"]


def test_timing_order_rotates_each_round(tmp_path):
    # under a power cap a call can run slower right after a power-hungry one: no implementation may always follow
    # the same one. Each impl below logs its calls: 3 rounds of one call each, then the ceiling's own pass.
    seen = []

    def logging_impl(name):
        def forward(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None):
            from tilemoe.impls.grouped import grouped_forward

            seen.append(name)
            return grouped_forward(x, w13, w2, topk_weights, topk_ids, config=config, b13=b13, b2=b2)

        register_impl(name, description="logs its calls (test)")(forward)

    import tilemoe.bench.ceiling as ceiling_mod

    class LoggedCeiling(ceiling_mod.BmmCeiling):
        def fn(self, _inputs=None):
            seen.append("ceiling")
            return super().fn(_inputs)

    real = ceiling_mod.bmm_ceiling
    try:
        logging_impl("first_for_test")
        logging_impl("second_for_test")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("tilemoe.bench.runner.bmm_ceiling", lambda *a, **k: LoggedCeiling(**vars(real(*a, **k))))
            args = ["--impl", "first_for_test", "second_for_test", "--num-tokens", "4", "--bmm-ceiling"]
            args += ["--warmup-iters", "0", "--benchmark-iters", "3", "--rounds", "3"]
            _run(tmp_path, args)
    finally:
        unregister_impl("first_for_test")
        unregister_impl("second_for_test")
    a, b, c = "first_for_test", "second_for_test", "ceiling"
    assert seen[-9:] == [a, b, b, a, a, b, c, c, c]
