"""Does Triton's warp specialization raise its dense GEMM ceiling on this GPU? A development probe.

    PYTHONPATH=src python3 bench/ws_probe.py [--shapes M,N,K ...] [--configs BM,BN,BK,warps,stages ...]

For each shape: torch.mm (cuBLAS) and a Triton matmul with both operands through TMA descriptors, in four
forms: one tile per program; the same with ``warp_specialize=True`` on the k loop; a persistent tile loop
(``flatten=True``) with and without warp specialization; plus the gathered-A form that GEMM 1 needs (A rows
loaded through pointers by a row index, B through TMA), with and without warp specialization. A variant that
does not compile (or is wrong against torch.mm) prints why instead of a time. The numbers that back claims
come from ``tilemoe bench``; this tells whether a kernel change is worth making.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_of(tile, num_m, num_n, GROUP_M: tl.constexpr):
    in_group = GROUP_M * num_n
    first_m = (tile // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % in_group) % size_m, (tile % in_group) // size_m


@triton.jit
def _tma_matmul(a_desc, b_desc, c_desc, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                GROUP_M: tl.constexpr, WS: tl.constexpr):  # fmt: skip
    pid_m, pid_n = _tile_of(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in tl.range(0, tl.cdiv(K, BK), warp_specialize=WS):
        a = a_desc.load([pid_m * BM, k0 * BK])
        b = b_desc.load([pid_n * BN, k0 * BK])
        acc = tl.dot(a, b.T, acc)
    c_desc.store([pid_m * BM, pid_n * BN], acc.to(tl.bfloat16))


@triton.jit
def _tma_matmul_persistent(a_desc, b_desc, c_desc, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                           BK: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                           WS: tl.constexpr):  # fmt: skip
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=True, warp_specialize=WS):
        pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(k_tiles):
            a = a_desc.load([pid_m * BM, k0 * BK])
            b = b_desc.load([pid_n * BN, k0 * BK])
            acc = tl.dot(a, b.T, acc)
        c_desc.store([pid_m * BM, pid_n * BN], acc.to(tl.bfloat16))


@triton.jit
def _gather_matmul(a_ptr, rows_ptr, b_desc, c_desc, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, GROUP_M: tl.constexpr, WS: tl.constexpr):  # fmt: skip
    pid_m, pid_n = _tile_of(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    rows = tl.load(rows_ptr + pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * K + tl.arange(0, BK)[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in tl.range(0, tl.cdiv(K, BK), warp_specialize=WS):
        a = tl.load(a_ptrs + k0 * BK)
        b = b_desc.load([pid_n * BN, k0 * BK])
        acc = tl.dot(a, b.T, acc)
    c_desc.store([pid_m * BM, pid_n * BN], acc.to(tl.bfloat16))


def bench_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


def probe(m: int, n: int, k: int, bm: int, bn: int, bk: int, warps: int, stages: int) -> list[tuple[str, str]]:
    from triton.tools.tensor_descriptor import TensorDescriptor

    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    rows = torch.randperm(m, device="cuda", dtype=torch.int32)
    expect = a.float() @ b.float().t()
    expect_gather = a[rows.long()].float() @ b.float().t()
    c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    b_desc = TensorDescriptor.from_tensor(b, [bn, bk])
    c_desc = TensorDescriptor.from_tensor(c, [bm, bn])
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    flops = 2.0 * m * n * k
    kw = dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    variants = {
        "torch.mm": (lambda: torch.mm(a, b.t(), out=c), expect),
        "tma": (lambda: _tma_matmul[(tiles,)](a_desc, b_desc, c_desc, m, n, k, WS=False, **kw), expect),
        "tma+ws": (lambda: _tma_matmul[(tiles,)](a_desc, b_desc, c_desc, m, n, k, WS=True, **kw), expect),
        "persistent": (
            lambda: _tma_matmul_persistent[(min(sms, tiles),)](
                a_desc, b_desc, c_desc, m, n, k, NUM_PROGRAMS=min(sms, tiles), WS=False, **kw
            ),
            expect,
        ),
        "persistent+ws": (
            lambda: _tma_matmul_persistent[(min(sms, tiles),)](
                a_desc, b_desc, c_desc, m, n, k, NUM_PROGRAMS=min(sms, tiles), WS=True, **kw
            ),
            expect,
        ),
        "gatherA": (lambda: _gather_matmul[(tiles,)](a, rows, b_desc, c_desc, m, n, k, WS=False, **kw), expect_gather),
        "gatherA+ws": (
            lambda: _gather_matmul[(tiles,)](a, rows, b_desc, c_desc, m, n, k, WS=True, **kw),
            expect_gather,
        ),
    }
    out = []
    for name, (fn, ref) in variants.items():
        try:
            c.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            err = ((c.float() - ref).norm() / ref.norm()).item()
            if not err < 2e-2:
                out.append((name, f"wrong (rel err {err:.2e})"))
                continue
            us = bench_us(fn)
            out.append((name, f"{us:9.1f} us {flops / us / 1e6:6.0f} TFLOP/s"))
        except Exception as exc:  # a variant this Triton cannot compile: say why, go on
            out.append((name, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:140] if str(exc) else ''}"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="*", default=["8192,8192,8192", "32768,1536,2048", "32768,2048,768"])
    parser.add_argument("--configs", nargs="*", default=["128,256,64,8,3", "128,128,64,4,4", "128,256,64,4,3"])
    args = parser.parse_args(argv)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    for shape in args.shapes:
        m, n, k = map(int, shape.split(","))
        for cfg in args.configs:
            bm, bn, bk, warps, stages = map(int, cfg.split(","))
            print(f"\n## M={m} N={n} K={k}  tile {bm}x{bn}x{bk} warps {warps} stages {stages}", flush=True)
            for name, text in probe(m, n, k, bm, bn, bk, warps, stages):
                print(f"  {name:15s} {text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
