"""The router GEMM in Triton, float32 logits: router_logits_triton for a decode-sized batch, router_logit_parts for
a prefill batch.

``tilemoe.routing.router_logits`` (x and weight upcast to float32, then a GEMM) is their reference and the path for
what neither takes. At or below ``ROUTER_KERNEL_MAX_TOKENS`` tokens the GEMM is a stream of the E x H router
weight, which cuBLAS moved in 4.8-6.4 us for one token of qwen3-30b-a3b / gpt-oss-120b on an H100 (one or two
kernels), ``router_logits_triton`` in 2.0 (bench/NOTES.md, "Router GEMM"). Above it, for 16-bit x and weight,
``router_logit_parts`` runs the GEMM on the tensor cores split over H into parts, which the routing kernels sum as
they load them (``tilemoe.ops.route.route_tokens``): cuBLAS's bf16 GEMM took 5.8-6.3 us for T=1024 (E x H = 64 x
2048, 128 x 2048) and 10.5 us for T=4096 on an H100 (session 18's layer probe), a few programs each streaming all of
H; a Triton tile without the split lost to it (7.2 us, bench/router_dot_probe.py).
"""

from __future__ import annotations

import functools
import os

import torch

from tilemoe.ops._launch import cdiv, pdl_options
from tilemoe.routing import router_logits

__all__ = [
    "ROUTER_KERNEL_MAX_TOKENS",
    "ROUTER_PARTS_MAX_TOKENS",
    "router_logit_parts",
    "router_logits_fast",
    "router_logits_triton",
    "router_parts_layout",
    "uses_router_kernel",
    "uses_router_parts",
]

# Up to this many tokens the Triton kernel computes the logits; beyond, the GEMM (tensor cores) does. H100, bf16,
# CUDA-graph replays (bench/router_probe.py): the kernel 2.0-2.7 us against cuBLAS 4.8-6.1 at T = 1 and 8 for
# E x H = 128 x 2048, 64 x 2048, 128 x 2880, 8 x 4096 (256 x 7168: 3.1 / 5.9 vs 6.4 / 6.6); at T = 32 even or
# slower (256 x 7168: 18 vs 6.8 us).
ROUTER_KERNEL_MAX_TOKENS = 8
# Experts per program and the H chunk: 2 x 4096 was the fastest tile of the probe at T = 1 and 8.
_BLOCK_E = 2
_BLOCK_H = 4096
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# router_logit_parts: above ROUTER_KERNEL_MAX_TOKENS and up to this many tokens (16-bit x and weight on CUDA).
# H100, bf16, graph replays of the router GEMM + routing against cuBLAS's GEMM + routing (bench/NOTES.md, version
# 22): 1.2-2.9 us faster at T = 16-256 for all four bench models, at T=1024 for three (qwen3-30b-a3b, whose 8 parts
# of 128 experts made the routing read 4 KiB a token, 0.4 us slower before the cap below, 0.2 us with it); at
# T=4096 even to 37% slower, at 16384 slower (one part: cuBLAS's tiles stream x better). With the cap (version 23):
# 0.1-3.2 us faster at T = 16-1024 but for qwen3-30b-a3b T=1024.
ROUTER_PARTS_MAX_TOKENS = 1024
# Its tiles: BLOCK_H columns of H a step, at most 128 experts a program; a part count (a power of two) that gives
# about one program per SM, at most _PARTS_MAX and at most _PARTS_ROUTE_BYTES of float32 parts a token (what the
# routing kernel loads for it as one tile).
_PARTS_BLOCK_H = 128
_PARTS_BLOCK_E = 128
_PARTS_MAX = 8
_PARTS_ROUTE_BYTES = 2048
_DEFAULT_SMS = 132  # the interpreter's stand-in (an H100's)


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
    ``uses_router_kernel(x)``; for 16-bit x and weight of one dtype on CUDA, cuBLAS's 16-bit GEMM with float32
    output (16-bit products are exact in float32 and summed in float32, as the reference's float32 GEMM sums them,
    in its own order); the reference's GEMM otherwise. The reference upcasts x and weight and runs a float32 GEMM:
    with the routing after it 16-401 us on an H100 at T = 16-16384, against 7-61 for cuBLAS's bf16 GEMM and the
    routing; this float32-output path with the routing, 0.1-2.4 us over the bf16 one at T = 2048-16384
    (bench/results/session21-run24.md)."""
    if uses_router_kernel(x):
        return router_logits_triton(x, weight, bias)
    if _MM_OUT_DTYPE[0] and _sixteen_bit_pair(x, weight) and x.is_cuda:
        _check(x, weight, bias)
        try:
            logits = torch.mm(x, weight.t(), out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError):  # a torch whose CUDA mm lacks this dtype pair: never again
            _MM_OUT_DTYPE[0] = False
            return router_logits(x, weight, bias)
        return logits if bias is None else logits + bias.to(torch.float32)
    return router_logits(x, weight, bias)


# torch's GEMM with a wider output dtype (aten::mm.dtype, CUDA; torch >= 2.8): [still usable]
_MM_OUT_DTYPE = ["dtype" in torch.ops.aten.mm.overloads()]


def _sixteen_bit_pair(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and isinstance(weight, torch.Tensor)
        and x.dtype in (torch.float16, torch.bfloat16)
        and weight.dtype == x.dtype
    )


def _operand_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> dict:
    """x, weight and bias as both router kernels take them: pointers, strides, HAS_BIAS (the weight stands in for a
    missing bias, never read)."""
    return dict(x_ptr=x, stride_xt=x.stride(0), stride_xh=x.stride(1), w_ptr=weight, stride_we=weight.stride(0),
                stride_wh=weight.stride(1), b_ptr=weight if bias is None else bias,
                HAS_BIAS=bias is not None)  # fmt: skip


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
        **_operand_args(x, weight, bias),
        logits_ptr=logits,
        stride_lt=logits.stride(0),
        stride_le=logits.stride(1),
        num_experts=num_experts,
        hidden=hidden,
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


def uses_router_parts(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the router GEMM of x [T, H] goes to ``router_logit_parts`` (``tilemoe.ops.route.route_tokens``):
    CUDA, ROUTER_KERNEL_MAX_TOKENS < T <= ROUTER_PARTS_MAX_TOKENS, x and weight both float16 or both bfloat16 (the
    tensor cores' inputs; float32 stays on cuBLAS's float32 GEMM)."""
    return (
        x.is_cuda
        and x.dim() == 2
        and ROUTER_KERNEL_MAX_TOKENS < x.shape[0] <= ROUTER_PARTS_MAX_TOKENS
        and _sixteen_bit_pair(x, weight)
    )


