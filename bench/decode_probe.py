"""The decode path's GEMM 2 at small T: per (slot, column block) plus the slot sum, against per (token, column
block) walking the K picks, for several tiles; fused_experts alone, CUDA-graph replays of 20 calls, the variants
in turn within each round. Outputs are checked against the table config's.

    PYTHONPATH=src python3 bench/decode_probe.py [--points qwen3-30b-a3b:1 ...] [--warm-only]
    PYTHONPATH=src python3 bench/decode_probe.py --routing [--points ...]

``--routing``: the layer after the router GEMM three ways, in turn: the routing kernel then ``fused_experts``; the
decode GEMM 1 routing its own slots (``fused_experts_from_logits``); ``fused_experts`` alone on a given routing (the
floor the routing costs over).

A development tool (it backs ``tilemoe.ops._fused_experts_launch.DECODE_GEMM2_PER_SLOT``); claims come from
``tilemoe bench``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import torch

import tilemoe.ops._fused_experts_launch as launch
import tilemoe.ops.fused_experts as fe
from tilemoe.bench.timing import capture_graph, graph_us_in_turn
from tilemoe.config import MoEConfig
from tilemoe.testing import make_input, make_routing, make_weights
from tilemoe.tuning import MoEShape, pick_config

CALLS = 20  # per graph
POINTS = ["qwen3-30b-a3b:1", "deepseek-v2-lite:1", "gpt-oss-120b:1", "qwen3-30b-a3b:2", "qwen3-30b-a3b:4"]
# (GEMM 2 per slot?, block_n2, block_k2, num_warps2, num_stages2) on top of the table's decode GEMM 1 tiles
VARIANTS = [
    (True, 32, 256, 4, 3),
    (False, 16, 256, 4, 3),
    (False, 16, 512, 4, 2),
    (False, 16, 256, 2, 4),
    (False, 32, 256, 4, 3),
    (True, 16, 256, 4, 3),
    (True, 64, 128, 4, 4),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="*", default=POINTS)
    parser.add_argument("--warm-only", action="store_true")
    parser.add_argument("--routing", action="store_true", help="time where the routing runs (see the docstring)")
    args = parser.parse_args()
    if args.routing:
        return routing_probe(args.points)
    default = launch.DECODE_GEMM2_PER_SLOT
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}")
    print("point\t" + "\t".join(f"{'slot' if s else 'tok'}{n}x{k}w{w}s{st}" for s, n, k, w, st in VARIANTS))
    for point in args.points:
        t, config, gen, w, x = _point_inputs(point)
        tw, ti = make_routing(t, config, device="cuda", generator=gen)
        shape = MoEShape(t, config.num_experts, config.top_k, config.hidden_size, config.intermediate_size)
        base = dataclasses.replace(pick_config(shape, torch.bfloat16, torch.cuda.get_device_name()), decode=True)
        graphs, outs = [], []
        for per_slot, bn2, bk2, w2, s2 in VARIANTS:
            cfg = dataclasses.replace(base, block_n2=bn2, block_k2=bk2, num_warps2=w2, num_stages2=s2)
            launch.DECODE_GEMM2_PER_SLOT = per_slot  # read at launch: the capture below records this form

            fn = functools.partial(fe.fused_experts, x, w["w13"], w["w2"], tw, ti, config=config, b13=w["b13"],
                                   b2=w["b2"], kernel_config=cfg)  # fmt: skip

            outs.append(fn())
            graphs.append((capture_graph(fn, CALLS)[0], CALLS))
        launch.DECODE_GEMM2_PER_SLOT = default
        if args.warm_only:
            continue
        for out in outs[1:]:
            torch.testing.assert_close(out.float(), outs[0].float(), atol=2e-2, rtol=2e-2)
        times = graph_us_in_turn(graphs, 15)
        print(point + "\t" + "\t".join(f"{us:.1f}" for us in times), flush=True)


def _point_inputs(point: str):
    """(T, config, generator, bf16 weights, bf16 input) on the GPU for a point 'model:T'."""
    name, tokens = point.rsplit(":", 1)
    t = int(tokens)
    config = MoEConfig.from_pretrained(name)
    gen = torch.Generator().manual_seed(t)
    w = make_weights(config, dtype=torch.bfloat16, device="cuda")
    x = make_input(t, config, dtype=torch.bfloat16, device="cuda", generator=gen)
    return t, config, gen, w, x


def routing_probe(points: list[str]) -> None:
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}; us per layer without the router GEMM")
    print("point\troute+experts\tfrom_logits\texperts alone")
    for point in points:
        fns = _routing_forms(point)
        outs = [fn() for fn in fns]
        for out in outs[1:]:
            torch.testing.assert_close(out.float(), outs[0].float(), atol=2e-2, rtol=2e-2)
        times = graph_us_in_turn([(capture_graph(fn, CALLS)[0], CALLS) for fn in fns], 25)
        print(point + "\t" + "\t".join(f"{us:.1f}" for us in times), flush=True)


def _routing_forms(point: str) -> list:
    from tilemoe.ops.route import route_fast

    t, config, gen, w, x = _point_inputs(point)
    logits = torch.randn(t, config.num_experts, generator=gen).to("cuda", torch.bfloat16)
    given_weights, given_ids = route_fast(logits, config)
    args = (x, w["w13"], w["w2"])
    kwargs = dict(config=config, b13=w["b13"], b2=w["b2"])

    def route_then_experts():
        weights, ids = route_fast(logits, config)
        return fe.fused_experts(*args, weights, ids, **kwargs)

    return [
        route_then_experts,
        lambda: fe.fused_experts_from_logits(*args, logits, **kwargs)[0],
        lambda: fe.fused_experts(*args, given_weights, given_ids, **kwargs),
    ]


if __name__ == "__main__":
    main()
