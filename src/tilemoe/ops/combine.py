"""sum_slots: the deterministic combine of a top-k MoE layer, [T*K, H] slot outputs -> [T, H] token outputs.

out[t] = sum over k of per_slot[t*K + k], accumulated in float32 in the order k = 0, 1, ..., K-1 and written once
in per_slot's dtype: one Triton launch, where ``per_slot.view(T, K, H).sum(1, dtype=float32).to(dtype)`` is a
reduce and a cast pass (248 us + 63 us at T=16384, K=8, H=2048 bf16 on an H100). ``sum_slots_torch`` is its
reference. A custom op, so torch.compile and CUDA graphs can trace it.
"""

from __future__ import annotations

import os

import torch

from tilemoe.ops._launch import cdiv, pdl_options

__all__ = ["sum_slots", "sum_slots_torch"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(per_slot: torch.Tensor, top_k: int) -> None:
    if not isinstance(per_slot, torch.Tensor) or per_slot.dim() != 2:
        shape = list(per_slot.shape) if isinstance(per_slot, torch.Tensor) else type(per_slot).__name__
        raise ValueError(f"per_slot: expected a 2-D tensor [T*K, H], got {shape}")
    if per_slot.dtype not in _DTYPES:
        raise TypeError(f"per_slot: expected dtype float32, float16 or bfloat16, got {per_slot.dtype}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
        raise ValueError(f"top_k: expected a positive int, got {top_k!r}")
    if per_slot.shape[0] % top_k:
        raise ValueError(f"per_slot: expected a multiple of top_k={top_k} rows (T*K), got {per_slot.shape[0]}")


def sum_slots_torch(per_slot: torch.Tensor, top_k: int) -> torch.Tensor:
    """Reference: per_slot [T*K, H] -> [T, H] in per_slot.dtype, summed by torch in float32 (its own order).

    Raises ValueError / TypeError naming the argument on a wrong shape, dtype or top_k.
    """
    _check(per_slot, top_k)
    hidden = per_slot.shape[1]
    return per_slot.reshape(-1, top_k, hidden).sum(dim=1, dtype=torch.float32).to(per_slot.dtype)


def sum_slots(per_slot: torch.Tensor, top_k: int) -> torch.Tensor:
    """Sum each token's ``top_k`` consecutive slot rows: per_slot [T*K, H] -> out [T, H] in per_slot.dtype.

    per_slot: float32 / float16 / bfloat16, any strides (16-byte loads when its rows are contiguous). The sum runs
    in float32 over k = 0..K-1 and is rounded once, so two runs are bitwise equal. top_k = 1 returns ``per_slot``
    itself (no copy); T = 0 returns an empty [0, H] tensor. Triton on CUDA or under ``TRITON_INTERPRET=1``, else
    the same fixed-order sum in torch. Raises ValueError / TypeError naming the argument on a wrong shape, dtype
    or top_k.
    """
    _check(per_slot, top_k)
    if top_k == 1:
        return per_slot
    return _sum_slots_op(per_slot, top_k)


@torch.library.custom_op("tilemoe::sum_slots", mutates_args=())
def _sum_slots_op(per_slot: torch.Tensor, top_k: int) -> torch.Tensor:
    num_slots, hidden = per_slot.shape
    out = torch.empty((num_slots // top_k, hidden), dtype=per_slot.dtype, device=per_slot.device)
    _sum_slots_into(per_slot, top_k, out)
    return out


@_sum_slots_op.register_fake
def _(per_slot, top_k):
    return per_slot.new_empty((per_slot.shape[0] // top_k, per_slot.shape[1]))


def _sum_slots_into(per_slot: torch.Tensor, top_k: int, out: torch.Tensor) -> None:
    """Write the slot sums into ``out`` [T, H] (tests poison it first, so an unwritten element shows)."""
    num_tokens, hidden = out.shape
    if num_tokens == 0 or hidden == 0:
        return
    if not (per_slot.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        rows = per_slot.reshape(num_tokens, top_k, hidden)
        acc = rows[:, 0].to(torch.float32, copy=True)  # never an alias of a float32 input
        for k in range(1, top_k):  # the kernel's order, so CPU and GPU results agree bitwise
            acc += rows[:, k].float()
        out.copy_(acc)
        return
    from tilemoe.ops._kernels._combine import _sum_slots_kernel

    # 2048-byte tile rows: one 16-byte vector per thread and load (4 warps x 32 threads x 8 halves or 4 floats)
    block_h = max(16, min(1 << (hidden - 1).bit_length(), 2048 // per_slot.element_size()))
    block_t = max(1, 1024 // block_h)  # small H: several tokens per program
    grid = (cdiv(num_tokens, block_t), cdiv(hidden, block_h))
    _sum_slots_kernel[grid](
        **pdl_options(out.device),
        per_slot_ptr=per_slot,
        stride_ps=per_slot.stride(0),
        stride_ph=per_slot.stride(1),
        out_ptr=out,
        stride_ot=out.stride(0),
        stride_oh=out.stride(1),
        num_tokens=num_tokens,
        hidden=hidden,
        TOP_K=top_k,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        num_warps=4,
    )
