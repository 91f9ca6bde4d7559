r"""``tilemoe bench``: compare MoE implementations on one layer, per routing scenario and token count.

Each timed call is the full layer by default (``--timed-scope layer``: router GEMM + routing + routed experts);
``--timed-scope experts`` times the routed experts alone, routing done before the timed region.

    tilemoe bench                                   # CPU: a scaled-down qwen3-30b-a3b; GPU: the real one
    tilemoe bench --model qwen3-30b-a3b --dtype bf16 --impl grouped torch_grouped_mm triton \
        --num-tokens 1 16 128 1024 4096 --cuda-graph --output-file out/h100-bench-qwen3 --output-format all
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

import torch

from tilemoe.bench.options import (
    add_model_device_flags,
    config_summary,
    resolve_config,
    resolve_device,
    resolve_dtype,
    timing_defaults,
)
from tilemoe.bench.scenarios import SCENARIOS, load_trace
from tilemoe.config import MoEConfig
from tilemoe.impls import all_impls, available_impls, get_impl, resolve_impl
from tilemoe.ops.act_and_mul import triton_kernels_available

DEFAULT_SCENARIOS = ["random", "balanced", "imbalanced"]
GPU_TOKENS = [1, 16, 128, 1024, 4096]
CPU_TOKENS = [1, 16, 64]
OUTPUT_FORMATS = ("csv", "markdown", "json", "both", "all")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark MoE implementations layer by layer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_device_flags(parser)
    g = parser.add_argument_group("what to run")
    g.add_argument("--impl", nargs="+", default=None, help="implementations (default: the fastest here + grouped)")
    g.add_argument("--baseline", default=None, help="implementation the speedups are relative to")
    g.add_argument("--num-tokens", nargs="+", type=int, default=None, help="default 1 16 128 1024 4096 on GPU")
    g.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=None, help="default random balanced imbalanced")
    g.add_argument("--imbalance-factor", type=float, default=3.0, help="target max_load/avg_load (imbalanced)")
    g.add_argument("--zipf-alpha", type=float, default=1.2)
    g.add_argument("--routing-trace", default=None, help="replay top-k ids from a .pt/.npy/.json [T, K] file")
    g.add_argument(
        "--timed-scope",
        choices=("layer", "experts"),
        default="layer",
        help="layer: router GEMM + routing + experts in each timed call (default); experts: the routed experts "
        "only, routing done before timing (single-device runs; the expert-parallel bench keeps its own timing)",
    )
    g.add_argument(
        "--bmm-ceiling",
        action="store_true",
        help="also time cuBLAS batched GEMMs of the layer's two expert GEMMs (balanced rows; no routing, gather, "
        "activation or combine) after the implementations: columns ceiling_bmm_ms, pct_ceiling_bmm",
    )
    add_distributed_flags(parser)
    o = parser.add_argument_group("output")
    o.add_argument("--output-format", choices=OUTPUT_FORMATS, default="both")
    o.add_argument("--output-file", default=None, help="base path; files are written only when given")
    o.add_argument("--plot", action="store_true", help="PNG per scenario: latency and TFLOP/s vs tokens")
    o.add_argument("--profile", action="store_true", help="one torch.profiler Chrome trace per case and impl")
    o.add_argument("--profile-dir", default="tilemoe-profile")
    parser.set_defaults(run=run)
    return parser


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    d = parser.add_argument_group("expert parallelism")
    d.add_argument("--ep-size", type=int, default=1)
    d.add_argument("--tp-size", type=int, default=None, help="devices in all (default ep_size); tp = tp_size // ep")
    d.add_argument("--nnodes", type=int, default=1)
    d.add_argument("--node-rank", type=int, default=0)
    d.add_argument("--dist-init-addr", default=None, help="host:port of rank 0")
    d.add_argument("--nproc-per-node", type=int, default=None)
    d.add_argument(
        "--fused-variants",
        nargs="+",
        default=None,
        metavar="FIELD=VALUE[,...]",
        help="with --ep-size and --impl ... fused: also time the fused path with these FusedTiles fields replaced, "
        "e.g. tma=1 num_put=128 tma=1,put_split=4 (rows fused[...] and fused[...]-graph)",
    )


def validate_parallel(args: argparse.Namespace, config: MoEConfig, device: torch.device) -> None:
    """Check the distributed flags; sets ``args.tp_size`` (default ep_size) and ``args.tp_actual``.

    Raises ValueError with the messages the issue names.
    """
    ep = args.ep_size
    if ep < 1:
        raise ValueError(f"ep_size: expected >= 1, got {ep}")
    e = config.num_experts
    if e % ep:
        valid = ", ".join(str(d) for d in range(1, e + 1) if e % d == 0)
        raise ValueError(f"num_experts ({e}) must be divisible by ep_size ({ep}): valid ep sizes are {valid}")
    tp = args.tp_size if args.tp_size is not None else ep
    if tp < 1 or tp % ep:
        raise ValueError(f"tp_size: expected a positive multiple of ep_size ({ep}), got {tp}")
    if device.type == "cuda":
        count = torch.cuda.device_count() * max(1, args.nnodes)
        if tp > count:
            raise ValueError(f"tp_size exceeds device count: tp_size {tp} > {count} CUDA devices")
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"node_rank: expected 0 <= node_rank < nnodes ({args.nnodes}), got {args.node_rank}")
    args.tp_size = tp
    args.tp_actual = tp // ep


def distributed_requested(args: argparse.Namespace) -> bool:
    return args.ep_size > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_distributed_bench(args: argparse.Namespace, config: MoEConfig) -> int:
    try:
        from tilemoe.bench.distributed_runner import run_distributed
    except ModuleNotFoundError as error:
        if error.name != "tilemoe.bench.distributed_runner":
            raise
        raise RuntimeError(
            "expert-parallel benchmark not available: tilemoe.bench.distributed_runner is not in this checkout "
            f"(ep_size={args.ep_size}, WORLD_SIZE={os.environ.get('WORLD_SIZE', '1')})"
        ) from None
    return int(run_distributed(args, config) or 0)


def default_impls(device: torch.device) -> list[str]:
    """The fastest implementation available on ``device``, plus level 4 (``grouped``).

    On CPU, Triton-kernel implementations run only in the interpreter (a test tool, thousands of times slower
    than the kernels), so there the default is the fastest PyTorch implementation.
    """
    if device.type == "cpu":
        candidates = [
            i
            for i in all_impls()
            if not i.distributed and i.available(device) and i.is_available is not triton_kernels_available
        ]
        best = max(candidates, key=lambda i: (i.auto_priority, -(i.level or 0)))
        names = [best.name]
    else:
        names = [resolve_impl("auto", device).name]
    if "grouped" not in names and get_impl("grouped").available(device):
        names.append("grouped")
    return names


def check_impl_names(names: list[str], device: torch.device) -> list[str]:
    known = {i.name for i in all_impls()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"--impl: unknown implementation(s) {unknown}; available on {device.type}: {available_impls(device)} "
            f"(all registered: {sorted(known)})"
        )
    return list(dict.fromkeys(names))


@contextmanager
def progress_bar(total: int, enabled: bool = True):
    """Yields a callback advancing a progress bar (rich when installed, on stderr)."""
    try:
        from rich.progress import Progress
    except ImportError:
        Progress = None
    if Progress is None or not enabled:
        yield lambda desc: None
        return
    with Progress(transient=True) as bar:
        task = bar.add_task("bench", total=total)
        yield lambda desc: bar.update(task, advance=1, description=desc)


def build_settings(args: argparse.Namespace, command: str = "bench"):  # noqa: ARG001
    """Resolve every flag into (BenchSettings, header dict)."""
    from tilemoe.bench.report import environment
    from tilemoe.bench.runner import BenchSettings

    device = resolve_device(args)
    dtype = resolve_dtype(args, device)
    config, model, note = resolve_config(args, device)
    validate_parallel(args, config, device)
    warmup, iters = timing_defaults(args, device)
    tokens = args.num_tokens or (GPU_TOKENS if device.type == "cuda" else CPU_TOKENS)
    if any(t < 0 for t in tokens):
        raise ValueError(f"--num-tokens: expected counts >= 0, got {tokens}")
    trace = load_trace(args.routing_trace) if getattr(args, "routing_trace", None) else None
    scenarios = getattr(args, "scenarios", None) or (["trace"] if trace is not None else DEFAULT_SCENARIOS)
    timed_scope = getattr(args, "timed_scope", "experts")  # commands without the flag (journey) time the experts
    if "trace" in scenarios and trace is None:
        raise ValueError("--scenarios: 'trace' needs --routing-trace FILE")
    graph_calls = getattr(args, "graph_calls", 1)
    if graph_calls < 1:
        raise ValueError(f"--graph-calls: expected a count >= 1, got {graph_calls}")
    settings = BenchSettings(
        config=config,
        impls=[],
        num_tokens=list(tokens),
        scenarios=list(scenarios),
        device=device,
        dtype=dtype,
        model=model,
        imbalance_factor=getattr(args, "imbalance_factor", 3.0),
        zipf_alpha=getattr(args, "zipf_alpha", 1.2),
        trace=trace,
        seed=args.seed,
        warmup=warmup,
        iters=iters,
        rounds=args.rounds,
        cuda_graph=args.cuda_graph,
        graph_calls=graph_calls,
        ep_size=args.ep_size,
        tp_size=args.tp_size,
        timed_scope=timed_scope,
        bmm_ceiling=getattr(args, "bmm_ceiling", False),
    )
    header = {**environment(device), "model": model, "dtype": str(dtype).replace("torch.", "")}
    if note:
        header["note"] = note
    header["config"] = config_summary(config)
    header["timing"] = {"warmup": warmup, "iters": iters, "rounds": args.rounds, "cuda_graph": args.cuda_graph}
    if args.cuda_graph:
        header["timing"]["graph_calls"] = graph_calls
    if hasattr(args, "timed_scope"):
        header["timing"]["timed_scope"] = timed_scope
    if settings.bmm_ceiling:
        header["timing"]["bmm_ceiling"] = True
    return settings, header


def run(args: argparse.Namespace) -> int:
    from tilemoe.bench.report import print_console, write_outputs
    from tilemoe.bench.roofline import get_roofline
    from tilemoe.bench.runner import run_bench

    try:
        settings, header = build_settings(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"tilemoe bench: error: {error}", file=sys.stderr)
        return 2
    if distributed_requested(args):
        return run_distributed_bench(args, settings.config)
    if getattr(args, "fused_variants", None):
        print("tilemoe bench: error: --fused-variants: only with --ep-size N > 1 (the fused EP path)", file=sys.stderr)
        return 2
    try:
        impls = check_impl_names(args.impl or default_impls(settings.device), settings.device)
        if args.baseline is not None:
            check_impl_names([args.baseline], settings.device)
    except ValueError as error:
        print(f"tilemoe bench: error: {error}", file=sys.stderr)
        return 2
    baseline = args.baseline or ("grouped" if "grouped" in impls else impls[0])
    if baseline not in impls:
        impls.append(baseline)
    settings.impls, settings.baseline = impls, baseline
    if args.profile:
        settings.profile_dir = args.profile_dir
    header["implementations"] = ", ".join(impls)
    header["baseline"] = baseline
    roofline = get_roofline(settings.device, settings.dtype)
    header["roofline"] = f"copy {roofline.copy_gbps:.1f} GB/s, matmul {roofline.matmul_tflops:.2f} TFLOP/s (measured)"
    if args.verbose:
        for key, value in header.items():
            print(f"{key}: {value}", file=sys.stderr)

    def show(rows):
        if args.verbose:
            for r in rows:
                print(
                    f"  {r['scenario']} T={r['num_tokens']} {r['implementation']}: {r['status']} "
                    f"{r['latency_mean_ms']:.4g} ms {r['note']}",
                    file=sys.stderr,
                )

    total = len(settings.scenarios) * len(settings.num_tokens)
    with progress_bar(total, enabled=sys.stderr.isatty()) as advance:
        rows = run_bench(settings, roofline, progress=advance, on_rows=show)
    if "note" in header:
        print(header["note"])
    title = f"tilemoe bench: {settings.model} on {header['device']}, {header['dtype']}, timed: {settings.timed_scope}"
    print_console(rows, title=title)
    if args.output_file:
        for path in write_outputs(rows, header, args.output_file, args.output_format):
            print(f"wrote {path}")
    if args.plot:
        from tilemoe.bench.plots import write_plots

        for path in write_plots(rows, args.output_file or "tilemoe-bench"):
            print(f"wrote {path}")
    if args.profile:
        print(f"profiler traces in {settings.profile_dir}/ (open in https://ui.perfetto.dev)")
    return 0
