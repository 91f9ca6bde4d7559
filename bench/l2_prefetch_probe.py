"""Does asking L2 for GEMM 1's first weights while the router runs shorten the memory-bound layer?

    PYTHONPATH=src python3 bench/l2_prefetch_probe.py [--points deepseek-v2-lite:1024 ...] [--plans e12:512 ...]

At the memory-bound points (deepseek-v2-lite / qwen3-30b-a3b T=1024, mixtral-8x7b T = 64-256) the layer streams
its expert weights at ~2.3-2.6 TB/s, but for its first ~15-20 us (router GEMM, routing, align) HBM sits nearly idle.
A small kernel launched first, on the same stream, issues ``cp.async.bulk.prefetch.L2`` for the w13 rows GEMM 1's
first tiles will read (fire and forget: it returns at once, the fills go on under the router), so those tiles start
from L2. Each plan picks the rows and the bytes of each row (its first k steps):

  * ``e<N>:<B>``  experts 0 .. N-1, every w13 row, the first B bytes of each (tiles run expert by expert:
                  expert_groups, or one block an expert),
  * ``c<N>:<B>``  every expert, the w13 rows of the first N column blocks of GEMM 1 (gate and up), first B bytes
                  (tiles by GROUP_M row blocks across experts, mixtral's small T).

CUDA-graph replays (one layer call a graph, the bench's timed layer built as the bench builds it), the plain layer
and each plan in turn, then a check that the output is the same. A development tool: claims come from
``tilemoe bench``. Measured on an H100 in session 23: 1.004-1.018x of the plain layer at every plan and point, the
same at 6 MB as at 35 MB (bench/NOTES.md, version 25; bench/results/session23-probes.md).
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from layer_probe import bench_layer  # bench/, beside this file

from tilemoe.bench.timing import capture_graph, graph_us_in_turn
from tilemoe.config import MoEConfig
from tilemoe.tuning import MoEShape, pick_config

PREFETCH_ROWS = 1024  # rows a program asks for (8 a thread at 4 warps)


@triton.jit
def _prefetch_rows(base_ptr, rows_ptr, num_rows, row_stride, row_bytes, BLOCK: tl.constexpr):
    """One ``cp.async.bulk.prefetch.L2`` of ``row_bytes`` (a multiple of 16) at each listed row of ``base_ptr``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < num_rows
    rows = tl.load(rows_ptr + offs, mask=live, other=0)
    addresses = (base_ptr + rows * row_stride).to(tl.int64, bitcast=True)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
        "=r,l,r,r",
        [addresses, live.to(tl.int32), row_bytes + tl.zeros([BLOCK], dtype=tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


def plan_rows(plan: str, config: MoEConfig, block_n1: int) -> tuple[torch.Tensor, int]:
    """(w13 row indices into w13 viewed as [E * 2I, H], bytes a row) of ``plan``."""
    kind, rest = plan[0], plan[1:]
    count, row_bytes = (int(v) for v in rest.split(":"))
    num_experts, inter = config.num_experts, config.intermediate_size
    rows_per_expert = 2 * inter
    if kind == "e":
        rows = torch.arange(min(count, num_experts) * rows_per_expert)
    elif kind == "c":
        # a column block of GEMM 1: block_n1 gate rows and the same up rows
        cols = torch.arange(min(count * block_n1, inter))
        per_expert = torch.cat([cols, inter + cols])
        rows = (torch.arange(num_experts)[:, None] * rows_per_expert + per_expert[None, :]).flatten()
    else:
        raise SystemExit(f"--plans: expected e<N>:<bytes> or c<N>:<bytes>, got {plan!r}")
    return rows.to(torch.int64), row_bytes


def probe(name: str, tokens: int, plans: list[str], rounds: int) -> None:
    b = bench_layer(name, tokens)
    config, w13, device = b.config, b.weights["w13"], b.x.device
    shape = MoEShape(tokens, config.num_experts, config.top_k, config.hidden_size, config.intermediate_size)
    block_n1 = pick_config(shape, b.x.dtype, torch.cuda.get_device_name()).block_n1
    print(f"\n## {name} T={tokens}: w13 {tuple(w13.shape)} {w13.dtype}, entry block_n1 {block_n1}")
    flat = w13.view(-1, w13.shape[-1])
    fns = {"plain": b.layer}
    for plan in plans:
        rows, row_bytes = plan_rows(plan, config, block_n1)
        rows = rows.to(device)
        row_bytes = min(row_bytes, flat.shape[1] * flat.element_size())
        grid = (triton.cdiv(rows.numel(), PREFETCH_ROWS),)
        mb = rows.numel() * row_bytes / 1e6

        def with_prefetch(rows=rows, row_bytes=row_bytes, grid=grid):
            _prefetch_rows[grid](flat, rows, rows.numel(), flat.stride(0), row_bytes, BLOCK=PREFETCH_ROWS)
            return b.layer()

        fns[f"{plan} ({mb:.1f} MB)"] = with_prefetch
    outs = {k: fn() for k, fn in fns.items()}
    torch.cuda.synchronize()
    for k, out in outs.items():
        if not torch.equal(out, outs["plain"]):
            print(f"  {k}: output differs from the plain layer's (max {(out - outs['plain']).abs().max().item()})")
    graphs = [(capture_graph(fn, 1)[0], 1) for fn in fns.values()]
    us = graph_us_in_turn(graphs, rounds)
    for (k, _), t in zip(fns.items(), us):
        print(f"  {k:24s} {t:8.1f} us  ({t / us[0]:.3f}x plain)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", nargs="+", default=["deepseek-v2-lite:1024", "qwen3-30b-a3b:1024"])
    parser.add_argument("--plans", nargs="+", default=["e8:512", "e12:512", "e16:256", "c4:1024"])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    for point in args.points:
        name, tokens = point.split(":")
        probe(name, int(tokens), args.plans, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
