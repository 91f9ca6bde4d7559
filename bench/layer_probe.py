"""Where the bench's full layer spends the time that the expert kernels do not: the layer against its parts.

    PYTHONPATH=src python3 bench/layer_probe.py [--points qwen3-30b-a3b:1024 deepseek-v2-lite:1024 ...]

For each point (model:T) and routing (``--scenarios``, random by default; imbalanced is the bench's factor 3.0):
CUDA-graph replays, in turn, of
  * ``layer``   the bench's timed layer, built as the bench builds it (``tilemoe.bench.runner``'s
                ``make_bench_weights`` and ``layer_inputs``: its steered router, so the routing kernel gives the
                scenario's ids; ``layer_fn`` around the triton implementation),
  * ``experts`` the triton implementation alone on the same ids (what ``tilemoe tune`` times),
  * ``router``  the router GEMM and the routing alone,
one call per graph (as the bench replays T >= 1024) and ten calls per graph (no graph launch between calls);
then the torch profiler's per-kernel time of one layer call (``kernel_probe.kernel_times``). A development tool:
the numbers behind claims come from ``tilemoe bench``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import torch
import triton
from kernel_probe import kernel_times  # bench/, beside this file

from tilemoe.bench.layer import layer_fn, layer_router_logits, route_fn
from tilemoe.bench.runner import BenchSettings, layer_inputs, make_bench_weights
from tilemoe.bench.scenarios import make_routing_for
from tilemoe.bench.timing import capture_graph, graph_us_in_turn
from tilemoe.config import MoEConfig
from tilemoe.impls import get_impl


@dataclasses.dataclass
class BenchLayer:
    """The bench's timed layer of one point (one routing, bf16, the triton implementation), as the bench builds it:
    ``layer()`` runs it once; x steered so the routing kernel gives the scenario's ids ``ti`` (weights ``tw``)."""

    config: MoEConfig
    weights: dict
    x: torch.Tensor
    tw: torch.Tensor
    ti: torch.Tensor
    impl: object
    layer: Callable[[], torch.Tensor]


def bench_layer(name: str, tokens: int, scenario: str = "random") -> BenchLayer:
    """``BenchLayer`` of model ``name`` at ``tokens`` tokens under ``scenario``'s routing on CUDA (shared by the probes
    that time the layer)."""
    config = MoEConfig.from_pretrained(name)
    device = torch.device("cuda")
    s = BenchSettings(config=config, impls=["triton"], num_tokens=[tokens], scenarios=[scenario], device=device,
                      dtype=torch.bfloat16, model=name, timed_scope="layer")  # fmt: skip
    weights = make_bench_weights(s)  # the experts', then the bench's steered router
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, config.hidden_size, generator=gen).to(device, s.dtype)
    tw, ti = make_routing_for(
        scenario, tokens, config, generator=gen, x=x, device=device, imbalance_factor=s.imbalance_factor
    )
    # x steered so the layer's routing gives the scenario's ids (checked), as the bench's layer scope runs it
    ((x, _, ti),), tw, pass_through, _ = layer_inputs(s, scenario, [x], tw, ti, weights)
    impl = get_impl("triton")
    layer = layer_fn(impl.fn, weights, config, pass_through=pass_through, from_logits=impl.from_logits)
    return BenchLayer(config, weights, x, tw, ti, impl, lambda: layer((x, None, ti)))


def probe(name: str, tokens: int, rounds: int, scenario: str = "random") -> None:
    b = bench_layer(name, tokens, scenario)
    config, weights, x, tw, ti, impl = b.config, b.weights, b.x, b.tw, b.ti, b.impl
    device = x.device
    router, bias = weights["router_weight"], weights["correction_bias"]
    w13, w2, b13, b2 = (weights[k] for k in ("w13", "w2", "b13", "b2"))
    parts = {
        "layer": b.layer,
        "experts": lambda: impl.fn(x, w13, w2, tw, ti, config=config, b13=b13, b2=b2),
        "router": lambda: route_fn(device)(layer_router_logits(x, router), config, correction_bias=bias),
    }
    print(f"\n## {name} T={tokens} (E={config.num_experts}, K={config.top_k}), {scenario} routing")
    for calls in (1, 10):
        graphs = [(capture_graph(fn, calls)[0], calls) for fn in parts.values()]
        us = graph_us_in_turn(graphs, rounds)
        print(f"  {calls:2d} call(s) per graph: " + ", ".join(f"{k} {v:8.1f} us" for k, v in zip(parts, us)))
    times = kernel_times(parts["layer"])
    print(f"  kernels of one layer call, {sum(times.values()):.1f} us in all:")
    for kernel, us in times.items():
        print(f"    {us:8.1f}  {kernel}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", nargs="+", default=["qwen3-30b-a3b:1024", "deepseek-v2-lite:1024"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--scenarios", nargs="+", choices=["random", "imbalanced"], default=["random"])
    args = parser.parse_args(argv)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    for point in args.points:
        name, tokens = point.split(":")
        for scenario in args.scenarios:
            probe(name, int(tokens), args.rounds, scenario)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
