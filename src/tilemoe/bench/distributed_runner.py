"""``tilemoe bench --ep-size N``: the expert-parallel benchmark, one process per rank.

Launch: under torchrun (WORLD_SIZE > 1 in the environment) every process runs its rank here; otherwise
``run_distributed`` starts ``--nproc-per-node`` local processes (default ep_size // nnodes) itself, with
ranks ``node_rank * nproc + i`` of ``nnodes * nproc`` and ``--dist-init-addr host:port`` as the rendezvous
(required when nnodes > 1; a FileStore in a temporary directory on one host). NCCL on CUDA, gloo on CPU.

Each rank holds its own T tokens (``--num-tokens`` is per rank) and E/ep experts. Per scenario and T, rows:
    single   every rank runs all E experts on its own tokens (the one-GPU baseline), best local impl;
             single-graph: the same in a CUDA graph (with --cuda-graph); speedup_vs_single divides by the faster
    epmoe    all_to_all_single dispatch, local experts, all-to-all combine (dynamic, dropless)
    epmoe-graph (with --cuda-graph) the fixed-capacity epmoe captured in a CUDA graph
    fused    (with --impl ... fused, CUDA) device-initiated puts into symmetric memory, GEMMs waiting on
             per-block flags, outputs stored straight back (fused_backend); fused-graph: the same in a CUDA graph
             (with --cuda-graph)
    fused[F=V,...] / fused[F=V,...]-graph  (with --fused-variants F=V,...) the fused rows again with FusedTiles
             fields replaced on top of what fused_tiles_for picked (e.g. fused[tma=1], fused[num_put=128]),
             timed in the same run; variants that keep the buffer-sizing fields (block_m, block_n2, put_split)
             run on the plain fused layer's buffers (``FusedDispatcher.using_tiles``), others get their own layer
Every row is checked against the float64 reference on a sample of this rank's rows first (FAILED otherwise).
Latency: per call, CUDA events (or wall clock on CPU), median over iterations; the reported value is the
slowest rank's (all_reduce MAX), printed on rank 0 only.

Extra columns: dispatch_combine_ms / dispatch_combine_gbps (dispatch then combine with identity experts;
bytes = rows this rank sends to other ranks and gets back, times H * element size), nccl_a2a_gbps (a plain
all_to_all_single of the same bytes, the bar to beat), compute_ms (local experts alone on the received rows),
overlap_efficiency = (comm + compute - total) / min(comm, compute) (0: no overlap, 1: the shorter one hidden),
rank_imbalance (max over ranks of the pairs each rank's experts got / mean).
Fused rows (symmetric memory from TILEMOE_SYMM_MEM_BACKEND: cuda, the default, or nvshmem): dispatch_gbps /
combine_gbps (a communication-only fused forward: the same puts, flags and waits, no GEMM; dispatch = layout +
puts until every row arrived, combine = stores back + the wait and sum; bytes = rows this rank sends to other
ranks times H * element size, the slowest rank's), dispatch_combine_* of that forward, nccl_a2a_gbps copied
from the epmoe row (the same bytes); the note names the tiles the fused layer chose (``fused_tiles_for``).
The -graph rows and variants that change only GEMM fields (``GEMM_ONLY_FIELDS``: the communication-only
forward runs no GEMM) copy these columns from their eager / plain row instead of measuring them again.
Fair comparison: every timed fused communication-only forward and every timed NCCL all_to_all_single of
nccl_a2a_gbps starts the same way (``_aligned_start``: barrier, a one-element all_reduce the stream waits for,
~1 ms of GPU sleep while the host enqueues), so neither counts a peer's launch skew as transfer time.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

from tilemoe.config import MoEConfig

EP_COLUMNS = (
    "dispatch_combine_ms",
    "dispatch_combine_gbps",
    "nccl_a2a_gbps",
    "compute_ms",
    "overlap_efficiency",
    "rank_imbalance",
    "speedup_vs_single",
    "dispatch_gbps",
    "combine_gbps",
)
SAMPLE_ROWS = 64  # rows per rank compared with the float64 reference
SUPPORTED = ("epmoe", "fused")
FUSED_COMM_COLUMNS = ("dispatch_combine_ms", "dispatch_combine_gbps", "dispatch_gbps", "combine_gbps", "nccl_a2a_gbps")
# FusedTiles fields the communication-only fused forward does not use (it runs no GEMM)
GEMM_ONLY_FIELDS = ("tma", "block_n1", "block_k1", "num_stages1", "block_k2", "num_stages2")


def parse_fused_variants(specs: list[str] | None, impls: list[str] | None) -> list[tuple[str, dict]]:
    """``--fused-variants`` -> [(label, FusedTiles overrides)], labels canonical (``fused_ops.overrides_label``),
    in the order given. Raises ValueError naming the flag: a malformed or unknown field, a value FusedTiles
    refuses, a variant given twice, or variants without ``--impl ... fused``."""
    from tilemoe.distributed.fused_ops import overrides_label, parse_tiles_overrides

    if not specs:
        return []
    if "fused" not in (impls or []):
        raise ValueError(f"--fused-variants: needs --impl ... fused (got --impl {' '.join(impls or ['epmoe'])})")
    out: list[tuple[str, dict]] = []
    for spec in specs:
        overrides = parse_tiles_overrides(spec, "--fused-variants")
        label = overrides_label(overrides)
        if label in (known for known, _ in out):
            raise ValueError(f"--fused-variants: {label!r} given twice")
        out.append((label, overrides))
    return out


def _payload(args: argparse.Namespace, config: MoEConfig) -> dict:
    from tilemoe.bench.cli import CPU_TOKENS, DEFAULT_SCENARIOS, GPU_TOKENS
    from tilemoe.bench.options import resolve_device, resolve_dtype, timing_defaults

    device = resolve_device(args)
    warmup, iters = timing_defaults(args, device)
    return {
        "config": config.to_dict(),
        "device_type": device.type,
        "dtype": str(resolve_dtype(args, device)).replace("torch.", ""),
        "tokens": list(args.num_tokens or (GPU_TOKENS if device.type == "cuda" else CPU_TOKENS)),
        "scenarios": list(args.scenarios or DEFAULT_SCENARIOS),
        "impls": list(args.impl or ["epmoe"]),
        "model": args.model or "manual",
        "seed": args.seed,
        "warmup": warmup,
        "iters": iters,
        "cuda_graph": bool(args.cuda_graph),
        "imbalance_factor": args.imbalance_factor,
        "zipf_alpha": args.zipf_alpha,
        "output_file": args.output_file,
        "output_format": args.output_format,
        "ep_size": args.ep_size,
        "tp_size": args.tp_size or args.ep_size,  # devices in all
        "verbose": bool(args.verbose),
        # the fused rows' symmetric memory: "cuda" (default) or "nvshmem" (set before any buffer exists)
        "symm_mem_backend": os.environ.get("TILEMOE_SYMM_MEM_BACKEND", "cuda"),
        "fused_variants": parse_fused_variants(getattr(args, "fused_variants", None), args.impl),
        "argv": list(sys.argv),
    }


def run_distributed(args: argparse.Namespace, config: MoEConfig) -> int:
    """Run the EP benchmark (see the module docstring); returns the exit code (0 ok, 1 a rank failed, 2 bad flags)."""
    from tilemoe.distributed.spawn import spawn_ranks

    tp = args.tp_size or args.ep_size  # devices in all: ep_size EP ranks, each split over tp // ep_size ranks
    bad = [name for name in (args.impl or []) if name not in SUPPORTED]
    if bad:
        print(
            f"tilemoe bench: error: --impl with --ep-size: expected some of {list(SUPPORTED)}, got {bad} ",
            file=sys.stderr,
        )
        return 2
    try:
        payload = _payload(args, config)
    except ValueError as error:
        print(f"tilemoe bench: error: {error}", file=sys.stderr)
        return 2
    backend = "nccl" if payload["device_type"] == "cuda" else "gloo"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:  # launched by torchrun
        from tilemoe.distributed.runtime import init_distributed

        init_distributed(backend)
        import torch.distributed as dist

        try:
            return _bench_rank(dist.get_rank(), dist.get_world_size(), payload)
        finally:
            dist.destroy_process_group()
    nnodes = max(1, args.nnodes)
    nproc = args.nproc_per_node or max(1, tp // nnodes)
    world = nproc * nnodes
    if world != tp:
        print(
            f"tilemoe bench: error: nnodes * nproc_per_node ({nnodes} * {nproc}) must equal ep_size ({tp})",
            file=sys.stderr,
        )
        return 2
    init_method = None
    if args.dist_init_addr:
        init_method = "tcp://" + args.dist_init_addr.removeprefix("tcp://")
    elif nnodes > 1:
        print("tilemoe bench: error: --dist-init-addr host:port is required with --nnodes > 1", file=sys.stderr)
        return 2
    fork_ok = payload["device_type"] == "cpu" and sys.platform.startswith("linux")
    outcomes = spawn_ranks(
        _bench_rank,
        nproc,
        (payload,),
        backend=backend,
        init_method=init_method,
        rank_offset=args.node_rank * nproc,
        total_world=world,
        start_method="forkserver" if fork_ok else "spawn",
        timeout_s=float(os.environ.get("TILEMOE_EP_TIMEOUT_S", "120")),
        join_timeout_s=float(os.environ.get("TILEMOE_EP_JOIN_TIMEOUT_S", "3600")),
    )
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        print(f"tilemoe bench: rank {o.rank} failed: {o.error}", file=sys.stderr)
    if failed:
        return 1
    return max(int(o.value or 0) for o in outcomes)


# ---------------------------------------------------------------------------------------------- per rank
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, device: torch.device, warmup: int, iters: int, *, aligned: bool = False) -> list[float]:
    """Per-call times in ms (CUDA events on GPU, perf_counter on CPU). aligned (GPU): each timed call starts after
    ``_aligned_start``, for communication steps whose time a peer's launch skew would otherwise inflate."""
    token = torch.zeros(1, device=device) if aligned else None
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if aligned:
            _aligned_start(device, token)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


