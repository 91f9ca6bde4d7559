"""The flat routing kernel by tokens a program: CUDA-graph replays (20 calls a graph) in turn, float32 logits.

    PYTHONPATH=src python3 bench/route_program_probe.py [--points qwen3-30b-a3b:16384 ...] [--tokens 1 2 4 8]

For each point (model:T, the logits router_logits_fast writes above T = 1024) ``route_fast`` with every program
routing 1, 2, 4 ... tokens (``tilemoe.ops.route``'s ROUTE_TOKENS_FORCED, read at capture), each result checked equal
to the one-token form. A development tool behind ``route_tokens_per_program``'s rule.

    PYTHONPATH=src python3 bench/route_program_probe.py --against OLD/_route.py [--points ...]

instead times ``route_fast`` (at the rule's tokens a program) with this tree's kernels and with those of another
``_route.py`` (a Triton kernel file from ``git show REV:src/tilemoe/ops/_kernels/_route.py``, loaded under its own
module name, the launchers this tree's), in turn: a kernel change A/B in one process; ids checked equal, weights
within float32 rounding (the two files may sum in different orders).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util

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
    parser.add_argument("--against", metavar="ROUTE_PY", help="another _route.py, timed in turn with this tree's")
    args = parser.parse_args(argv)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    if args.against:
        return _against(args.against, args.points, args.rounds)
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


def _against(path: str, points: list[str], rounds: int) -> int:
    import tilemoe.ops._kernels._route as kernels

    spec = importlib.util.spec_from_file_location("route_kernels_against", path)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    forms = {"this": kernels._route_kernel, "against": other._route_kernel}
    for point in points:
        name, tokens = point.split(":")
        config = MoEConfig.from_pretrained(name)
        logits = torch.randn(int(tokens), config.num_experts, generator=torch.Generator().manual_seed(0)).to("cuda")
        graphs, outs = [], []
        for kernel in forms.values():  # the launcher imports _route_kernel from the module when it runs
            kernels._route_kernel = kernel
            graph, out = capture_graph(functools.partial(route_module.route_fast, logits, config), 20)
            graphs.append((graph, 20))
            outs.append(out)
        kernels._route_kernel = forms["this"]
        us = graph_us_in_turn(graphs, rounds)
        (w_this, i_this), (w_other, i_other) = outs
        assert torch.equal(i_this, i_other), point
        torch.testing.assert_close(w_this, w_other, rtol=1e-6, atol=1e-7)
        apart = (w_this != w_other).float().mean().item()
        print(f"## {point} E={config.num_experts} K={config.top_k}: this {us[0]:.2f} us, against {us[1]:.2f} us "
              f"({us[0] / us[1]:.3f}x); weights apart in the last bits: {apart:.2%}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
