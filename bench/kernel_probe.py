"""Where the time of one fused Triton MoE forward goes, kernel by kernel, next to dense cuBLAS ceilings.

    PYTHONPATH=src python3 bench/kernel_probe.py [--points qwen3-30b-a3b:4096 flashmoe:8192 ...] [--out FILE]

For each point (model or ``flashmoe`` = E32 K2 H=I=2048, and T): the torch profiler's per-kernel CUDA time of
``fused_experts`` (triton) and torch_grouped_mm, averaged over a few calls; dense torch.mm at the GEMM shapes of
the layer (S x H @ H x 2I and S x I @ I x H, S = T*K) as the cuBLAS ceiling; registers and spills of the compiled
Triton kernels. ``--scenario`` picks the routing (random by default; balanced gives every expert T*K/E rows, which
at the issue-4 points is a multiple of 128: the same kernels without padding rows); ``--entry-tokens N`` runs every
point on the table entry of N tokens. A development tool: the numbers that back claims come from ``tilemoe bench``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import sys

import torch
import triton
import triton.language as tl

from tilemoe.bench.scenarios import make_routing_for
from tilemoe.config import MoEConfig
from tilemoe.impls import get_impl
from tilemoe.ops.fused_experts import fused_experts
from tilemoe.testing import make_weights, relative_error
from tilemoe.tune_cli import graph_seconds
from tilemoe.tuning import MoEShape, pick_config

FLASHMOE = dict(num_experts=32, top_k=2, hidden_size=2048, intermediate_size=2048)


def point_config(name: str) -> MoEConfig:
    if name == "flashmoe":
        return MoEConfig.from_pretrained("qwen3-30b-a3b").replace(**FLASHMOE)
    return MoEConfig.from_pretrained(name)


def kernel_times(fn, calls: int = 5) -> dict[str, float]:
    """Mean CUDA microseconds per call of every kernel ``fn`` launches (torch profiler)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:70]] += event.device_time / calls
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _parse(item: str) -> tuple[str, int]:
    name, value = item.split("=")
    return name, int(value)


def mm_us(m: int, n: int, k: int, dtype) -> float:
    a = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(n, k, device="cuda", dtype=dtype)
    return triton.testing.do_bench(lambda: a @ b.t(), warmup=10, rep=50, return_mode="median") * 1e3


@triton.jit
def _dense_tma_matmul(a_desc, b_desc, c_desc, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      GROUP_M: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BK)):
        a = a_desc.load([pid_m * BM, k0 * BK])
        b = b_desc.load([pid_n * BN, k0 * BK])
        acc = tl.dot(a, b.T, acc)
    c_desc.store([pid_m * BM, pid_n * BN], acc.to(tl.bfloat16))