# GPU cycles each rank idles after the aligning all_reduce (~1 ms at H200 clocks): longer than the host takes to
# enqueue the timed step, so both GPUs start it from the all_reduce's end, not from their host's launch
ALIGN_SLEEP_CYCLES = 2_000_000


def _aligned_start(device: torch.device, token: torch.Tensor) -> None:
    """Line up the ranks' GPUs before a timed communication step: a host barrier, a one-element all_reduce
    (the current stream waits for it), then a GPU sleep on the current stream while the host enqueues the
    step. Whatever is recorded next on the stream starts within a few us on every GPU, so a peer's launch
    skew is not counted as transfer time."""
    import torch.distributed as dist

    dist.barrier()
    dist.all_reduce(token)
    if device.type == "cuda" and hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(ALIGN_SLEEP_CYCLES)


def _slowest(value: float, device: torch.device) -> float:
    """Max of ``value`` over all ranks (nan stays nan)."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _graph(fn, device: torch.device):
    """Capture ``fn`` in a CUDA graph after warm-up on a side stream; returns the replay callable."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: NCCL's watchdog thread queries events while this thread captures
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    return graph.replay


def _single_baseline(case_rows: dict) -> float:
    """p50 ms of the one-GPU baseline: the faster of ``single`` and ``single-graph`` among the rows that passed
    (``single``'s own value, maybe NaN, when neither did)."""
    times = [
        case_rows[name]["latency_p50_ms"]
        for name in ("single", "single-graph")
        if name in case_rows and case_rows[name]["status"] == "OK" and case_rows[name]["latency_p50_ms"] > 0
    ]
    return min(times) if times else case_rows["single"]["latency_p50_ms"]


