"""One fused Triton MoE forward per config under Nsight Compute: the GEMM kernels' hardware counters, side by side.

    ncu --profile-from-start off --clock-control none -k regex:gemm --section SpeedOfLight ... \\
        python3 bench/ncu_probe.py --point qwen3-30b-a3b:4096 --variants gluon=1,...

Each config (the point's table entry, then each variant applied to it) is run twice unprofiled (compiles, warm
caches) and once between cudaProfilerStart / Stop, so ``--profile-from-start off`` profiles exactly that call's
kernels; the printed order of the configs is the order of their kernels in ncu's report. ``--bmm`` profiles the
bench's cuBLAS ceiling (``tilemoe.bench.ceiling``: both GEMMs as ``torch.bmm`` over the experts hit, as many rows
each) last, the same way, to set the vendor GEMM's counters beside ours. Random routing, bf16. A
development tool (bench/NOTES.md version 15): it reads counters, the numbers that back claims come from
``tilemoe bench``.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from tilemoe.bench.ceiling import bmm_ceiling
from tilemoe.bench.scenarios import make_routing_for
from tilemoe.config import MoEConfig
from tilemoe.ops.fused_experts import fused_experts
from tilemoe.testing import make_weights
from tilemoe.tuning import KernelConfig, MoEShape, pick_config


def _changes(variant: str) -> dict[str, int]:
    return {key: int(value) for key, value in (item.split("=") for item in variant.split(","))}


@dataclasses.dataclass
class PointInputs:
    """One MODEL:T point's bf16 layer inputs on the GPU (seed 0) and its table entry."""

    name: str
    num_tokens: int
    config: MoEConfig
    x: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    b13: torch.Tensor | None
    b2: torch.Tensor | None
    topk_weights: torch.Tensor  # float32 [T, K]
    topk_ids: torch.Tensor  # int32 [T, K]
    entry: KernelConfig


def point_inputs(point: str, scenario: str = "random", entry_tokens: int | None = None) -> PointInputs:
    """x, the weights and ``scenario``'s routing of ``point`` ("MODEL:T"), and the table entry of ``entry_tokens``
    (the point's own T when None) on this GPU: what this probe and ``l2_window_probe.py`` run."""
    name, tokens = point.split(":")
    t = int(tokens)
    config = MoEConfig.from_pretrained(name)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    w13, w2, b13, b2 = make_weights(config, dtype=dtype, device="cuda").values()
    x = torch.randn(t, config.hidden_size, generator=gen).to("cuda", dtype)
    weights, ids = make_routing_for(scenario, t, config, generator=gen, x=x, device="cuda")
    shape = MoEShape(entry_tokens or t, config.num_experts, config.top_k, config.hidden_size, config.intermediate_size)
    entry = pick_config(shape, dtype, torch.cuda.get_device_name())
    return PointInputs(name, t, config, x, w13, w2, b13, b2, weights.float().contiguous(),
                       ids.to(torch.int32).contiguous(), entry)  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--point", default="qwen3-30b-a3b:4096", help="MODEL:T")
    parser.add_argument("--variants", nargs="*", default=[], help="KernelConfig changes of the entry")
    parser.add_argument("--scenario", default="random", choices=["random", "balanced", "imbalanced"])
    parser.add_argument(
        "--entry-tokens", type=int, default=None, help="run the table entry of this T instead of the point's own"
    )
    parser.add_argument("--bmm", action="store_true", help="profile the cuBLAS ceiling's two batched GEMMs last")
    args = parser.parse_args(argv)
    p = point_inputs(args.point, args.scenario, args.entry_tokens)
    name, t, config, entry = p.name, p.num_tokens, p.config, p.entry
    x, w13, w2, b13, b2, weights, ids = p.x, p.w13, p.w2, p.b13, p.b2, p.topk_weights, p.topk_ids
    dtype = x.dtype
    runs = []
    for label, cfg in [("entry", entry), *((v, dataclasses.replace(entry, **_changes(v))) for v in args.variants)]:

        def run(cfg=cfg):
            return fused_experts(x, w13, w2, weights, ids, config=config, b13=b13, b2=b2, kernel_config=cfg)

        runs.append((f"{label}: {cfg}", run))
    if args.bmm:
        hit = int(torch.unique(ids).numel())
        ceiling = bmm_ceiling(config, t, hit, {"w13": w13, "w2": w2}, dtype=dtype, device=torch.device("cuda"))
        runs.append((f"cuBLAS bmm, {hit} experts x {ceiling.rows_per_expert} rows", ceiling.fn))
    for label, run in runs:
        run(), run()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        run()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"profiled {name} T={t}: {label}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
