"""Where the bench's full layer spends the time that the expert kernels do not: the layer against its parts.

    PYTHONPATH=src python3 bench/layer_probe.py [--points qwen3-30b-a3b:1024 deepseek-v2-lite:1024 ...]

For each point (model:T, random routing): CUDA-graph replays, in turn, of
  * ``layer``   the bench's timed layer (router GEMM x @ router^T, ``route_fast``, ``fused_experts``),
  * ``experts`` ``fused_experts`` alone on the same ids (what ``tilemoe tune`` times),
  * ``router``  the router GEMM and the routing alone,
one call per graph (as the bench replays T >= 1024) and ten calls per graph (no graph launch between calls);
then the torch profiler's per-kernel time of one layer call. A development tool: the numbers behind claims come
from ``tilemoe bench``.
"""

from __future__ import annotations

import argparse
import collections
import functools

import torch
import triton

from tilemoe.bench.scenarios import make_routing_for
from tilemoe.bench.timing import capture_graph, graph_us_in_turn
from tilemoe.config import MoEConfig
from tilemoe.ops.fused_experts import fused_experts
from tilemoe.ops.route import route_fast
from tilemoe.testing import make_weights


def kernel_us(fn, calls: int = 5) -> dict[str, float]:
    """Mean CUDA microseconds per call of every kernel ``fn`` launches (torch profiler)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:60]] += event.device_time / calls
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def probe(name: str, tokens: int, rounds: int) -> None:
    config = MoEConfig.from_pretrained(name)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    w13, w2, b13, b2 = make_weights(config, dtype=dtype, device="cuda").values()
    x = torch.randn(tokens, config.hidden_size, generator=gen).to("cuda", dtype)
    router = (torch.randn(config.num_experts, config.hidden_size, generator=gen) * config.hidden_size**-0.5).to(
        "cuda", dtype
    )
    tw, ti = make_routing_for("random", tokens, config, generator=gen, x=x, device="cuda")
    tw, ti = tw.float().contiguous(), ti.to(torch.int32).contiguous()
    kw = dict(config=config, b13=b13, b2=b2)

    def routed():
        return route_fast(torch.nn.functional.linear(x, router), config)

    def layer():
        weights, ids = routed()
        return fused_experts(x, w13, w2, weights, ids, **kw)

    parts = {"layer": layer, "experts": functools.partial(fused_experts, x, w13, w2, tw, ti, **kw), "router": routed}
    print(f"\n## {name} T={tokens} (E={config.num_experts}, K={config.top_k}), random routing")
    for calls in (1, 10):
        graphs = [(capture_graph(fn, calls)[0], calls) for fn in parts.values()]
        us = graph_us_in_turn(graphs, rounds)
        print(f"  {calls:2d} call(s) per graph: " + ", ".join(f"{k} {v:8.1f} us" for k, v in zip(parts, us)))
    times = kernel_us(layer)
    print(f"  kernels of one layer call, {sum(times.values()):.1f} us in all:")
    for kernel, us in times.items():
        print(f"    {us:8.1f}  {kernel}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", nargs="+", default=["qwen3-30b-a3b:1024", "deepseek-v2-lite:1024"])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    for point in args.points:
        name, tokens = point.split(":")
        probe(name, int(tokens), args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