def _tiles_note(t) -> str:
    """A fused layer's FusedTiles in one short string: block_m, GEMM 1 / GEMM 2 tiles (n x k), warps, stages,
    put programs (then " tma" and " split<S>" where those are on)."""
    return (
        f"tiles bm{t.block_m} g1 {t.block_n1}x{t.block_k1} w{t.num_warps1} s{t.num_stages1} "
        f"g2 {t.block_n2}x{t.block_k2} w{t.num_warps2} s{t.num_stages2} put{t.num_put}"
        + (" tma" if t.tma else "")
        + (f" split{t.put_split}" if t.put_split > 1 else "")
    )


def _variant_rows(base, variants: list[tuple[str, dict]], build) -> list[tuple[str, object, object]]:
    """(row name, layer, tiles) per fused variant: tiles = the base layer's with the overrides; layer = the base
    layer when no buffer-sizing field changes (its forwards then run under ``using_tiles``), else
    ``build(tiles)`` (a new layer, or the exception building it raised)."""
    import dataclasses

    from tilemoe.distributed.fused_ops import BUFFER_FIELDS

    own = base.fused.state.tiles
    out = []
    for label, overrides in variants:
        tiles = dataclasses.replace(own, **overrides)
        if all(getattr(tiles, f) == getattr(own, f) for f in BUFFER_FIELDS):
            out.append((f"fused[{label}]", base, tiles))
        else:
            out.append((f"fused[{label}]", build(tiles), tiles))
    return out


