"""The router GEMM of a few tokens: cuBLAS (F.linear in bf16) against the Triton router kernel's tile variants,
CUDA-graph replays of 20 calls, in turn within each round.

    PYTHONPATH=src python3 bench/router_probe.py

A development tool: it picks the kernel's block sizes (tilemoe/ops/router.py); claims come from ``tilemoe bench``.
"""

from __future__ import annotations

import torch

from tilemoe.bench.timing import capture_graph, graph_us_in_turn
from tilemoe.ops._kernels._router import _router_logits_kernel
from tilemoe.ops._launch import cdiv

SHAPES = [(128, 2048), (64, 2048), (128, 2880), (8, 4096), (256, 7168)]  # (E, H): qwen3, deepseek-v2-lite, ...
TOKENS = [1, 8, 32]
VARIANTS = [(1, 2048, 4), (2, 1024, 4), (2, 2048, 4), (2, 4096, 4), (4, 1024, 4), (4, 2048, 8), (8, 512, 4)]


def kernel_fn(x, w, block_e, block_h, warps):
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32, device=x.device)

    def fn():
        _router_logits_kernel[(cdiv(w.shape[0], block_e), x.shape[0])](
            x, x.stride(0), x.stride(1), w, w.stride(0), w.stride(1), w, out, out.stride(0), out.stride(1),
            w.shape[0], x.shape[1], HAS_BIAS=False, BLOCK_E=block_e, BLOCK_H=block_h, PDL=False, num_warps=warps,
        )  # fmt: skip
        return out

    return fn


def main() -> None:
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}")
    print("E\tH\tT\tcublas_bf16_us\t" + "\t".join(f"k{be}x{bh}w{wp}" for be, bh, wp in VARIANTS))
    for e, h in SHAPES:
        w = torch.randn(e, h, device="cuda", dtype=torch.bfloat16)
        for t in TOKENS:
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
            fns = [lambda x=x, w=w: torch.nn.functional.linear(x, w)] + [kernel_fn(x, w, *v) for v in VARIANTS]
            ref = torch.nn.functional.linear(x.float(), w.float())
            for fn in fns[1:]:
                torch.testing.assert_close(fn(), ref, atol=1e-3, rtol=1e-3)
            times = graph_us_in_turn([(capture_graph(fn, 20)[0], 20) for fn in fns], 11)
            print(f"{e}\t{h}\t{t}\t" + "\t".join(f"{us:.2f}" for us in times), flush=True)


if __name__ == "__main__":
    main()
