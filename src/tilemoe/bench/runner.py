"""The bench loop: for each scenario and token count, make inputs, gate every implementation on correctness,
then time them interleaved round by round; one result row per (implementation, scenario, tokens).

What one timed call covers (``BenchSettings.timed_scope``, CSV column ``timed_scope``):
    experts  the implementation's routed experts only (dispatch, both GEMMs, activation, combine), on the
             scenario's topk_weights / topk_ids computed before the timed region
    layer    router GEMM + routing + the same experts, in one callable, in the same order for every
             implementation (``tilemoe.bench.layer``); the router is steered so that the routing kernel picks
             the scenario's ids, which is checked once before timing

Correctness gate: each implementation's output on the first input set is compared with the float64
reference (``tilemoe.impls.reference``) under the tolerances of the bench dtype (``tilemoe.testing``). The
reference is computed once per input, on the bench device (on the CPU if the device runs out of memory).
Every token is independent of the others in an MoE layer, so for large shapes (more than ``REF_FLOP_BUDGET``
float64 FLOPs) the reference runs on an evenly spaced subset of the tokens and only those rows are compared:
the same tolerance, a sample of the rows. A mismatch (or an exception) marks the row FAILED and it is not timed.

Out of memory (``torch.OutOfMemoryError``, or a RuntimeError saying "out of memory" / "can't allocate
memory") anywhere in an implementation's gate or timing marks its row OOM; memory is freed and the run goes on.

peak_memory_mb: ``torch.cuda.max_memory_allocated`` over the gate call (weights and inputs included); empty on
CPU, where PyTorch does not track it.

ceiling_bmm_ms / pct_ceiling_bmm (``BenchSettings.bmm_ceiling``): cuBLAS's time for the layer's two GEMMs with
balanced rows (``tilemoe.bench.ceiling``), timed after the implementations; the same on every row of a case, and
100 * that time / the row's mean time.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tilemoe.bench.ceiling import bmm_ceiling
from tilemoe.bench.layer import (
    check_layer_ids,
    layer_fn,
    layer_route,
    layer_router_logits,
    make_router_weights,
    reachable_tokens,
    steer_input,
)
from tilemoe.bench.metrics import layer_bytes, layer_flops, load_stats, roofline_seconds
from tilemoe.bench.roofline import Roofline
from tilemoe.bench.scenarios import make_routing_for
from tilemoe.bench.timing import Timer, TimingStats
from tilemoe.config import MoEConfig
from tilemoe.impls import get_impl
from tilemoe.impls.reference import reference_experts_fp64
from tilemoe.routing import route
from tilemoe.testing import assert_close, make_weights
from tilemoe.tuning import MoEShape, config_source

# float64 FLOPs the reference may spend per input: about a second on CPU / on an H100's fp64 units
REF_FLOP_BUDGET = {"cpu": 2e9, "cuda": 2e12}
L2_ROTATE_BYTES = 64 << 20  # activations smaller than this are rotated over 3 input sets (H100 L2: 50 MB)
TIMED_SCOPES = ("layer", "experts")

LEADING_COLUMNS = (
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
)
MORE_COLUMNS = (
    "tflops",
    "gbps",
    "pct_roofline",
    "pct_roofline_p50",
    "roofline_ms",
    "peak_memory_mb",
    "status",
    "speedup",
    "baseline",
    "level",
    "cuda_graph",
    "graph_calls",
    "timed_scope",
    "device",
    "dtype",
    "model",
    "hidden_size",
    "intermediate_size",
    "activation",
    "gated",
    "flops",
    "bytes",
    "note",
    "ceiling_bmm_ms",
    "pct_ceiling_bmm",
    "kernel_config",
)
COLUMNS = LEADING_COLUMNS + MORE_COLUMNS
# Up to this many tokens a CUDA graph holds BenchSettings.graph_calls layer calls (--graph-calls); above, one: a call
# takes >= 0.3 ms there, and the ~2-5 us launch of a graph is lost in it.
GRAPH_CALLS_MAX_TOKENS = 256


@dataclass
class BenchSettings:
    config: MoEConfig
    impls: list[str]
    num_tokens: list[int]
    scenarios: list[str]
    device: torch.device
    dtype: torch.dtype = torch.float32
    model: str = "manual"
    baseline: str | None = None
    imbalance_factor: float = 3.0
    zipf_alpha: float = 1.2
    trace: tuple | None = None
    seed: int = 0
    warmup: int = 2
    iters: int = 10
    rounds: int = 5
    cuda_graph: bool = False
    graph_calls: int = 1  # layer calls per CUDA graph at T <= GRAPH_CALLS_MAX_TOKENS (Timer)
    bmm_ceiling: bool = False  # time tilemoe.bench.ceiling's cuBLAS ceiling after the implementations
    profile_dir: str | None = None
    ep_size: int = 1
    tp_size: int = 1
    timed_scope: str = "experts"  # "layer": router GEMM + routing + experts (see the module docstring)
    skip: Callable[[str, int], str | None] | None = None  # (impl, tokens) -> reason to skip, or None
    extra: dict = field(default_factory=dict)


def is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reference_rows(num_tokens: int, config: MoEConfig, device: torch.device) -> torch.Tensor | None:
    """Token indices the reference covers (None: all)."""
    budget = REF_FLOP_BUDGET.get(device.type, REF_FLOP_BUDGET["cpu"])
    per_token = layer_flops(config, 1)
    if num_tokens * per_token <= budget:
        return None
    n = max(1, int(budget // per_token))
    return torch.linspace(0, num_tokens - 1, n, device=device).round().long().unique()


def _reference(x, topk_weights, topk_ids, subset, weights, config, device) -> torch.Tensor:
    """float64 reference of the rows in ``subset`` (None: all), on ``device``; on the CPU if that runs out of
    memory (the float64 copies of one expert's weights and rows are what it needs)."""
    if subset is not None:
        x, topk_weights, topk_ids = x[subset], topk_weights[subset], topk_ids[subset]
    w = {k: weights[k] for k in ("w13", "w2", "b13", "b2")}
    try:
        return reference_experts_fp64(
            x, w["w13"], w["w2"], topk_weights, topk_ids, config=config, b13=w["b13"], b2=w["b2"]
        )
    except Exception as error:  # noqa: BLE001
        if not is_oom(error) or device.type == "cpu":
            raise
    _free_memory(device)
    cpu = {k: None if v is None else v.cpu() for k, v in w.items()}
    out = reference_experts_fp64(
        x.cpu(), cpu["w13"], cpu["w2"], topk_weights.cpu(), topk_ids.cpu(), config=config, b13=cpu["b13"], b2=cpu["b2"]
    )
    return out.to(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return math.nan  # not tracked on CPU


def _kernel_config_source(s: BenchSettings, tokens: int) -> str:
    """The table entry (or rule) ``pick_config`` gives the tuned kernels at this point, as ``fused_experts`` asks it."""
    c = s.config
    shape = MoEShape(tokens, c.num_experts, c.top_k, c.hidden_size, c.intermediate_size)
    device_name = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else None
    return config_source(shape, s.dtype, device_name)


def _base_row(s: BenchSettings, impl: str, scenario: str, tokens: int, loads, flops, nbytes, roof_s) -> dict:
    impl_obj = get_impl(impl)
    return {
        "implementation": impl,
        "scenario": scenario,
        "num_tokens": tokens,
        "ep_size": s.ep_size,
        "tp_size": s.tp_size,
        "num_experts": s.config.num_experts,
        "num_experts_per_tok": s.config.top_k,
        "latency_mean_ms": math.nan,
        "latency_std_ms": math.nan,
        "latency_p50_ms": math.nan,
        "latency_p95_ms": math.nan,
        "latency_p99_ms": math.nan,
        "max_load": loads.max_load,
        "min_load": loads.min_load,
        "avg_load": loads.avg_load,
        "max_imbalance": loads.max_imbalance,
        "throughput_tok_per_sec": math.nan,
        "tflops": math.nan,
        "gbps": math.nan,
        "pct_roofline": math.nan,
        "pct_roofline_p50": math.nan,
        "roofline_ms": roof_s * 1e3,
        "peak_memory_mb": math.nan,
        "status": "OK",
        "speedup": math.nan,
        "baseline": s.baseline or "",
        "level": "" if impl_obj.level is None else impl_obj.level,
        "cuda_graph": False,
        "graph_calls": 0,
        "timed_scope": s.timed_scope,
        "device": str(s.device),
        "dtype": str(s.dtype).replace("torch.", ""),
        "model": s.model,
        "hidden_size": s.config.hidden_size,
        "intermediate_size": s.config.intermediate_size,
        "activation": s.config.activation,
        "gated": s.config.gated,
        "flops": flops,
        "bytes": nbytes,
        "note": "",
        "ceiling_bmm_ms": math.nan,
        "pct_ceiling_bmm": math.nan,
        "kernel_config": _kernel_config_source(s, tokens) if impl_obj.tuned else "",
    }


def _fill_timing(row: dict, stats: TimingStats, tokens: int) -> None:
    mean = stats.mean
    row.update(
        latency_mean_ms=mean,
        latency_std_ms=stats.std,
        latency_p50_ms=stats.p50,
        latency_p95_ms=stats.p95,
        latency_p99_ms=stats.p99,
        cuda_graph=stats.cuda_graph,
        graph_calls=stats.graph_calls if stats.cuda_graph else 0,
    )
    if mean > 0:
        seconds = mean / 1e3
        row["throughput_tok_per_sec"] = tokens / seconds
        row["tflops"] = row["flops"] / seconds / 1e12
        row["gbps"] = row["bytes"] / seconds / 1e9
        row["pct_roofline"] = 100.0 * row["roofline_ms"] / mean
    if stats.p50 > 0:  # the same against the median: steadier where a few slow calls pull the mean up
        row["pct_roofline_p50"] = 100.0 * row["roofline_ms"] / stats.p50
    if stats.note:
        row["note"] = f"{row['note']}; {stats.note}" if row["note"] else stats.note


def _profile(fn, inp, path: Path, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            fn(inp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))


def layer_inputs(
    s: BenchSettings, scenario: str, xs: list, topk_weights: torch.Tensor, topk_ids: torch.Tensor, weights: dict
) -> tuple[list, torch.Tensor, bool, str]:
    """Layer scope: (input sets with steered x, reference topk_weights, pass_through, note for the rows).

    The reference weights are ``routing.route`` of the first set's router logits; its ids, and those of the
    routing the timed call uses, must equal the scenario's on every token a router can steer (else RuntimeError).
    """
    config = s.config
    reachable = reachable_tokens(topk_ids, config)
    xs = [steer_input(x, topk_ids, config) for x in xs]
    logits = layer_router_logits(xs[0], weights["router_weight"])
    bias = weights["correction_bias"]
    ref_weights, ref_ids = route(logits, config, correction_bias=bias)
    check_layer_ids(ref_ids, topk_ids, reachable, scenario)
    check_layer_ids(layer_route(xs[0], weights["router_weight"], config, bias)[1], topk_ids, reachable, scenario)
    unreachable = int((~reachable).sum())
    note = ""
    if unreachable:
        if config.hidden_size < config.num_experts:
            why = f"hidden_size {config.hidden_size} < num_experts {config.num_experts}"
        else:
            why = f"ids in more than topk_group={config.topk_group} of {config.n_group} groups, or repeated"
        note = f"layer scope: scenario ids passed through the routing ({unreachable}/{len(reachable)} tokens: {why})"
    return [(x, topk_weights, topk_ids) for x in xs], ref_weights, unreachable > 0, note


def run_case(
    s: BenchSettings,
    scenario: str,
    tokens: int,
    weights: dict,
    roofline: Roofline,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """All implementations on one (scenario, tokens): rows in ``s.impls`` order."""
    config, device = s.config, s.device
    gen = torch.Generator().manual_seed(s.seed * 1_000_003 + tokens * 31 + len(scenario))
    element = torch.empty((), dtype=s.dtype).element_size()
    x_bytes = tokens * config.hidden_size * element
    n_sets = 3 if device.type == "cuda" and 0 < x_bytes < L2_ROTATE_BYTES else 1
    xs = [torch.randn(tokens, config.hidden_size, generator=gen).to(device, s.dtype) for _ in range(n_sets)]
    topk_weights, topk_ids = make_routing_for(
        scenario,
        tokens,
        config,
        generator=gen,
        x=xs[0],
        device=device,
        imbalance_factor=s.imbalance_factor,
        zipf_alpha=s.zipf_alpha,
        trace=s.trace,
    )
    loads = load_stats(topk_ids, config.num_experts)
    layer = s.timed_scope == "layer"
    flops = layer_flops(config, tokens, router=layer)
    nbytes = layer_bytes(config, tokens, loads.experts_hit, element, router=layer)
    roof_s = roofline_seconds(flops, nbytes, roofline.matmul_flops_per_s, roofline.copy_bytes_per_s)
    w13, w2, b13, b2 = weights["w13"], weights["w2"], weights["b13"], weights["b2"]

    inputs = [(x, topk_weights, topk_ids) for x in xs]
    ref_weights, pass_through, scope_note = topk_weights, False, ""
    if layer:
        inputs, ref_weights, pass_through, scope_note = layer_inputs(s, scenario, xs, topk_weights, topk_ids, weights)
    subset = _reference_rows(tokens, config, device)
    # the same ids as the timed calls: the scenario's (layer scope: the routed ones, checked equal to them)
    reference = _reference(inputs[0][0], ref_weights, topk_ids, subset, weights, config, device)

    rows: dict[str, dict] = {}
    timers: dict[str, Timer] = {}
    stats: dict[str, TimingStats] = {}
    for name in s.impls:
        row = _base_row(s, name, scenario, tokens, loads, flops, nbytes, roof_s)
        row["note"] = scope_note
        rows[name] = row
        impl = get_impl(name)
        reason = s.skip(name, tokens) if s.skip else None
        if reason is None and not impl.available(device):
            reason = f"not available on {device.type}"
        if reason:
            row.update(status="SKIPPED", note=reason)
            continue

        if layer:
            fn = layer_fn(impl.fn, weights, config, pass_through=pass_through, from_logits=impl.from_logits)
        else:

            def fn(inp, _impl=impl):
                return _impl.fn(inp[0], w13, w2, inp[1], inp[2], config=config, b13=b13, b2=b2)

        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        try:
            out = fn(inputs[0])
            row["peak_memory_mb"] = _peak_mb(device)
            got = out if subset is None else out[subset]
            assert_close(got, reference, dtype=s.dtype, name=name)
            del out, got
            graph_calls = s.graph_calls if tokens <= GRAPH_CALLS_MAX_TOKENS else 1
            timer = Timer(fn, inputs, device=device, cuda_graph=s.cuda_graph, graph_calls=graph_calls)
            timer.warmup(s.warmup)
            timers[name] = timer
            stats[name] = TimingStats(note=timer.note)
        except AssertionError as error:
            row.update(status="FAILED", note=f"output differs from the float64 reference: {error}")
        except Exception as error:  # noqa: BLE001 - any failure of one impl must not stop the others
            if is_oom(error):
                row.update(status="OOM", note=str(error).splitlines()[0][:200] if str(error) else "out of memory")
            else:
                row.update(status="FAILED", note=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
            timers.pop(name, None)
            _free_memory(device)

    del reference
    _free_memory(device)
    # Timed in turn within each round, so clock drift spreads over every implementation alike, the order rotated by
    # one each round, so that none always runs right after the same one.
    order = list(timers)
    per_round = max(1, math.ceil(s.iters / max(1, s.rounds)))
    done, round_index = 0, 0
    while done < s.iters and timers:
        chunk = min(per_round, s.iters - done)
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            if name not in timers:
                continue
            try:
                stats[name].extend(timers[name].run(chunk))
            except Exception as error:  # noqa: BLE001
                status = "OOM" if is_oom(error) else "FAILED"
                rows[name].update(status=status, note=f"during timing: {str(error).splitlines()[0][:200]}")
                del timers[name]
                _free_memory(device)
        done += chunk
        round_index += 1
    # The ceiling after them, in a pass of its own: timed in the rounds, this power-hungry GEMM pulled the H100's
    # clock down (mean 1905 -> 1868 MHz, SW power cap) and made triton 5-8% slower at qwen3 T=16384, 2% at T=4096.
    ceiling_stats = _time_ceiling(s, tokens, loads.experts_hit, weights, rows) if s.bmm_ceiling and timers else None
    for name, timer in timers.items():
        stats[name].cuda_graph = timer.graphs is not None
        stats[name].graph_calls = timer.graph_calls
        _fill_timing(rows[name], stats[name], tokens)
        if s.profile_dir:
            path = Path(s.profile_dir) / f"{scenario}_T{tokens}_{name}.json"
            _profile(timer.fn, inputs[0], path, device)
    if ceiling_stats is not None and ceiling_stats.times_ms:
        for row in rows.values():
            row["ceiling_bmm_ms"] = ceiling_stats.mean
            if row["status"] == "OK" and row["latency_mean_ms"] > 0:
                row["pct_ceiling_bmm"] = 100.0 * ceiling_stats.mean / row["latency_mean_ms"]
    del timers
    _free_memory(device)

    baseline = rows.get(s.baseline) if s.baseline else None
    if baseline is not None and baseline["status"] == "OK":
        for row in rows.values():
            if row["status"] == "OK" and row["latency_mean_ms"] > 0:
                row["speedup"] = baseline["latency_mean_ms"] / row["latency_mean_ms"]
    if progress:
        progress(f"{scenario} T={tokens}")
    return [rows[name] for name in s.impls]


def _time_ceiling(s: BenchSettings, tokens: int, experts_hit: int, weights: dict, rows: dict) -> TimingStats:
    """``s.iters`` timed calls of the cuBLAS ceiling (``tilemoe.bench.ceiling``) after ``s.warmup`` others; no times
    at T = 0, or when it fails: every row's note then says why, and the implementations' rows stand."""
    graph_calls = s.graph_calls if tokens <= GRAPH_CALLS_MAX_TOKENS else 1
    try:
        ceiling = bmm_ceiling(s.config, tokens, experts_hit, weights, dtype=s.dtype, device=s.device)
        if ceiling is None:
            return TimingStats()
        timer = Timer(ceiling.fn, [None], device=s.device, cuda_graph=s.cuda_graph, graph_calls=graph_calls)
        timer.warmup(s.warmup)
        if timer.note and s.device.type == "cuda":  # e.g. not capturable: its times would not be like the others'
            _note_all(rows, f"bmm ceiling: {timer.note}")
        return timer.run(s.iters)
    except Exception as error:  # noqa: BLE001 - the ceiling is extra information, never a reason to stop
        why = "out of memory" if is_oom(error) else f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        _note_all(rows, f"bmm ceiling not timed ({why})")
        return TimingStats()
    finally:
        _free_memory(s.device)


def _note_all(rows: dict, text: str) -> None:
    for row in rows.values():
        row["note"] = f"{row['note']}; {text}" if row["note"] else text


def make_bench_weights(s: BenchSettings) -> dict:
    """Expert weights (``tilemoe.testing.make_weights``); in layer scope also "router_weight" [E, H] in the
    bench dtype and "correction_bias" [E] (or None), drawn after the experts' so those stay the same."""
    gen = torch.Generator().manual_seed(s.seed)
    weights = make_weights(s.config, dtype=s.dtype, device=s.device, generator=gen)
    if s.timed_scope == "layer":
        weights.update(make_router_weights(s.config, dtype=s.dtype, device=s.device, generator=gen))
    return weights


def run_bench(
    s: BenchSettings,
    roofline: Roofline,
    *,
    progress: Callable[[str], None] | None = None,
    on_rows: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Every (scenario, tokens) in order; returns all rows (see ``COLUMNS``).

    Raises ValueError for an unknown ``s.timed_scope``; RuntimeError when a layer-scope router fails to
    reproduce a scenario's routing (a bug, not a slow implementation).
    """
    if s.timed_scope not in TIMED_SCOPES:
        raise ValueError(f"timed_scope: expected one of {TIMED_SCOPES}, got {s.timed_scope!r}")
    weights = make_bench_weights(s)
    rows: list[dict] = []
    for scenario in s.scenarios:
        for tokens in s.num_tokens:
            case_rows = run_case(s, scenario, tokens, weights, roofline, progress)
            rows.extend(case_rows)
            if on_rows:
                on_rows(case_rows)
    return rows
