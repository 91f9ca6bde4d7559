"""grouped_matmul: rows grouped by expert times each group's weight, through torch's grouped GEMM.

``F.grouped_mm`` (torch >= 2.9 public name) or ``torch._grouped_mm`` (older): cuBLAS / CUTLASS grouped GEMM on
sm90+, driven by the group ends as a device tensor (no host sync). Strides must be multiples of 16 bytes: the
reduced and output dims are padded with zeros when they are not (real models never need it). Used by the
``torch_grouped_mm`` implementation and by ``fused_experts``' grouped_mm path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["grouped_matmul", "grouped_mm_available"]


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@functools.cache
def _probe(device_type: str, dtype: torch.dtype) -> bool:
    fn = _grouped_mm_fn()
    if fn is None or (device_type == "cuda" and not torch.cuda.is_available()):  # a CPU-only torch asserts there
        return False
    try:
        a = torch.ones(32, 16, device=device_type, dtype=dtype)
        b = torch.ones(2, 16, 16, device=device_type, dtype=dtype).transpose(1, 2)
        offs = torch.tensor([16, 32], device=device_type, dtype=torch.int32)
        return bool((fn(a, b, offs=offs) == 16).all())
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


def grouped_mm_available(device_type: str | None = None, dtype: torch.dtype | None = None) -> bool:
    """Whether a tiny grouped GEMM runs (cached): on ``device_type`` in ``dtype``, or by default on CUDA in bf16
    when there is a GPU, else on the CPU in fp32."""
    if device_type is not None:
        return _probe(device_type, dtype or torch.float32)
    if torch.cuda.is_available():
        return _probe("cuda", torch.bfloat16)
    return _probe("cpu", torch.float32)


def _pad_last(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -t.shape[-1] % multiple
    return F.pad(t, (0, extra)) if extra else t


def grouped_matmul(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [M, Kd] rows grouped by expert, w [E, N, Kd], offs [E] int32 group ends -> [M, N] (row r uses the weight of
    its group; rows past offs[-1] are not computed). Raises TypeError where torch has no grouped GEMM for a.dtype on
    a's device."""
    if not _probe(a.device.type, a.dtype):
        raise TypeError(f"grouped_matmul: torch {torch.__version__} has no grouped_mm for {a.dtype} on {a.device.type}")
    align = 16 // a.element_size()
    n = w.shape[1]
    a_p = _pad_last(a, align)
    w_p = _pad_last(w, align)
    if n % align:
        w_p = F.pad(w_p, (0, 0, 0, -n % align))
    out = _grouped_mm_fn()(a_p, w_p.transpose(1, 2), offs=offs)
    return out[:, :n] if n % align else out
