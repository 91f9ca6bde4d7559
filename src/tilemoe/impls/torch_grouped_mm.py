"""tilemoe's first own rung: both expert matmuls as single grouped GEMMs (``torch.nn.functional.grouped_mm``).

What changes from level 4: the E per-expert matmuls become one grouped-GEMM kernel per weight (cuBLAS /
CUTLASS grouped GEMM on sm90+), driven by the per-expert row offsets on the device. Nothing reads the counts
back to the host, so the whole layer is a fixed sequence of about ten kernels: no sync, and it can be
captured in a CUDA graph as is.

``F.grouped_mm`` (torch >= 2.9 public name) or ``torch._grouped_mm`` (older). Strides must be multiples of
16 bytes: H, I and 2I are padded with zeros when they are not (real models never need it). Available where
a tiny probe call succeeds on the default device (CUDA when present, else CPU), cached.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tilemoe.impls._registry import register_impl
from tilemoe.impls.grouped import sort_by_expert
from tilemoe.impls.memeff import _act


def _grouped_mm_fn():
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return fn


@functools.cache
def _probe(device_type: str, dtype: torch.dtype) -> bool:
    fn = _grouped_mm_fn()
    if fn is None:
        return False
    try:
        a = torch.ones(32, 16, device=device_type, dtype=dtype)
        b = torch.ones(2, 16, 16, device=device_type, dtype=dtype).transpose(1, 2)
        offs = torch.tensor([16, 32], device=device_type, dtype=torch.int32)
        return bool((fn(a, b, offs=offs) == 16).all())
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


def grouped_mm_available() -> bool:
    if torch.cuda.is_available():
        return _probe("cuda", torch.bfloat16)
    return _probe("cpu", torch.float32)


def _pad_last(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -t.shape[-1] % multiple
    return F.pad(t, (0, extra)) if extra else t


def _grouped_matmul(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [M, Kd] rows grouped by expert, w [E, N, Kd] -> [M, N] (row r uses the weight of its group)."""
    if not _probe(a.device.type, a.dtype):
        raise TypeError(
            f"torch_grouped_mm: torch {torch.__version__} has no grouped_mm for {a.dtype} on {a.device.type}"
        )
    align = 16 // a.element_size()
    n = w.shape[1]
    a_p = _pad_last(a, align)
    w_p = _pad_last(w, align)
    if n % align:
        w_p = F.pad(w_p, (0, 0, 0, -n % align))
    out = _grouped_mm_fn()(a_p, w_p.transpose(1, 2), offs=offs)
    return out[:, :n] if n % align else out


@register_impl(
    "torch_grouped_mm",
    description="rows sorted by expert, each weight one grouped GEMM (F.grouped_mm); no host sync",
    auto_priority=50,
    is_available=grouped_mm_available,
)
def torch_grouped_mm_experts(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None):
    num_experts = w13.shape[0]
    order, token_of_row, counts = sort_by_expert(topk_ids, num_experts)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    expert_of_row = topk_ids.reshape(-1).long()[order]
    weight_of_row = topk_weights.reshape(-1)[order].unsqueeze(1)
    rows = x[token_of_row]
    if config.weights_on_input:
        rows = (rows * weight_of_row).to(x.dtype)
    h = _grouped_matmul(rows, w13, offs)
    if b13 is not None:
        h += b13[expert_of_row]
    y = _grouped_matmul(_act(x)(h, config), w2, offs)
    if b2 is not None:
        y += b2[expert_of_row]
    y = y.float()
    if not config.weights_on_input:
        y *= weight_of_row
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of_row, y)
    return out.to(x.dtype)
