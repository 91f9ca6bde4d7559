"""act_and_mul: the fused activation of a gated expert MLP, act(gate) * up, as one Triton kernel.

``tilemoe.ops.activation.act_and_mul_torch`` is its reference.
"""

from __future__ import annotations

import os

import torch

from tilemoe.config import MoEConfig
from tilemoe.ops._launch import cdiv

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "swigluoai": 4}

__all__ = ["ACTIVATION_CODES", "act_and_mul", "triton_kernels_available"]


def triton_kernels_available() -> bool:
    """True where Triton kernels can run: a CUDA device, or the interpreter (``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def act_and_mul(h: torch.Tensor, config: MoEConfig, out: torch.Tensor | None = None) -> torch.Tensor:
    """h [M, 2I] (gate then up) -> act(gate) * up [M, I]; h [M, I] -> act(h) when ``config.gated`` is False.

    Computes in float32 and returns h.dtype (fp32 / fp16 / bf16). ``out`` [M, I] may be given to write into.
    Raises ValueError / TypeError naming the argument on a wrong shape, dtype or device.
    """
    if not isinstance(h, torch.Tensor) or h.dim() != 2:
        raise ValueError(f"h: expected a 2-D tensor [M, 2I or I], got {getattr(h, 'shape', type(h).__name__)}")
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"h: expected dtype float32, float16 or bfloat16, got {h.dtype}")
    inter = config.intermediate_size
    if h.shape[1] != config.w13_rows:
        raise ValueError(f"h: expected {config.w13_rows} columns (config.w13_rows), got {h.shape[1]}")
    rows = h.shape[0]
    if out is None:
        out = torch.empty((rows, inter), dtype=h.dtype, device=h.device)
    elif out.shape != (rows, inter) or out.dtype != h.dtype or out.device != h.device:
        raise ValueError(
            f"out: expected [{rows}, {inter}] {h.dtype} on {h.device}, "
            f"got {list(out.shape)} {out.dtype} on {out.device}"
        )
    if rows == 0:
        return out
    launch_act_and_mul(
        h, out, activation=ACTIVATION_CODES[config.activation], gated=config.gated,
        swiglu_alpha=float(config.swiglu_alpha), swiglu_limit=float(config.swiglu_limit),
    )  # fmt: skip
    return out


def launch_act_and_mul(
    h: torch.Tensor, out: torch.Tensor, *, activation: int, gated: bool, swiglu_alpha: float, swiglu_limit: float
) -> None:
    """The kernel launch behind ``act_and_mul`` on checked tensors: h [M, 2I or I] -> out [M, I], activation as an
    ``ACTIVATION_CODES`` value (for launchers that hold the codes, not a MoEConfig)."""
    from tilemoe.ops._kernels._act_and_mul import _act_and_mul_kernel

    rows, inter = out.shape
    block_i = 128 if inter >= 128 else max(16, 1 << (inter - 1).bit_length())
    block_m = 4
    _act_and_mul_kernel[(cdiv(rows, block_m), cdiv(inter, block_i))](
        h_ptr=h,
        stride_hm=h.stride(0),
        stride_hi=h.stride(1),
        out_ptr=out,
        stride_om=out.stride(0),
        stride_oi=out.stride(1),
        num_rows=rows,
        inter_size=inter,
        swiglu_alpha=swiglu_alpha,
        swiglu_limit=swiglu_limit,
        ACTIVATION=activation,
        GATED=gated,
        BLOCK_M=block_m,
        BLOCK_I=block_i,
    )
