"""GEMM 1's sorted copy of x, row by row against token by token: CUDA-graph replays (ten calls a graph) in turn.

    PYTHONPATH=src python3 bench/sorted_copy_probe.py [--points gpt-oss-120b:16384 mixtral-8x7b:4096 ...]

For each point (model:T, random routing, the table entry's block_m) the alignment is made once, then
``_sorted_rows`` times each form (``SORTED_ROWS_BY_TOKEN_MIN_BYTES`` None, then 0, read at capture); the two copies
are checked equal on every row in use. A development tool behind ``SORTED_ROWS_BY_TOKEN_MIN_BYTES``.
"""

from __future__ import annotations

import argparse
import functools

import torch
import triton
from ncu_probe import point_inputs  # bench/, beside this file

import tilemoe.ops._fused_experts_launch as launch_module
from tilemoe.bench.timing import capture_graph, graph_us_in_turn
from tilemoe.ops.align import align_capacity, moe_align


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", nargs="+", default=["gpt-oss-120b:16384", "mixtral-8x7b:4096"])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    for point in args.points:
        p = point_inputs(point)  # x, random routing, the table entry on this GPU (ncu_probe.py)
        x, ids, config, block_m = p.x, p.topk_ids, p.config, p.entry.block_m
        align = moe_align(ids, config.num_experts, block_m)
        capacity = align_capacity(ids.numel(), config.num_experts, block_m)
        copy = functools.partial(launch_module._sorted_rows, x, align, capacity, config.top_k)
        graphs, outs = [], []
        for min_bytes in (None, 0):
            launch_module.SORTED_ROWS_BY_TOKEN_MIN_BYTES = min_bytes
            graph, out = capture_graph(copy, 10)
            graphs.append((graph, 10))
            outs.append(out)
        us = graph_us_in_turn(graphs, args.rounds)
        used = int(align.num_padded)
        same = torch.equal(outs[0][:used], outs[1][:used])
        mb = x.numel() * x.element_size() / 1e6
        print(f"## {point} (x {mb:.0f} MB, {used} rows): row by row {us[0]:.1f} us, token by token "
              f"{us[1]:.1f} us ({us[1] / us[0]:.3f}x), {'equal' if same else 'DIFFERENT'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