def dense_triton_us(m: int, n: int, k: int, bm: int, bn: int, bk: int, warps: int, stages: int) -> float:
    """Triton's own ceiling at a dense GEMM shape: TMA for both operands, no gather."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    descs = (TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk]),
             TensorDescriptor.from_tensor(c, [bm, bn]))  # fmt: skip
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)

    def run():
        _dense_tma_matmul[grid](*descs, m, n, k, BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages)

    run()
    return triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median") * 1e3


def compiled_stats() -> list[str]:
    from tilemoe.ops._kernels import _fused_experts as kernels

    lines = []
    for name in dir(kernels):
        fn = getattr(kernels, name)
        cache = getattr(fn, "device_caches", None)
        if not cache:
            continue
        for dev_cache in cache.values():
            for compiled in dev_cache[0].values():
                ptx = compiled.asm.get("ptx", "")
                lines.append(
                    f"{name}: regs {compiled.n_regs} spills {compiled.n_spills} smem {compiled.metadata.shared}"
                    f" wgmma {'wgmma' in ptx} cp.async {'cp.async' in ptx} tma {'cp.async.bulk.tensor' in ptx}"
                )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--points",
        nargs="+",
        default=["qwen3-30b-a3b:4096", "qwen3-30b-a3b:16384", "mixtral-8x7b:4096", "flashmoe:8192"],
    )
    parser.add_argument("--variants", nargs="*", default=[], help="KernelConfig overrides, e.g. tma=1,persistent=1")
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument("--dense", nargs="*", default=[], help="M,N,K,BM,BN,BK,warps,stages")
    parser.add_argument("--no-stats", action="store_true")
    parser.add_argument(
        "--allow-wrong",
        action="store_true",
        help="time a variant whose output is wrong too (a probe tree that leaves work out: bench/skip_trees.py)",
    )
    parser.add_argument("--graph", action="store_true", help="time variants by CUDA-graph replay (small T)")
    parser.add_argument(
        "--scenario",
        default="random",
        choices=["random", "balanced", "imbalanced"],
        help="the routing (balanced: every expert T*K/E rows, no padding where that is a multiple of block_m)",
    )
    parser.add_argument(
        "--entry-tokens",
        type=int,
        default=None,
        help="run every point on its model's table entry for this T instead of its own T's (one kernel config across "
        "points that differ only in rows per expert: gpu_check.sh tails)",
    )
    args = parser.parse_args(argv)
    dtype = torch.bfloat16
    tgm = get_impl("torch_grouped_mm").fn
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    for point in args.points:
        name, tokens, *overrides = point.split(":")
        t = int(tokens)
        config = point_config(name)
        for item in overrides:  # e.g. gated=0,intermediate_size=4096,activation=relu
            for pair in item.split(","):
                key, value = pair.split("=")
                config = config.replace(**{key: value if key == "activation" else int(value)})
        if overrides and not config.gated:
            config = config.replace(gated=False)
        gen = torch.Generator().manual_seed(0)
        w13, w2, b13, b2 = make_weights(config, dtype=dtype, device="cuda").values()
        x = torch.randn(t, config.hidden_size, generator=gen).to("cuda", dtype)
        tw, ti = make_routing_for(args.scenario, t, config, generator=gen, x=x, device="cuda")
        tw, ti = tw.float().contiguous(), ti.to(torch.int32).contiguous()
        kw = dict(config=config, b13=b13, b2=b2)
        run_triton = functools.partial(fused_experts, x, w13, w2, tw, ti, **kw)
        run_tgm = functools.partial(tgm, x, w13, w2, tw, ti, **kw)
        err = relative_error(run_triton(), run_tgm().float())
        s, h, i = t * config.top_k, config.hidden_size, config.intermediate_size
        n1 = 2 * i if config.gated else i
        flops = 2 * s * h * (n1 + i)
        shape = f"S={s}, H={h}, I={i}, E={config.num_experts}"
        print(f"\n## {name} T={t} ({shape}) rel_err {err:.2e}, {args.scenario} routing")
        base = pick_config(
            MoEShape(
                args.entry_tokens or t, config.num_experts, config.top_k, config.hidden_size, config.intermediate_size
            ),
            dtype,
            torch.cuda.get_device_name(),
        )
        print(f"picked: {base}")
        for variant in ["base", *args.variants]:
            changes = {} if variant == "base" else dict(_parse(item) for item in variant.split(","))
            try:
                cfg = dataclasses.replace(base, **changes)  # an invalid combination is reported, not fatal
                fn = functools.partial(fused_experts, x, w13, w2, tw, ti, kernel_config=cfg, **kw)
                verr = relative_error(fn(), run_tgm().float())
                if verr > 2e-2 and not args.allow_wrong:
                    print(f"  {variant:40s} WRONG err {verr:.1e}")
                    continue
                if args.graph:
                    print(f"  {variant:40s} graph {graph_seconds(fn) * 1e6:8.1f} us  err {verr:.1e}")
                    continue
                times = kernel_times(fn)
            except Exception as error:  # noqa: BLE001 - a variant that fails to compile is a result too
                print(f"  {variant:40s} FAILED {type(error).__name__}: {str(error)[:200]}")
                continue
            g1 = sum(v for k, v in times.items() if "gemm1" in k)
            g2 = sum(v for k, v in times.items() if "gemm2" in k)
            total = sum(times.values())
            print(f"  {variant:40s} gemm1 {g1:8.1f} gemm2 {g2:8.1f} total {total:8.1f} us  err {verr:.1e}")
        if args.no_breakdown:
            continue
        for label, fn in (("triton", run_triton), ("torch_grouped_mm", run_tgm)):
            times = kernel_times(fn)
            total = sum(times.values())
            print(f"{label}: {total:.0f} us kernel time, {flops / total / 1e6:.0f} TFLOP/s")
            for kname, us in list(times.items())[:8]:
                print(f"    {us:9.1f} us  {kname}")
        d1, d2 = mm_us(s, n1, h, dtype), mm_us(s, h, i, dtype)
        print(
            f"dense cuBLAS: GEMM1 {d1:.0f} us ({2 * s * h * n1 / d1 / 1e6:.0f} TFLOP/s), "
            f"GEMM2 {d2:.0f} us ({2 * s * i * h / d2 / 1e6:.0f} TFLOP/s)"
        )
    if args.dense:
        print("\n# dense Triton TMA matmul (the ceiling without a gather)")
        for spec in args.dense:
            m, n, k, bm, bn, bk, warps, stages = (int(v) for v in spec.split(","))
            us = dense_triton_us(m, n, k, bm, bn, bk, warps, stages)
            cublas = mm_us(m, n, k, torch.bfloat16)
            print(f"  M{m} N{n} K{k} tile {bm}x{bn}x{bk} w{warps} s{stages}: {us:.0f} us, "
                  f"{2 * m * n * k / us / 1e6:.0f} TFLOP/s; cuBLAS {cublas:.0f} us")  # fmt: skip
    print("\n# compiled kernels")
    if not args.no_stats:
        print("\n".join(compiled_stats()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
