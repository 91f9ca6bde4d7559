"""The combine of ``fused_experts`` at large T: per-slot rows summed over K afterwards (deterministic=True) against
the atomic sums in GEMM 2's epilogue (deterministic=False); fused_experts alone on the table's config, CUDA-graph
replays, the two in turn within each round; each time with the relative error of its output against the
deterministic one's.

    PYTHONPATH=src python3 bench/combine_probe.py [--points qwen3-30b-a3b:4096 ...] [--warm-only]
    PYTHONPATH=src python3 bench/combine_probe.py --routing imbalanced ...

At commit 3a27bec it also timed two columns per reduction (inline PTX) and sums in a float32 buffer: both lost at
every point (bench/NOTES.md, version 8) and are gone. A development tool; claims come from ``tilemoe bench``.
"""

from __future__ import annotations

import argparse
import functools
import math

import torch
from decode_probe import _point_inputs  # bench/ is on sys.path when this script runs
from triton.runtime.errors import OutOfResources

import tilemoe.ops.fused_experts as fe
from tilemoe.bench.scenarios import make_routing_for
from tilemoe.bench.timing import capture_graph, graph_us_in_turn

POINTS = [
    "qwen3-30b-a3b:1024",
    "qwen3-30b-a3b:4096",
    "qwen3-30b-a3b:16384",
    "deepseek-v2-lite:4096",
    "deepseek-v2-lite:16384",
    "gpt-oss-120b:16384",
    "mixtral-8x7b:4096",
]
VARIANTS = [("slots+sum", True), ("atomic", False)]  # (name, deterministic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="*", default=POINTS)
    parser.add_argument("--routing", default="random", help="tilemoe.bench.scenarios name (random, imbalanced)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warm-only", action="store_true")
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}; us per fused_experts call, {args.routing}")
    print("point\t" + "\t".join(name for name, *_ in VARIANTS))
    for point in args.points:
        t, config, gen, w, x = _point_inputs(point)
        tw, ti = make_routing_for(args.routing, t, config, generator=gen, device="cuda")
        calls = max(1, min(20, 20_000 // t))
        graphs, outs, ran = [], [], []
        for _, deterministic in VARIANTS:
            fn = functools.partial(fe.fused_experts, x, w["w13"], w["w2"], tw, ti, config=config, b13=w["b13"],
                                   b2=w["b2"], deterministic=deterministic)  # fmt: skip
            try:
                outs.append(fn())
            except OutOfResources as error:  # the table's tiles with this epilogue need more shared memory
                print(f"# {point} {VARIANTS[len(ran)][0]}: {str(error)[:90]}", flush=True)
                ran.append(False)
                continue
            ran.append(True)
            graphs.append((capture_graph(fn, calls)[0], calls))
        if args.warm_only:
            continue
        ref = outs[0].float() if ran[0] else None  # the deterministic output, when it ran
        errors = iter(float((o.float() - ref).norm() / ref.norm()) if ref is not None else math.nan for o in outs)
        times = iter(graph_us_in_turn(graphs, args.rounds))
        cells = [f"{next(times):.1f} ({next(errors):.0e})" if ok else "-" for ok in ran]
        print(point + "\t" + "\t".join(cells), flush=True)
        del graphs, outs, w


if __name__ == "__main__":
    main()
