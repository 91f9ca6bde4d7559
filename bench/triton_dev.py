"""Quick GPU timing of the fused Triton MoE against torch_grouped_mm, with the roofline measured in the same run.

    PYTHONPATH=src python3 bench/triton_dev.py [--models ...] [--tokens ...] [--out FILE.csv]

Per (model, T, scenario): relative error of triton vs torch_grouped_mm (bf16), then the time of each variant
(CUDA-graph replays, ``tilemoe.tune_cli.time_call``), in turn, and % of the roofline
(max(FLOPs / matmul rate, bytes / copy bandwidth); bytes = weights of the experts hit + activations).
"""

from __future__ import annotations

import argparse
import csv
import sys

import torch
import triton

from tilemoe.bench.metrics import layer_bytes, layer_flops, roofline_seconds
from tilemoe.bench.roofline import measure_roofline
from tilemoe.bench.scenarios import make_routing_for
from tilemoe.config import MoEConfig
from tilemoe.impls import get_impl
from tilemoe.ops.fused_experts import fused_experts
from tilemoe.testing import make_weights, relative_error
from tilemoe.tune_cli import time_call


def variants(tgm, x, w13, w2, tw, ti, config, b13, b2) -> dict:
    """The callables timed at one point: triton (deterministic), triton with atomic combine, torch_grouped_mm."""
    kwargs = dict(config=config, b13=b13, b2=b2)
    return {
        "triton": lambda: fused_experts(x, w13, w2, tw, ti, **kwargs),
        "atomic": lambda: fused_experts(x, w13, w2, tw, ti, deterministic=False, **kwargs),
        "tgm": lambda: tgm(x, w13, w2, tw, ti, **kwargs),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--models", nargs="+", default=["qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v2-lite", "gpt-oss-120b"]
    )
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 256, 1024, 4096, 16384])
    parser.add_argument("--scenarios", nargs="+", default=["random", "imbalanced"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    dtype = torch.bfloat16
    roof = measure_roofline(device, dtype)
    print(f"# {roof.device_name}: copy {roof.copy_gbps:.0f} GB/s, bf16 matmul {roof.matmul_tflops:.0f} TFLOP/s")
    print(f"# torch {torch.__version__}, triton {triton.__version__}")
    tgm = get_impl("torch_grouped_mm").fn
    rows = []
    print(
        "model,T,scenario,experts_hit,roof_us,triton_us,triton_atomic_us,tgm_us,triton_pct,atomic_pct,tgm_pct,speedup,rel_err"
    )
    for name in args.models:
        config = MoEConfig.from_pretrained(name)
        gen = torch.Generator().manual_seed(0)
        e, h = config.num_experts, config.hidden_size
        w13, w2, b13, b2 = make_weights(config, dtype=dtype, device=device).values()
        for t in args.tokens:
            for scenario in args.scenarios:
                x = torch.randn(t, h, generator=gen).to(device, dtype)
                tw, ti = make_routing_for(scenario, t, config, generator=gen, x=x, device=device)
                tw, ti = tw.float().contiguous(), ti.to(torch.int32).contiguous()
                hit = int((torch.bincount(ti.reshape(-1).long(), minlength=e) > 0).sum())
                roof_s = roofline_seconds(
                    layer_flops(config, t), layer_bytes(config, t, hit, 2),
                    roof.matmul_tflops * 1e12, roof.copy_gbps * 1e9,
                )  # fmt: skip
                fns = variants(tgm, x, w13, w2, tw, ti, config, b13, b2)
                ref = fns["tgm"]().float()
                err = max(relative_error(fns["triton"](), ref), relative_error(fns["atomic"](), ref))
                times = {key: time_call(fn, t) for key, fn in fns.items()}  # graph replays (bench/NOTES.md, version 6)
                row = dict(
                    model=name, T=t, scenario=scenario, experts_hit=hit, roof_us=roof_s * 1e6,
                    triton_us=times["triton"] * 1e6, triton_atomic_us=times["atomic"] * 1e6, tgm_us=times["tgm"] * 1e6,
                    triton_pct=100 * roof_s / times["triton"], atomic_pct=100 * roof_s / times["atomic"],
                    tgm_pct=100 * roof_s / times["tgm"], speedup=times["tgm"] / min(times["triton"], times["atomic"]),
                    rel_err=err,
                )  # fmt: skip
                rows.append(row)
                print(
                    f"{name},{t},{scenario},{hit},{row['roof_us']:.1f},{row['triton_us']:.1f},"
                    f"{row['triton_atomic_us']:.1f},{row['tgm_us']:.1f},{row['triton_pct']:.0f},{row['atomic_pct']:.0f},"
                    f"{row['tgm_pct']:.0f},{row['speedup']:.2f},{err:.1e}",
                    flush=True,
                )
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
