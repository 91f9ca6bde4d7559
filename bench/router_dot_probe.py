"""The router GEMM of a prefill batch (T = 256-4096): cuBLAS (F.linear, bf16 logits, as the bench's layer runs it)
against a tensor-core Triton tile kernel writing float32 logits, tile variants, CUDA-graph replays of 20 calls in
turn. Question: whether cuBLAS's 6.3 us for [1024 x 2048] @ [2048 x 128] (qwen3-30b-a3b T=1024, session 18's layer
probe; 4.7 MB to read, 1.6 us at 3 TB/s) leaves a few microseconds of the layer to take.

    PYTHONPATH=src python3 bench/router_dot_probe.py

A development prototype: its kernel moves into tilemoe/ops/_kernels/_router.py only if it wins.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tilemoe.bench.timing import capture_graph, graph_us_in_turn

SHAPES = [(128, 2048), (64, 2048), (128, 2880), (8, 4096)]  # (E, H): qwen3, deepseek-v2-lite, gpt-oss, mixtral
TOKENS = [256, 1024, 4096]
# (BLOCK_T, BLOCK_E, BLOCK_H, warps, stages); BLOCK_E is cut to E's power of two
VARIANTS = [(64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (32, 128, 64, 4, 4), (64, 128, 128, 4, 3), (128, 128, 64, 8, 4),
            (64, 32, 128, 4, 4)]  # fmt: skip


@triton.jit
def _router_dot_kernel(x_ptr, w_ptr, out_ptr, num_tokens, num_experts, hidden,
                       BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    hs = tl.arange(0, BLOCK_H)
    x_ptrs = x_ptr + tokens[:, None].to(tl.int64) * hidden + hs[None, :]
    w_ptrs = w_ptr + experts[:, None].to(tl.int64) * hidden + hs[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        x = tl.load(x_ptrs, mask=(tokens[:, None] < num_tokens) & (hs[None, :] < hidden - h0), other=0.0)
        w = tl.load(w_ptrs, mask=(experts[:, None] < num_experts) & (hs[None, :] < hidden - h0), other=0.0)
        acc = tl.dot(x, w.T, acc)
        x_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    mask = (tokens[:, None] < num_tokens) & (experts[None, :] < num_experts)
    tl.store(out_ptr + tokens[:, None] * num_experts + experts[None, :], acc, mask=mask)


def kernel_fn(x, w, block_t, block_e, block_h, warps, stages):
    t, e = x.shape[0], w.shape[0]
    block_e = min(block_e, max(16, triton.next_power_of_2(e)))
    out = torch.empty(t, e, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(t, block_t), triton.cdiv(e, block_e))

    def fn():
        _router_dot_kernel[grid](x, w, out, t, e, x.shape[1], BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_H=block_h,
                                 num_warps=warps, num_stages=stages)  # fmt: skip
        return out

    return fn


def main() -> None:
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    print("E\tH\tT\tcublas_us\t" + "\t".join("t{}e{}h{}w{}s{}".format(*v) for v in VARIANTS))
    for e, h in SHAPES:
        w = torch.randn(e, h, device="cuda", dtype=torch.bfloat16)
        for t in TOKENS:
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
            want = x.float() @ w.float().T
            fns = [functools.partial(torch.nn.functional.linear, x, w)]
            for v in VARIANTS:
                fn = kernel_fn(x, w, *v)
                err = ((fn() - want).abs().max() / want.abs().max()).item()
                assert err < 1e-3, (e, h, t, v, err)
                fns.append(fn)
            us = graph_us_in_turn([(capture_graph(fn, 20)[0], 20) for fn in fns], 10)
            print(f"{e}\t{h}\t{t}\t" + "\t".join(f"{u:.1f}" for u in us), flush=True)


if __name__ == "__main__":
    main()
