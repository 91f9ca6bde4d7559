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


@triton.jit
def _gemm1_like(a_ptr, a_desc, rows_ptr, b_desc, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr, GATHER: tl.constexpr,
                GATED: tl.constexpr, PERSISTENT: tl.constexpr):  # fmt: skip
    """GEMM 1's structure: A rows gathered through pointers (GATHER) or read through TMA; GATED: two accumulators
    (gate rows n, up rows N/2 + n of B) and silu(g) * u into C [M, N/2]; else one accumulator into C [M, N].
    PERSISTENT: NUM_PROGRAMS programs walk the tiles in a loop flattened with the k loop."""
    n_out = N // 2 if GATED else N
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(n_out, BN)
    start = tl.program_id(0) if PERSISTENT else 0
    step = NUM_PROGRAMS if PERSISTENT else 1
    stop = num_m * num_n if PERSISTENT else 1
    for it in tl.range(start, stop, step, flatten=True):
        tile = it if PERSISTENT else tl.program_id(0)
        pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
        rows = tl.load(rows_ptr + pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        a_ptrs = a_ptr + rows[:, None] * K + tl.arange(0, BK)[None, :]
        acc_g = tl.zeros([BM, BN], dtype=tl.float32)
        acc_u = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(tl.cdiv(K, BK)):
            if GATHER:
                a = tl.load(a_ptrs + k0 * BK)
            else:
                a = a_desc.load([pid_m * BM, k0 * BK])
            acc_g = tl.dot(a, b_desc.load([pid_n * BN, k0 * BK]).T, acc_g)
            if GATED:
                acc_u = tl.dot(a, b_desc.load([n_out + pid_n * BN, k0 * BK]).T, acc_u)
        out = acc_g
        if GATED:
            g = acc_g.to(tl.bfloat16).to(tl.float32)
            out = g * tl.sigmoid(g) * acc_u.to(tl.bfloat16).to(tl.float32)
        cols = pid_n * BN + tl.arange(0, BN)
        c_rows = pid_m * BM + tl.arange(0, BM)
        tl.store(c_ptr + c_rows[:, None].to(tl.int64) * n_out + cols[None, :], out.to(tl.bfloat16))


@triton.jit
def _gemm1_one_dot(a_ptr, a_desc, rows_ptr, b3_desc, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr, GATHER: tl.constexpr,
                   PERSISTENT: tl.constexpr):  # fmt: skip
    """GEMM 1 with one accumulator: B viewed as [2, N/2, K] (gate rows, up rows) through a 3-D descriptor whose
    [2, BN, BK] box is one [2 BN, BK] operand, so one dot gives [gate | up]; split in the epilogue."""
    n_out = N // 2
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(n_out, BN)
    start = tl.program_id(0) if PERSISTENT else 0
    step = NUM_PROGRAMS if PERSISTENT else 1
    stop = num_m * num_n if PERSISTENT else 1
    for it in tl.range(start, stop, step, flatten=True):
        tile = it if PERSISTENT else tl.program_id(0)
        pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
        rows = tl.load(rows_ptr + pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        a_ptrs = a_ptr + rows[:, None] * K + tl.arange(0, BK)[None, :]
        acc = tl.zeros([BM, 2 * BN], dtype=tl.float32)
        for k0 in range(tl.cdiv(K, BK)):
            if GATHER:
                a = tl.load(a_ptrs + k0 * BK)
            else:
                a = a_desc.load([pid_m * BM, k0 * BK])
            b = b3_desc.load([0, pid_n * BN, k0 * BK]).reshape(2 * BN, BK)
            acc = tl.dot(a, b.T, acc)
        g, u = acc.reshape(BM, 2, BN).permute(0, 2, 1).split()
        g = g.to(tl.bfloat16).to(tl.float32)
        out = g * tl.sigmoid(g) * u.to(tl.bfloat16).to(tl.float32)
        cols = pid_n * BN + tl.arange(0, BN)
        c_rows = pid_m * BM + tl.arange(0, BM)
        tl.store(c_ptr + c_rows[:, None].to(tl.int64) * n_out + cols[None, :], out.to(tl.bfloat16))


def probe_gemm1(m: int, n: int, k: int, bm: int, bn: int, bk: int, warps: int, stages: int) -> list[tuple[str, str]]:
    """GEMM 1's structure at a dense shape: gathered vs TMA A, one vs two accumulators, one program per tile vs a
    flattened persistent loop. Where the flattened loop's gain goes (dense TMA: +17-31%) when A is gathered."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    identity = torch.arange(m, device="cuda", dtype=torch.int32)
    rows = torch.randperm(m, device="cuda", dtype=torch.int32)
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    b_desc = TensorDescriptor.from_tensor(b, [bn, bk])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = []
    for gated in (False, True):
        n_out = n // 2 if gated else n
        c = torch.empty(m, n_out, device="cuda", dtype=torch.bfloat16)
        tiles = triton.cdiv(m, bm) * triton.cdiv(n_out, bn)
        for gather in (False, True):
            idx = rows if gather else identity
            ref = a[idx.long()].float() @ b.float().t()
            if gated:
                g = ref[:, :n_out].to(torch.bfloat16).float()
                ref = g * torch.sigmoid(g) * ref[:, n_out:].to(torch.bfloat16).float()
            for persistent in (False, True):
                grid = min(sms, tiles) if persistent else tiles
                form = "persistent" if persistent else "grid"
                name = f"{'gated' if gated else 'plain'} {'gatherA' if gather else 'tmaA'} {form}"

                def fn(gated=gated, gather=gather, persistent=persistent, grid=grid, c=c, idx=idx):
                    _gemm1_like[(grid,)](a, a_desc, idx, b_desc, c, m, n, k, BM=bm, BN=bn, BK=bk, GROUP_M=8,
                                         NUM_PROGRAMS=grid, GATHER=gather, GATED=gated, PERSISTENT=persistent,
                                         num_warps=warps, num_stages=stages)  # fmt: skip

                out.append((name, checked_time(fn, c, ref, 2.0 * m * n * k)))
    # gated, one accumulator over [gate | up] (bn here is the gate width: a [bm, 2 bn] accumulator)
    n_out = n // 2
    b3_desc = TensorDescriptor.from_tensor(b.view(2, n_out, k), [2, bn, bk])
    c = torch.empty(m, n_out, device="cuda", dtype=torch.bfloat16)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n_out, bn)
    for gather in (False, True):
        idx = rows if gather else identity
        ref = a[idx.long()].float() @ b.float().t()
        g = ref[:, :n_out].to(torch.bfloat16).float()
        ref = g * torch.sigmoid(g) * ref[:, n_out:].to(torch.bfloat16).float()
        for persistent in (False, True):
            grid = min(sms, tiles) if persistent else tiles
            name = f"one-dot {'gatherA' if gather else 'tmaA'} {'persistent' if persistent else 'grid'}"

            def fn(gather=gather, persistent=persistent, grid=grid, idx=idx):
                _gemm1_one_dot[(grid,)](a, a_desc, idx, b3_desc, c, m, n, k, BM=bm, BN=bn, BK=bk, GROUP_M=8,
                                        NUM_PROGRAMS=grid, GATHER=gather, PERSISTENT=persistent,
                                        num_warps=warps, num_stages=stages)  # fmt: skip

            out.append((name, checked_time(fn, c, ref, 2.0 * m * n * k)))
    return out


def bench_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


def checked_time(fn, out: torch.Tensor, ref: torch.Tensor, flops: float) -> str:
    """``fn`` run once into ``out`` (poisoned first) and checked against ``ref``, then timed: a line of text;
    a variant that is wrong or that this Triton cannot compile says so instead."""
    try:
        out.fill_(float("nan"))
        fn()
        torch.cuda.synchronize()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        if not err < 2e-2:
            return f"wrong (rel err {err:.2e})"
        us = bench_us(fn)
        return f"{us:9.1f} us {flops / us / 1e6:6.0f} TFLOP/s"
    except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a result here
        first = str(exc).splitlines()[0][:140] if str(exc) else ""
        return f"failed: {type(exc).__name__}: {first}"


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
    return [(name, checked_time(fn, c, ref, flops)) for name, (fn, ref) in variants.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="*", default=["8192,8192,8192", "32768,1536,2048", "32768,2048,768"])
    parser.add_argument("--configs", nargs="*", default=["128,256,64,8,3", "128,128,64,4,4", "128,256,64,4,3"])
    parser.add_argument("--gemm1", action="store_true", help="GEMM 1's structure (gather, two accumulators) instead")
    args = parser.parse_args(argv)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    if args.gemm1:
        for shape in args.shapes:
            m, n, k = map(int, shape.split(","))
            for cfg in args.configs:
                bm, bn, bk, warps, stages = map(int, cfg.split(","))
                print(
                    f"\n## GEMM 1-like M={m} N={n} K={k}  tile {bm}x{bn}x{bk} warps {warps} stages {stages}", flush=True
                )
                for name, text in probe_gemm1(m, n, k, bm, bn, bk, warps, stages):
                    print(f"  {name:28s} {text}", flush=True)
        return 0
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
