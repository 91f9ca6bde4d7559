"""What moe_align costs at the layer's sizes, and by chunk size: CUDA-graph replays in turn, then its kernels.

    PYTHONPATH=src python3 bench/align_probe.py [--points qwen3-30b-a3b:1024 ...] [--chunks 64 128 256]
        [--no-fused]

For each point (model:T, random routing, the block_m of its table entry): ``moe_align_triton`` at each chunk
size, with its scan launch and without it (``fused_scan``, unless --no-fused), every result checked equal to
``moe_align_torch``;
ten calls per graph, graphs replayed in turn; then the torch profiler's per-kernel time of one call of each. A
development tool behind ``ALIGN_CHUNK_BY_SLOTS`` and ``FUSED_SCAN_MAX_ENTRIES``.
"""

from __future__ import annotations

import argparse
import functools

import torch
import triton
from kernel_probe import kernel_times  # bench/, beside this file

from tilemoe.bench.scenarios import make_routing_for
from tilemoe.bench.timing import capture_graph, graph_us_in_turn
from tilemoe.config import MoEConfig
from tilemoe.ops.align import moe_align_torch, moe_align_triton
from tilemoe.tuning import MoEShape, pick_config


def probe(name: str, tokens: int, chunks: list[int], rounds: int, fused_too: bool) -> None:
    config = MoEConfig.from_pretrained(name)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, config.hidden_size, generator=gen).to("cuda", torch.bfloat16)
    ids = make_routing_for("random", tokens, config, generator=gen, x=x, device="cuda")[1].to(torch.int32).contiguous()
    shape = MoEShape(tokens, config.num_experts, config.top_k, config.hidden_size, config.intermediate_size)
    block_m = pick_config(shape, torch.bfloat16, torch.cuda.get_device_name()).block_m
    want = moe_align_torch(ids, config.num_experts, block_m)
    runs = {}
    for chunk in chunks:
        for fused in (False, True) if fused_too else (False,):
            fn = functools.partial(moe_align_triton, ids, config.num_experts, block_m, chunk=chunk, fused_scan=fused)
            got = fn()
            same = all(torch.equal(getattr(got, f), getattr(want, f)) for f in (
                "sorted_ids", "expert_ids", "counts", "num_padded", "expert_starts"))  # fmt: skip
            label = f"c{chunk}{'+fused' if fused else ''}"
            print(f"  {label}: {'equal to moe_align_torch' if same else 'DIFFERS from moe_align_torch'}")
            runs[label] = fn
    graphs = [(capture_graph(fn, 10)[0], 10) for fn in runs.values()]
    us = graph_us_in_turn(graphs, rounds)
    print(f"## {name} T={tokens} S={ids.numel()} E={config.num_experts} block_m={block_m}: "
          + ", ".join(f"{c} {t:6.1f} us" for c, t in zip(runs, us)))  # fmt: skip
    for label, fn in runs.items():
        times = kernel_times(fn)
        parts = ", ".join(f"{k.split('_kernel')[0][-12:]} {v:.1f}" for k, v in times.items())
        print(f"  {label} kernels: {parts}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", nargs="+", default=["qwen3-30b-a3b:1024", "deepseek-v2-lite:1024",
                                                        "qwen3-30b-a3b:4096", "mixtral-8x7b:1024"])  # fmt: skip
    parser.add_argument("--chunks", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--no-fused", action="store_true", help="only the three-launch form (no fused_scan)")
    args = parser.parse_args(argv)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    for point in args.points:
        name, tokens = point.split(":")
        probe(name, int(tokens), args.chunks, args.rounds, not args.no_fused)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