def router_parts_layout(num_tokens: int, num_experts: int, hidden: int, num_sms: int) -> tuple[int, int, int, int]:
    """(block_t, block_e, parts, h_per_part) of ``router_logit_parts``: token blocks of 16 / 32 / 64 (T up to 128 /
    512 / more), expert blocks of up to 128, and H split into ``parts`` so that the programs come near one per SM: a
    power of two up to 8 and up to 2 KiB of float32 parts a token (4 at 128 experts), then as few as cover H in
    equal multiples of the 128-column step (no part empty; 3 where H has 5 steps). A pure function."""
    block_t = 16 if num_tokens <= 128 else 32 if num_tokens <= 512 else 64
    block_e = min(_PARTS_BLOCK_E, max(16, 1 << max(0, num_experts - 1).bit_length()))
    blocks = cdiv(max(num_tokens, 1), block_t) * cdiv(max(num_experts, 1), block_e)
    steps = cdiv(max(hidden, 1), _PARTS_BLOCK_H)
    max_parts = max(1, min(_PARTS_MAX, _PARTS_ROUTE_BYTES // (4 * max(num_experts, 1))))
    parts = 1
    while parts * 2 <= max_parts and parts * blocks < num_sms and parts * 2 <= steps:
        parts *= 2
    steps_per_part = cdiv(steps, parts)
    parts = cdiv(steps, steps_per_part)  # no empty part
    return block_t, block_e, parts, steps_per_part * _PARTS_BLOCK_H


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def router_logit_parts(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] @ weight [E, H]^T (+ bias [E]) as float32 parts [P, T, E] whose sum over P is the logits: the
    tensor-core GEMM of a prefill batch, H split into P parts (``router_parts_layout``; P = 1 is the logits
    themselves). The routing kernels take the parts as they are (``tilemoe.ops.route.route_tokens``); ``sum(0)``
    gives the logits.

    x and weight float16 or bfloat16, one dtype (the tensor cores' inputs: their products are exact in float32 and
    summed in float32, as the float32 GEMM of ``tilemoe.routing.router_logits`` sums them, in another order); bias
    any float dtype. CUDA, or the Triton interpreter (``TRITON_INTERPRET=1``; its dot is wrong for bfloat16). Any
    strides. T = 0 gives [1, 0, E].
    Raises ValueError / TypeError naming the argument on a wrong shape, dtype or device.
    """
    _check(x, weight, bias)
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        raise TypeError(
            f"weight: expected x and weight both float16 or both bfloat16 (the tensor cores' inputs), got x "
            f"{x.dtype} and weight {weight.dtype}"
        )
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"x: expected a CUDA tensor (or TRITON_INTERPRET=1 on the CPU), got device {x.device}")
    return _router_parts_op(x, weight, bias)


@torch.library.custom_op("tilemoe::router_parts", mutates_args=())
def _router_parts_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    parts = _empty_parts(x, weight)
    _fill_router_parts(x, weight, bias, parts)
    return parts


@_router_parts_op.register_fake
def _(x, weight, bias):
    return _empty_parts(x, weight)


def _empty_parts(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    (num_tokens, hidden), num_experts = x.shape, weight.shape[0]
    _, _, parts, _ = router_parts_layout(num_tokens, num_experts, hidden, _sm_count(x.device))
    return torch.empty((parts, num_tokens, num_experts), dtype=torch.float32, device=x.device)


def _fill_router_parts(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: torch.Tensor) -> None:
    """Write ``router_logit_parts`` into ``parts`` [P, T, E] (its P from ``router_parts_layout``)."""
    from tilemoe.ops._kernels._router import _router_parts_kernel

    (num_tokens, hidden), num_experts = x.shape, weight.shape[0]
    block_t, block_e, num_parts, h_per_part = router_parts_layout(num_tokens, num_experts, hidden, _sm_count(x.device))
    assert parts.shape == (num_parts, num_tokens, num_experts), (parts.shape, num_parts)
    if num_tokens == 0 or num_experts == 0:
        return
    _router_parts_kernel[(cdiv(num_tokens, block_t), num_parts, cdiv(num_experts, block_e))](
        **pdl_options(x.device),
        **_operand_args(x, weight, bias),
        parts_ptr=parts,
        stride_pp=parts.stride(0),
        stride_pt=parts.stride(1),
        stride_pe=parts.stride(2),
        num_tokens=num_tokens,
        num_experts=num_experts,
        hidden=hidden,
        h_per_part=h_per_part,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_H=_PARTS_BLOCK_H,
        num_warps=4,
        num_stages=3,
    )
