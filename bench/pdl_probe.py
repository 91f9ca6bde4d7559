"""Programmatic dependent launch, on and off: the full layer (the bench's router GEMM, routing kernel, fused
experts) replayed from CUDA graphs, the two variants in turn within each round, their outputs compared bitwise.

    PYTHONPATH=src python3 bench/pdl_probe.py [--points qwen3-30b-a3b:1 deepseek-v2-lite:8 ...] [--warm-only]

A development tool (its numbers say where PDL pays); the numbers that back claims come from ``tilemoe bench``.
"""

from __future__ import annotations

import argparse
import os

import torch

from tilemoe.bench.layer import layer_router_logits
from tilemoe.bench.timing import capture_graph, graph_us_in_turn
from tilemoe.config import MoEConfig
from tilemoe.ops._launch import PDL_ENV, pdl_enabled
from tilemoe.ops.fused_experts import fused_experts
from tilemoe.ops.route import route_triton
from tilemoe.testing import make_input, make_weights

DEFAULT_POINTS = [
    "qwen3-30b-a3b:1",
    "qwen3-30b-a3b:8",
    "qwen3-30b-a3b:64",
    "qwen3-30b-a3b:1024",
    "deepseek-v2-lite:1",
    "deepseek-v2-lite:8",
    "deepseek-v2-lite:1024",
    "gpt-oss-120b:1",
    "mixtral-8x7b:1",
    "mixtral-8x7b:64",
    "qwen3-30b-a3b:16384",
]


def layer(config: MoEConfig, num_tokens: int):
    gen = torch.Generator().manual_seed(num_tokens)
    weights = make_weights(config, dtype=torch.bfloat16, device="cuda")
    router = (torch.randn(config.num_experts, config.hidden_size, generator=gen) * 0.05).to("cuda", torch.bfloat16)
    x = make_input(num_tokens, config, dtype=torch.bfloat16, device="cuda", generator=gen)

    def fn():
        logits = layer_router_logits(x, router)
        topk_weights, topk_ids = route_triton(logits, config)
        return fused_experts(x, weights["w13"], weights["w2"], topk_weights, topk_ids, config=config,
                             b13=weights["b13"], b2=weights["b2"])  # fmt: skip

    return fn


def capture(fn, pdl: bool, calls: int):
    """The graph (PDL on or off: read at launch, so the capture records it) and its last output."""
    os.environ[PDL_ENV] = "1" if pdl else "0"
    return capture_graph(fn, calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="*", default=DEFAULT_POINTS)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--profile", action="store_true", help="also print the layer's kernels (torch profiler)")
    parser.add_argument("--warm-only", action="store_true", help="compile both variants (parallel cache warm-up)")
    args = parser.parse_args()
    available = pdl_enabled(torch.device("cuda"))
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} pdl available {available}")
    print("point\tpdl_off_us\tpdl_on_us\ton/off\tbitwise_equal")
    for point in args.points:
        name, tokens = point.rsplit(":", 1)
        config = MoEConfig.from_pretrained(name)
        fn = layer(config, int(tokens))
        calls = max(1, min(20, 4096 // max(1, int(tokens))))
        graphs = {pdl: capture(fn, pdl, calls) for pdl in (False, True)}
        os.environ[PDL_ENV] = "0"  # the profile below: with PDL a kernel's time would include its wait
        if args.warm_only:
            continue
        for graph, _ in graphs.values():
            graph.replay()
        torch.cuda.synchronize()
        equal = torch.equal(graphs[False][1], graphs[True][1])
        off, on = graph_us_in_turn([(graphs[False][0], calls), (graphs[True][0], calls)], args.rounds)
        print(f"{point}\t{off:.1f}\t{on:.1f}\t{on / off:.3f}\t{equal}", flush=True)
        if args.profile:
            from kernel_probe import kernel_times  # bench/ is this script's directory

            for kernel, us in kernel_times(fn).items():
                print(f"    {us:8.1f} us  {kernel}")
        del graphs, fn
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
