"""``tilemoe tune``: search fused-MoE kernel configs on this GPU and write the winners into the package's tables.

    tilemoe tune --model qwen3-30b-a3b [--num-tokens 1 8 ... 16384] [--dtype bf16] [--write | --output FILE]

For each token count (one per shape bucket, ``tilemoe.tuning.token_bucket``) every candidate config is timed
on random routing (CUDA-graph replay for T <= 256, else ``triton.testing.do_bench`` median); the fastest,
checked against the heuristic's output, goes into the table of this device (``tilemoe.tuning.table_path``),
merged with what the table already holds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tilemoe.tuning import KernelConfig, MoEShape, heuristic_config, shape_key, table_path

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _cfg(bm, bn1, bk1, w1, s1, bn2, bk2, w2, s2, g=8) -> KernelConfig:
    return KernelConfig(
        block_m=bm, block_n1=bn1, block_k1=bk1, group_m1=g, num_warps1=w1, num_stages1=s1,
        block_n2=bn2, block_k2=bk2, group_m2=g, num_warps2=w2, num_stages2=s2,
    )  # fmt: skip


# (block_m, GEMM1: block_n, block_k, warps, stages, GEMM2: block_n, block_k, warps, stages)
CANDIDATES = [
    _cfg(16, 32, 128, 4, 4, 32, 128, 4, 4, g=1),
    _cfg(16, 64, 128, 4, 4, 64, 128, 4, 4, g=1),
    _cfg(16, 32, 256, 4, 3, 64, 256, 4, 3, g=1),
    _cfg(32, 64, 128, 4, 4, 64, 128, 4, 4, g=4),
    _cfg(32, 64, 64, 4, 4, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4, 128, 64, 4, 4),
    _cfg(64, 128, 64, 4, 3, 128, 64, 4, 3),
    _cfg(64, 64, 128, 4, 3, 64, 128, 4, 3),
    _cfg(128, 64, 64, 8, 4, 128, 64, 8, 4),
    _cfg(128, 128, 64, 8, 3, 256, 64, 8, 3),
    _cfg(128, 64, 64, 4, 4, 128, 64, 4, 4),
    _cfg(128, 128, 32, 8, 4, 128, 64, 4, 4),
    _cfg(128, 128, 64, 8, 4, 256, 64, 8, 4),
    _cfg(128, 128, 64, 8, 3, 256, 64, 8, 3, g=16),
    _cfg(64, 128, 64, 4, 4, 256, 64, 8, 3),
    _cfg(128, 64, 64, 8, 3, 256, 64, 8, 4),
]


def graph_seconds(fn, calls: int = 10, replays: int = 10) -> float:
    """Median time of one call, from replays of a CUDA graph holding ``calls`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / calls)
    return sorted(times)[len(times) // 2] * 1e-3


def bench_seconds(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e-3


def tune_model(model: str, token_counts: list[int], dtype: torch.dtype, verbose: bool = True) -> dict[str, dict]:
    """Best config per shape key for ``model`` on the current GPU: {key: KernelConfig dict}."""
    from tilemoe.bench.scenarios import make_routing_for
    from tilemoe.config import MoEConfig
    from tilemoe.ops.fused_experts import fused_experts
    from tilemoe.testing import make_weights, relative_error

    config = MoEConfig.from_pretrained(model)
    device = torch.device("cuda")
    e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
    gen = torch.Generator().manual_seed(0)
    w13, w2, b13, b2 = make_weights(config, dtype=dtype, device=device).values()
    table = {}
    for t in token_counts:
        x = torch.randn(t, h, generator=gen).to(device, dtype)
        tw, ti = make_routing_for("random", t, config, generator=gen, x=x, device=device)
        tw, ti = tw.float().contiguous(), ti.to(torch.int32).contiguous()
        shape = MoEShape(t, e, config.top_k, h, i)
        base = heuristic_config(shape, dtype)
        ref = fused_experts(x, w13, w2, tw, ti, config=config, b13=b13, b2=b2, kernel_config=base).float()
        timer = graph_seconds if t <= 256 else bench_seconds
        results = []
        for cand in [base, *[c for c in CANDIDATES if c != base]]:

            def run(cand=cand, x=x, tw=tw, ti=ti):
                return fused_experts(x, w13, w2, tw, ti, config=config, b13=b13, b2=b2, kernel_config=cand)

            err = relative_error(run(), ref)
            if err > 2e-2:
                raise RuntimeError(f"tune: {model} T={t} {cand}: relative error {err:.2e} vs the heuristic config")
            results.append((timer(run), cand))
        best_s, best = min(results, key=lambda r: r[0])
        base_s = results[0][0]
        table[shape_key(shape, dtype)] = best.to_dict()
        if verbose:
            print(
                f"{model} T={t}: best {best_s * 1e6:.1f} us (heuristic {base_s * 1e6:.1f} us, "
                f"{base_s / best_s:.2f}x) {best}",
                flush=True,
            )
    return table


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("tune", help="search fused-MoE kernel configs on this GPU, write tuning tables")
    parser.add_argument("--model", nargs="+", required=True, help="preset names or config.json paths")
    parser.add_argument("--num-tokens", nargs="+", type=int, default=[1, 8, 64, 256, 1024, 4096, 16384])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--write", action="store_true", help="merge the results into the package's table")
    parser.add_argument("--output", default=None, help="write the table JSON here instead")
    parser.set_defaults(run=run)


def run(args) -> int:
    if not torch.cuda.is_available():
        print("tilemoe tune: needs a CUDA GPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    path = table_path(name) if args.output is None else Path(args.output)
    data = json.loads(path.read_text()) if path.exists() else {"device": name, "configs": {}}
    for model in args.model:
        data["configs"].update(tune_model(model, args.num_tokens, DTYPES[args.dtype]))
        if args.write or args.output:  # after each model, so a cut-off run keeps what it found
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    if args.write or args.output:
        print(f"wrote {len(data['configs'])} configs to {path}")
    return 0
