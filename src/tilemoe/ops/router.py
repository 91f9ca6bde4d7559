"""router_logits_triton: the router GEMM of a decode-sized batch as one Triton kernel, float32 logits.

``tilemoe.routing.router_logits`` (x and weight upcast to float32, then a GEMM) is its reference and the path for
larger batches: above ``ROUTER_KERNEL_MAX_TOKENS`` tokens the GEMM is compute, which cuBLAS does better; at or
below it the GEMM is a stream of the E x H router weight, which cuBLAS moved in 4.8-6.4 us for one token
of qwen3-30b-a3b / gpt-oss-120b on an H100 (one or two kernels), the kernel in 2.0 (bench/NOTES.md, "Router GEMM").
"""

from __future__ import annotations

import torch

from tilemoe.ops._launch import cdiv, pdl_options
from tilemoe.routing import router_logits

__all__ = ["ROUTER_KERNEL_MAX_TOKENS", "router_logits_fast", "router_logits_triton", "uses_router_kernel"]

# Up to this many tokens the Triton kernel computes the logits; beyond, the GEMM (tensor cores) does. H100, bf16,
# CUDA-graph replays (bench/router_probe.py): the kernel 2.0-2.7 us against cuBLAS 4.8-6.1 at T = 1 and 8 for
# E x H = 128 x 2048, 64 x 2048, 128 x 2880, 8 x 4096 (256 x 7168: 3.1 / 5.9 vs 6.4 / 6.6); at T = 32 even or
# slower (256 x 7168: 18 vs 6.8 us).
ROUTER_KERNEL_MAX_TOKENS = 8
# Experts per program and the H chunk: 2 x 4096 was the fastest tile of the probe at T = 1 and 8.
_BLOCK_E = 2
_BLOCK_H = 4096
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor [T, H], got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        shape = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected shape [E, {x.shape[1]}] (x is [T, H]), got {shape}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias: expected shape [{weight.shape[0]}], got {list(bias.shape)}")
    for name, tensor in (("x", x), ("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (x's), got {tensor.device}")


def router_logits_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] @ weight [E, H]^T (+ bias [E]) -> float32 logits [T, E], products summed in float32.

    Float32 / float16 / bfloat16 inputs, any strides (each may have its own dtype). CUDA or the Triton interpreter;
    any T, though meant for T <= ``ROUTER_KERNEL_MAX_TOKENS`` (see ``router_logits_fast``). T = 0 gives [0, E].
    Raises ValueError / TypeError naming the argument on a wrong shape, dtype or device.
    """
    _check(x, weight, bias)
    return _router_logits_op(x, weight, bias)


def uses_router_kernel(x: torch.Tensor) -> bool:
    """Whether the router GEMM of x [T, H] goes to the Triton kernel: CUDA, T <= ``ROUTER_KERNEL_MAX_TOKENS``, a
    float32 / float16 / bfloat16 x. Not on the CPU under the interpreter, where the kernel would only be slower
    (tests call ``router_logits_triton`` there)."""
    return x.is_cuda and x.dim() == 2 and x.shape[0] <= ROUTER_KERNEL_MAX_TOKENS and x.dtype in _DTYPES


def router_logits_fast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float32 router logits [T, E], the same math as ``tilemoe.routing.router_logits``: the Triton kernel where
    ``uses_router_kernel(x)``, the reference's GEMM otherwise."""
    if uses_router_kernel(x):
        return router_logits_triton(x, weight, bias)
    return router_logits(x, weight, bias)


@torch.library.custom_op("tilemoe::router_logits", mutates_args=())
def _router_logits_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from tilemoe.ops._kernels._router import _router_logits_kernel

    num_tokens, hidden = x.shape
    num_experts = weight.shape[0]
    logits = _empty_logits(num_tokens, num_experts, x.device)
    if num_tokens == 0 or num_experts == 0:
        return logits
    block_e = min(_BLOCK_E, 1 << (num_experts - 1).bit_length())
    block_h = min(_BLOCK_H, max(16, 1 << (hidden - 1).bit_length()))
    _router_logits_kernel[(cdiv(num_experts, block_e), num_tokens)](
        **pdl_options(x.device),
        x_ptr=x,
        stride_xt=x.stride(0),
        stride_xh=x.stride(1),
        w_ptr=weight,
        stride_we=weight.stride(0),
        stride_wh=weight.stride(1),
        b_ptr=bias if bias is not None else weight,  # never read without HAS_BIAS
        logits_ptr=logits,
        stride_lt=logits.stride(0),
        stride_le=logits.stride(1),
        num_experts=num_experts,
        hidden=hidden,
        HAS_BIAS=bias is not None,
        BLOCK_E=block_e,
        BLOCK_H=block_h,
        num_warps=4,
    )
    return logits


@_router_logits_op.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


def _empty_logits(num_tokens: int, num_experts: int, device: torch.device) -> torch.Tensor:
    return torch.empty((num_tokens, num_experts), dtype=torch.float32, device=device)
