"""A cuBLAS ceiling for the bench (``tilemoe bench --bmm-ceiling``).

The layer's two expert GEMMs as batched GEMMs (``torch.bmm``) over as many experts as the scenario hits, each
expert given the same number of rows, ceil(T*K / experts hit): the same weights and (up to that rounding) the same
FLOPs as the layer, without its routing, gather, activation, combine or load imbalance. It is what the vendor's GEMM
does with the work no MoE kernel can avoid.

Why: the roofline's matmul rate is a burst (best of ten 8192^3 matmuls), and at some shapes no GEMM reaches it;
the ceiling's time against ``roofline_ms`` shows how much of the roofline a vendor GEMM reaches at that shape, and
``pct_ceiling_bmm`` (ceiling time / implementation time) how near an implementation comes to it.
It is timed after the implementations, in a pass of its own (as many calls, the same CUDA-graph settings), not in
their rounds: on an H100 at its 700 W cap this power-hungry GEMM pulled the clock down for everything timed beside
it (triton 5-8% slower at qwen3-30b-a3b T=16384, bench/NOTES.md, session 9).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tilemoe.config import MoEConfig


@dataclass
class BmmCeiling:
    """Both GEMMs of the ceiling on preallocated tensors; ``fn(_)`` runs them (graph-capturable) and returns out2."""

    a1: torch.Tensor  # [experts, rows, H]
    w13_t: torch.Tensor  # [experts, H, N1], the transposed view of the first experts' w13
    out1: torch.Tensor  # [experts, rows, N1]
    a2: torch.Tensor  # [experts, rows, I]
    w2_t: torch.Tensor  # [experts, I, H]
    out2: torch.Tensor  # [experts, rows, H]
    flops: int

    @property
    def experts(self) -> int:
        return self.a1.shape[0]

    @property
    def rows_per_expert(self) -> int:
        return self.a1.shape[1]

    def fn(self, _inputs=None) -> torch.Tensor:
        torch.bmm(self.a1, self.w13_t, out=self.out1)
        torch.bmm(self.a2, self.w2_t, out=self.out2)
        return self.out2


def bmm_ceiling(
    config: MoEConfig, num_tokens: int, experts_hit: int, weights: dict, *, dtype: torch.dtype, device: torch.device
) -> BmmCeiling | None:
    """The two GEMMs of ``experts_hit`` experts (the first ones of ``weights``), ceil(T*K / experts_hit) rows each:
    out1 = a1 @ w13[e]^T ([rows, H] x [H, 2I or I]), out2 = a2 @ w2[e]^T ([rows, I] x [I, H]). None when there is
    no work (T = 0). a1 and a2 are random: the values do not change the time.

    Raises ValueError when ``experts_hit`` is not in 1..num_experts (with tokens to route).
    """
    slots = num_tokens * config.top_k
    if slots == 0:
        return None
    if not 0 < experts_hit <= config.num_experts:
        raise ValueError(f"experts_hit: expected 1..{config.num_experts}, got {experts_hit}")
    e, h, i, n1 = experts_hit, config.hidden_size, config.intermediate_size, config.w13_rows
    rows = -(-slots // e)
    return BmmCeiling(
        a1=torch.randn(e, rows, h, device=device, dtype=dtype),
        w13_t=weights["w13"][:e].transpose(1, 2),  # a view: cuBLAS reads the transpose in place
        out1=torch.empty(e, rows, n1, device=device, dtype=dtype),
        a2=torch.randn(e, rows, i, device=device, dtype=dtype),
        w2_t=weights["w2"][:e].transpose(1, 2),
        out2=torch.empty(e, rows, h, device=device, dtype=dtype),
        flops=2 * e * rows * (h * n1 + i * h),
    )
