"""The flat routing kernel by tokens a program: CUDA-graph replays (20 calls a graph) in turn, float32 logits.

    PYTHONPATH=src python3 bench/route_program_probe.py [--points qwen3-30b-a3b:16384 ...] [--tokens 1 2 4 8]

For each point (model:T, the logits router_logits_fast writes above T = 1024) ``route_fast`` with every program
routing 1, 2, 4 ... tokens (``tilemoe.ops.route``'s ROUTE_TOKENS_FORCED, read at capture), each result checked equal
to the one-token form. A development tool behind ``route_tokens_per_program``'s rule.
"""

from __future__ import annotations

import argparse
import functools

import torch
import triton

import tilemoe.ops.route as route_module
from tilemoe.bench.timing import capture_graph, graph_us_in_turn
from tilemoe.config import MoEConfig

POINTS = ["qwen3-30b-a3b:4096", "qwen3-30b-a3b:16384", "gpt-oss-120b:16384", "mixtral-8x7b:16384",
          "qwen3-30b-a3b:1024"]  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", nargs="+", default=POINTS)
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    for point in args.points:
        name, tokens = point.split(":")
        config = MoEConfig.from_pretrained(name)
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(int(tokens), config.num_experts, generator=gen).to("cuda")
        graphs, outs = [], []
        for per_program in args.tokens:
            route_module.ROUTE_TOKENS_FORCED = per_program
            graph, out = capture_graph(functools.partial(route_module.route_fast, logits, config), 20)
            graphs.append((graph, 20))
            outs.append(out)
        us = graph_us_in_turn(graphs, args.rounds)
        for out in outs:  # the last replay's outputs
            assert torch.equal(out[0], outs[0][0]) and torch.equal(out[1], outs[0][1]), point
        print(f"## {point} E={config.num_experts} K={config.top_k}: "
              + ", ".join(f"{n} a program {t:.1f} us" for n, t in zip(args.tokens, us)))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