def _fused_call(layer, tiles, x, tw, ti):
    """One fused forward of ``layer``; under ``using_tiles(tiles)`` when tiles differ from the layer's own."""
    if tiles is None or tiles == layer.fused.tiles:
        return layer.forward_routed(x, tw, ti)
    with layer.fused.using_tiles(tiles):
        return layer.forward_routed(x, tw, ti)


def _raise(error: Exception):
    raise RuntimeError(f"could not build the layer: {type(error).__name__}: {error}")


def _weights(config: MoEConfig, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """The same random expert weights on every rank (same seed, same device type); drawn on the device, since
    drawing a real model's experts on the CPU takes seconds."""
    from tilemoe.testing import make_weights

    if device.type != "cuda":
        return make_weights(config, dtype=dtype, device=device, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator(device).manual_seed(seed)
    e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
    return {
        "w13": (torch.randn(e, config.w13_rows, h, device=device, generator=g) * h**-0.5).to(dtype),
        "w2": (torch.randn(e, h, i, device=device, generator=g) * i**-0.5).to(dtype),
        "b13": None,
        "b2": None,
    }


def _bench_rank(rank: int, world: int, p: dict) -> int:
    import torch.distributed as dist

    from tilemoe.bench.scenarios import make_routing_for
    from tilemoe.distributed import ExpertParallelMoE, best_local_impl, expert_shard
    from tilemoe.distributed.layer import tp_shard
    from tilemoe.functional import experts_forward
    from tilemoe.impls.reference import reference_experts_fp64
    from tilemoe.testing import assert_close

    config = MoEConfig(**p["config"])
    if p["device_type"] == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dtype = getattr(torch, p["dtype"])
    weights = _weights(config, dtype, device, p["seed"])
    local_impl = best_local_impl(device)

    tp_actual = max(1, world // p["ep_size"])

    def ep_layer_for(max_tokens: int | None, backend: str = "epmoe", tiles=None) -> ExpertParallelMoE:
        extra = {"symm_mem_backend": p["symm_mem_backend"], "fused_tiles": tiles} if backend == "fused" else {}
        layer = ExpertParallelMoE(
            config, None, backend, dtype=dtype, device=device, max_tokens=max_tokens, tp_size=tp_actual, **extra
        )
        local = layer.local_experts
        shard = tp_shard(
            config, tp_actual, layer.tp_rank, expert_shard(weights["w13"], local), expert_shard(weights["w2"], local)
        )
        with torch.no_grad():
            layer.w13.copy_(shard["w13"])
            layer.w2.copy_(shard["w2"])
        return layer

    ep_layer = ep_layer_for(None)
    fused_layers: dict[int, ExpertParallelMoE] = {}  # symmetric buffers sized per token count
    fused_tiles: dict[int, str] = {}  # the tiles each T's fused layer chose (into the rows' note)
    variant_layers: dict = {}  # FusedTiles -> a variant's own layer (buffer-sizing fields changed), per T
    fused_row_layers: dict[str, object] = {}  # fused row name -> the layer it runs on (check(), comm columns)
    fused_row_tiles: dict[str, object] = {}  # fused variant row name -> its FusedTiles
    graph_layers: dict[int, ExpertParallelMoE] = {}  # fixed capacity T * K per peer: sized per token count
    rows: list[dict] = []
    elem = torch.empty((), dtype=dtype).element_size()
    h = config.hidden_size
    for scenario in p["scenarios"]:
        for tokens in p["tokens"]:
            g = torch.Generator().manual_seed(p["seed"] * 1000 + rank * 7 + tokens)
            x = torch.randn(tokens, h, generator=g).to(device, dtype)
            # one routing generator for all ranks: the same router (random) and the same hot experts
            # (imbalanced) everywhere, so an imbalanced scenario loads some ranks more than others
            shared = torch.Generator().manual_seed(p["seed"] * 1000 + tokens + 17)
            tw, ti = make_routing_for(
                scenario,
                tokens,
                config,
                generator=shared,
                x=x,
                device=device,
                imbalance_factor=p["imbalance_factor"],
                zipf_alpha=p["zipf_alpha"],
            )
            sample = torch.linspace(0, max(tokens - 1, 0), min(tokens, SAMPLE_ROWS)).round().long().unique().to(device)
            ref = reference_experts_fp64(
                x[sample], weights["w13"], weights["w2"], tw[sample], ti[sample], config=config
            )

            fns = {
                "single": lambda x=x, tw=tw, ti=ti: experts_forward(
                    x, weights["w13"], weights["w2"], tw, ti, config=config, impl=local_impl
                ),
                "epmoe": lambda x=x, tw=tw, ti=ti: ep_layer.forward_routed(x, tw, ti),
            }
            fused_row_layers.clear()
            fused_row_tiles.clear()
            if "fused" in p["impls"] and device.type == "cuda" and tokens > 0 and tp_actual == 1:
                if tokens not in fused_layers:
                    fused_layers.clear()
                    variant_layers.clear()
                    try:
                        fused_layers[tokens] = ep_layer_for(tokens, backend="fused")
                    except Exception as error:  # noqa: BLE001  (reported in the row by the gate below)
                        fused_layers[tokens] = error
                f = fused_layers[tokens]
                if isinstance(f, Exception):
                    fns["fused"] = lambda f=f: _raise(f)
                else:
                    fns["fused"] = lambda x=x, tw=tw, ti=ti, f=f: f.forward_routed(x, tw, ti)
                    fused_row_layers["fused"] = f
                    fused_tiles[tokens] = _tiles_note(f.fused.tiles)
                    if p["cuda_graph"]:
                        fns["fused-graph"] = fns["fused"]
                        fused_row_layers["fused-graph"] = f

                    def build(tiles, tokens=tokens):
                        if tiles not in variant_layers:
                            try:
                                variant_layers[tiles] = ep_layer_for(tokens, backend="fused", tiles=tiles)
                            except Exception as error:  # noqa: BLE001  (reported in the row by the gate below)
                                variant_layers[tiles] = error
                        return variant_layers[tiles]

                    for name, layer, tiles in _variant_rows(f, p["fused_variants"], build):
                        if isinstance(layer, Exception):
                            fns[name] = lambda e=layer: _raise(e)
                            continue
                        fns[name] = lambda x=x, tw=tw, ti=ti, v=layer, t=tiles: _fused_call(v, t, x, tw, ti)
                        fused_row_layers[name], fused_row_tiles[name] = layer, tiles
                        if p["cuda_graph"]:
                            fns[f"{name}-graph"] = fns[name]
                            fused_row_layers[f"{name}-graph"], fused_row_tiles[f"{name}-graph"] = layer, tiles
            if p["cuda_graph"] and device.type == "cuda" and tokens > 0:
                fns["single-graph"] = fns["single"]  # eager small-T timings are host-bound: the fair baseline
            if p["cuda_graph"] and device.type == "cuda" and tokens > 0 and tp_actual == 1:
                if tokens not in graph_layers:
                    graph_layers.clear()  # one padded layer at a time: its buffers are ep * T * K rows
                    graph_layers[tokens] = ep_layer_for(tokens)
                fns["epmoe-graph"] = lambda x=x, tw=tw, ti=ti, g=graph_layers[tokens]: g.forward_routed(x, tw, ti)
            case_rows = {}
            for name, fn in fns.items():
                row = _row(p, config, name, scenario, tokens, world)
                try:
                    out = fn()
                    assert_close(out[sample], ref, dtype, name=f"{name} rank {rank}")
                    row["status"] = "OK"
                except Exception as error:  # noqa: BLE001  (a failed row must not leave the other ranks waiting)
                    row["status"], row["note"] = "FAILED", f"{type(error).__name__}: {str(error)[:200]}"
                ok = _slowest(0.0 if row["status"] == "OK" else 1.0, device) == 0.0
                if not ok:
                    row["status"] = "FAILED"
                    case_rows[name] = row
                    continue
                timed = fn
                if name.endswith("-graph"):
                    try:
                        timed = _graph(fn, device)
                        row["cuda_graph"] = True
                    except RuntimeError as error:
                        row["note"] = f"CUDA graph capture failed, timed eagerly: {str(error)[:120]}"
                dist.barrier()
                times = _time_ms(timed, device, p["warmup"], p["iters"])
                if name.startswith("fused"):
                    try:  # a wait that gave up (lost peer) is an error, not a fast row
                        fused_row_layers[name].fused.check()
                    except RuntimeError as error:
                        row["status"], row["note"] = "FAILED", str(error)[:200]
                    if _slowest(0.0 if row["status"] == "OK" else 1.0, device) != 0.0:
                        row["status"] = "FAILED"  # on every rank: the columns below are collective
                median = statistics.median(times)
                row["latency_p50_ms"] = _slowest(median, device)
                row["latency_mean_ms"] = _slowest(statistics.fmean(times), device)
                row["latency_std_ms"] = statistics.pstdev(times) if len(times) > 1 else 0.0
                row["latency_p95_ms"] = _slowest(sorted(times)[int(0.95 * (len(times) - 1))], device)
                row["latency_p99_ms"] = _slowest(sorted(times)[int(0.99 * (len(times) - 1))], device)
                total_tokens = tokens * world
                ms = row["latency_p50_ms"]
                row["throughput_tok_per_sec"] = total_tokens / (ms / 1e3) if ms > 0 else math.nan
                flops = 2 * tokens * config.top_k * (h * config.w13_rows + config.intermediate_size * h)
                row["flops"] = flops
                row["tflops"] = flops / (ms / 1e3) / 1e12 if ms > 0 else math.nan
                case_rows[name] = row
            for name in ("fused", "fused-graph"):
                if name in case_rows and tokens in fused_tiles and not case_rows[name]["note"]:
                    case_rows[name]["note"] = fused_tiles[tokens]
            for name, tiles in fused_row_tiles.items():
                if name in case_rows and not case_rows[name]["note"]:
                    case_rows[name]["note"] = _tiles_note(tiles)
            ep_layer.forward_routed(x, tw, ti)  # the stats below are this input's
            stats = ep_layer.load_stats()
            _comm_columns(p, ep_layer, x, tw, ti, device, elem, case_rows, stats)
            _all_fused_comm_columns(p, case_rows, fused_row_layers, fused_row_tiles, x, tw, ti, device, elem)
            single = _single_baseline(case_rows)
            for row in case_rows.values():
                row["speedup_vs_single"] = single / row["latency_p50_ms"] if row["latency_p50_ms"] > 0 else math.nan
                rows.append(row)
            if p["verbose"] and rank == 0:
                print(
                    f"  {scenario} T={tokens}: "
                    + ", ".join(f"{n} {r['status']} {r['latency_p50_ms']:.4g} ms" for n, r in case_rows.items()),
                    file=sys.stderr,
                )
            if rank == 0:  # files rewritten after every case: a run cut short keeps what it measured
                _report(p, rows, device, console=False)
    if rank == 0:
        _report(p, rows, device)
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


def _comm_columns(p, ep_layer, x, tw, ti, device, elem, case_rows, stats) -> None:
    """dispatch/combine alone, local experts alone, a plain all_to_all of the same bytes; into the epmoe row."""
    import torch.distributed as dist

    d = ep_layer.dispatcher  # over the EP group (the ranks of this tp rank); this rank's own tokens
    world = d.ep_size
    row = case_rows.get("epmoe")
    per_rank = stats["per_rank"]
    mean = sum(per_rank) / len(per_rank) if per_rank else 0
    for r in case_rows.values():
        r["max_load"] = max(stats["per_expert"]) if stats["per_expert"] else 0
        r["min_load"] = min(stats["per_expert"]) if stats["per_expert"] else 0
        r["avg_load"] = sum(stats["per_expert"]) / len(stats["per_expert"])
        r["max_imbalance"] = stats["max_imbalance_expert"]
        r["rank_imbalance"] = max(per_rank) / mean if mean > 0 else 0.0
    if row is None or row["status"] != "OK":
        return
    recv_x, meta, handle = d.dispatch(x, ti, tw)
    remote_rows = sum(n for r, n in enumerate(handle.send_splits) if r != d.rank)
    nbytes = 2 * remote_rows * x.shape[1] * elem
    dist.barrier()
    comm = _time_ms(lambda: d.combine(d.dispatch(x, ti, tw)[0], handle), device, p["warmup"], p["iters"])
    comm_ms = _slowest(statistics.median(comm), device)
    compute = _time_ms(
        lambda: ep_layer.local_experts_forward(recv_x, meta.local_ids, meta.weights), device, p["warmup"], p["iters"]
    )
    compute_ms = _slowest(statistics.median(compute), device)
    # a plain all_to_all_single of the busiest rank's bytes (even splits): the NCCL bar. Every rank must make
    # the same collective calls, so the size is agreed first.
    busiest = int(_slowest(float(remote_rows), device))
    per_peer = -(-busiest // (world - 1)) if world > 1 else 0
    nccl_gbps = math.nan
    if world > 1 and busiest:
        send = torch.empty(per_peer * world, x.shape[1], dtype=x.dtype, device=device)
        recv = torch.empty_like(send)
        # started like the fused path's dispatch and combine (_fused_comm_columns): the same bar, measured alike
        dist.barrier()
        a2a = _time_ms(lambda: dist.all_to_all_single(recv, send, group=d.group), device, p["warmup"], p["iters"],
                       aligned=device.type == "cuda")  # fmt: skip
        a2a_ms = _slowest(statistics.median(a2a), device)
        nccl_gbps = per_peer * (world - 1) * x.shape[1] * elem / (a2a_ms / 1e3) / 1e9
    total = row["latency_p50_ms"]
    row["dispatch_combine_ms"] = comm_ms
    row["dispatch_combine_gbps"] = nbytes / (comm_ms / 1e3) / 1e9 if comm_ms > 0 and nbytes else math.nan
    row["nccl_a2a_gbps"] = nccl_gbps
    row["compute_ms"] = compute_ms
    shorter = min(comm_ms, compute_ms)
    row["overlap_efficiency"] = (
        min(1.0, max(0.0, (comm_ms + compute_ms - total) / shorter)) if shorter > 0 else math.nan
    )
    row["gbps"] = row["dispatch_combine_gbps"]


def _all_fused_comm_columns(p, case_rows, row_layers, row_tiles, x, tw, ti, device, elem) -> None:
    """The fused rows' communication columns: measured for ``fused`` and for each variant whose tiles change
    what the communication-only forward runs; copied into the -graph rows (the same eager measurement) and into
    variants that change GEMM fields only. Every rank takes the same branches (row statuses are agreed)."""
    import dataclasses

    measured: dict[str, str] = {}  # row name -> row whose columns it got
    for name, row in case_rows.items():
        if not name.startswith("fused") or row["status"] != "OK" or name not in row_layers:
            continue
        base = name.removesuffix("-graph")
        source = None
        if base != name and base in measured:
            source = base
        elif name != "fused" and "fused" in measured and base in row_tiles:
            own = row_layers["fused"].fused.tiles if "fused" in row_layers else None
            gemm_only = {f: getattr(own, f) for f in GEMM_ONLY_FIELDS} if own is not None else None
            if own is not None and dataclasses.replace(row_tiles[base], **gemm_only) == own:
                source = "fused"
        if source is not None:
            for column in FUSED_COMM_COLUMNS:
                row[column] = case_rows[source][column]
        else:
            tiles = row_tiles.get(name)
            _fused_comm_columns(p, row_layers[name], x, tw, ti, device, elem, row, tiles=tiles, sweep=name == "fused")
            row["nccl_a2a_gbps"] = case_rows["epmoe"]["nccl_a2a_gbps"]
        measured[name] = source or name


def _fused_comm_columns(p, layer, x, tw, ti, device, elem, row, *, tiles=None, sweep: bool = True) -> None:
    """Dispatch and combine of the fused path alone: communication-only forwards (no GEMM), each started after
    ``_aligned_start`` on every rank (as the NCCL all_to_all of nccl_a2a_gbps is), timed with CUDA events
    between the steps. TILEMOE_EP_NUM_PUT_SWEEP="32 64 128": the same for each number of put programs,
    printed to stderr on rank 0 (a probe; the row keeps the layer's own num_put; only with ``sweep``).
    tiles: a variant's FusedTiles (run under ``using_tiles``), else the layer's own."""
    import contextlib
    import dataclasses

    f = layer.fused
    owner = layer.placement.owner_tensor(device)
    remote = int((owner[ti.reshape(-1).long()] != layer.rank).sum())
    nbytes = remote * x.shape[1] * elem
    token = torch.zeros(1, device=device)

    def measure() -> tuple[float, float]:
        d_ms, c_ms = [], []
        for i in range(p["warmup"] + p["iters"]):
            events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            if i >= p["warmup"]:
                _aligned_start(device, token)
            use = f.using_tiles(tiles) if tiles is not None and tiles != f.tiles else contextlib.nullcontext()
            with use:
                f.forward(x, ti, tw, layer.w13, layer.w2, layer.b13, layer.b2, compute=False, events=events)
            events[2].synchronize()
            if i >= p["warmup"]:
                d_ms.append(events[0].elapsed_time(events[1]))
                c_ms.append(events[1].elapsed_time(events[2]))
        f.check()
        return statistics.median(d_ms), statistics.median(c_ms)

    counts = [int(n) for n in os.environ.get("TILEMOE_EP_NUM_PUT_SWEEP", "").split()] if sweep else []
    if counts:
        own = f.state.tiles
        for n in counts:
            f.state.tiles = dataclasses.replace(f.state.tiles, num_put=n)
            d, c = measure()
            gd = -_slowest(-(nbytes / (d / 1e3) / 1e9) if d > 0 else 0.0, device)
            gc = -_slowest(-(nbytes / (c / 1e3) / 1e9) if c > 0 else 0.0, device)
            if layer.rank == 0:
                print(f"    num_put {n}: dispatch {gd:.4g} GB/s ({d * 1e3:.4g} us), combine {gc:.4g} GB/s "
                      f"({c * 1e3:.4g} us), {nbytes / 1e6:.4g} MB", file=sys.stderr)  # fmt: skip
        f.state.tiles = own
    d, c = measure()
    # the slowest rank's time and the smallest rate (min = -max(-v))
    row["dispatch_combine_ms"] = _slowest(d + c, device)
    row["dispatch_gbps"] = -_slowest(-(nbytes / (d / 1e3) / 1e9) if d > 0 else 0.0, device)
    row["combine_gbps"] = -_slowest(-(nbytes / (c / 1e3) / 1e9) if c > 0 else 0.0, device)
    total = 2 * nbytes / ((d + c) / 1e3) / 1e9 if d + c > 0 else 0.0
    row["dispatch_combine_gbps"] = -_slowest(-total, device)


def _row(p: dict, config: MoEConfig, impl: str, scenario: str, tokens: int, world: int) -> dict:
    from tilemoe.bench.runner import COLUMNS

    row = {k: math.nan for k in COLUMNS + EP_COLUMNS}
    row.update(
        implementation=impl,
        scenario=scenario,
        num_tokens=tokens,
        ep_size=p["ep_size"],
        tp_size=p["tp_size"],
        num_experts=config.num_experts,
        num_experts_per_tok=config.top_k,
        status="OK",
        baseline="single",
        level="",
        cuda_graph=False,
        device=p["device_type"],
        dtype=p["dtype"],
        model=p["model"],
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        activation=config.activation,
        gated=config.gated,
        bytes=math.nan,
        note="",
    )
    return row


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.5g}"
    return str(value)


def _report(p: dict, rows: list[dict], device: torch.device, console: bool = True) -> None:
    """Console table on rank 0; CSV (standard + EP columns) and Markdown when --output-file is given."""
    from tilemoe.bench.report import environment
    from tilemoe.bench.runner import COLUMNS

    for r in rows:
        r["speedup"] = r["speedup_vs_single"]
    show = ("implementation", "scenario", "num_tokens", "status", "latency_p50_ms", "speedup_vs_single",
            "dispatch_combine_gbps", "nccl_a2a_gbps", "dispatch_gbps", "combine_gbps", "compute_ms",
            "overlap_efficiency", "rank_imbalance")  # fmt: skip
    header = environment(device)
    header["command"] = " ".join(p["argv"])
    if any(r["implementation"].startswith("fused") for r in rows):
        header["fused symmetric memory (TILEMOE_SYMM_MEM_BACKEND)"] = p["symm_mem_backend"]
    if p.get("fused_variants"):
        header["fused variants (FusedTiles fields over the tuned ones)"] = "; ".join(
            label for label, _ in p["fused_variants"]
        )
    title = f"tilemoe bench (expert parallel): {p['model']}, ep={p['ep_size']}, {header['device']}, {p['dtype']}"
    table = [list(show)] + [[_fmt(r[k]) for k in show] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(show))]
    if console:
        print(title)
        for line in table:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
    if not p["output_file"]:
        return
    import csv
    from pathlib import Path

    base = Path(p["output_file"])
    if base.suffix in (".csv", ".md", ".json"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    columns = list(COLUMNS) + list(EP_COLUMNS)
    with open(base.with_name(base.name + ".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(r.get(k, "")) for k in columns})
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    lines += [f"- **config**: {p['config']}", f"- **tokens per rank**: {p['tokens']}"]
    tiles = {
        r["num_tokens"]: r["note"] for r in rows if r["implementation"] == "fused" and r["note"].startswith("tiles")
    }
    lines += [f"- **fused tiles, T={t}**: {note[6:]}" for t, note in sorted(tiles.items())] + [""]
    lines += ["| " + " | ".join(show) + " |", "|" + "---|" * len(show)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in show) + " |" for r in rows]
    base.with_name(base.name + ".md").write_text("\n".join(lines) + "\n")
    if console:
        print(f"wrote {base}.csv and {base}.md")
